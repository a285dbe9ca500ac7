"""Every stage of every registered distillation method, set up by the loop on a sentinel device (meta, a stand-in
for CUDA): every tensor the stage's method can reach (its networks, frozen teachers, target networks, schedule
tables, closures) must be there.  Before issue 10 the loop moved only the checkpointed modules, so a teacher and
its tables stayed on the CPU and distillation on CUDA failed."""

import dataclasses

import pytest
from placement_check import check_placement

from fewstep.distill import methods
from fewstep.training import loop
from fewstep.training.recipe import start


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_stage_of_every_method_is_placed_whole(name, gmm_cond_teacher, tmp_path, monkeypatch):
    checked = []
    original = loop.place

    def checking(method, device):
        check_placement(method)  # on a deep copy: the real run goes on below, on the CPU
        checked.append(method.name)
        return original(method, device)

    monkeypatch.setattr(loop, "place", checking)
    recipe = methods()[name]
    opts = dataclasses.asdict(recipe.options.for_tests())
    start("distill", name, tmp_path / "out", teacher=gmm_cond_teacher if recipe.needs_teacher else None,
          data="gmm", values={**opts, "iters": 2, "batch": 64}, progress=False)
    assert checked, "no stage ran"

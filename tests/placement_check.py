"""Walk every tensor reachable from a training method and check that the loop's placement moved it (issue 10):
a frozen network or a schedule table left behind on the CPU fails here, on any machine, not only on a GPU."""

import copy
import dataclasses
import types

import torch
from torch import nn

from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.training.loop import place


def tensors_reachable(obj, path="method", seen=None):
    """(path, tensor) for every tensor reachable from ``obj``: attributes, containers, modules (parameters,
    buffers and plain tensor attributes such as a Denoiser's schedule tables) and closures."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type, types.ModuleType)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, torch.Generator):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_reachable(v, f"{path}[{k!r}]", seen)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield from tensors_reachable(v, f"{path}[{i}]", seen)
        return
    if isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            yield from tensors_reachable(cell.cell_contents, f"{path}<closure {i}>", seen)
        return
    if isinstance(obj, types.MethodType):
        yield from tensors_reachable(obj.__func__, path, seen)
        return
    if isinstance(obj, nn.Module):
        for k, v in obj.named_parameters(recurse=False):
            yield f"{path}.{k}", v
        for k, v in obj.named_buffers(recurse=False):
            yield f"{path}.{k}", v
        for k, v in obj.named_children():
            yield from tensors_reachable(v, f"{path}.{k}", seen)
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") or k == "_forward_hooks"}
    elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith(("fewstep", "test")) or \
            isinstance(obj, NoiseSchedule):
        attrs = vars(obj) if hasattr(obj, "__dict__") else {}
    else:
        return
    for k, v in attrs.items():
        yield from tensors_reachable(v, f"{path}.{k}", seen)


def assert_on(method, device: str) -> None:
    found = list(tensors_reachable(method))
    assert found, "nothing reachable"
    off = [(p, t.device) for p, t in found if t.device.type != device]
    assert not off, f"left behind: {off[:5]}"


def check_placement(method) -> None:
    """Place a copy of ``method`` on the meta device (a stand-in for CUDA) and walk everything it can reach."""
    m = copy.deepcopy(method)
    place(m, "meta")
    assert_on(m, "meta")

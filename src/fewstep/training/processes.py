"""The processes of a multi-process run (``torchrun`` / ``accelerate launch``), through accelerate's PartialState.

In a single process every helper is a no-op.  The recipe layer uses them so that only the main process writes the
files every process would write alike (the run record, teacher pairs, stage configs), and so that no process
writes before every process has checked its output folder."""

from __future__ import annotations


def use_cpu() -> bool:
    """Run on the CPU: ``ACCELERATE_USE_CPU`` is set, or this is one of several launched processes on a machine
    without an accelerator.  accelerate itself makes several CPU processes one group only when told ``cpu``; told
    nothing, each process of ``torchrun --nproc_per_node 2`` on a CPU machine would train alone, all into the same
    folder."""
    import os

    import torch
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    if "LOCAL_RANK" not in os.environ:
        return False
    has = getattr(torch, "accelerator", None)
    return not (has.is_available() if has is not None else torch.cuda.is_available())


def expected_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _state():  # noqa: ANN202 - accelerate's PartialState, imported late (it imports torch)
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def is_main() -> bool:
    """True in the process that writes shared files (the only one in a single-process run)."""
    return bool(_state().is_main_process)


def barrier() -> None:
    """Every process waits here for every other one."""
    _state().wait_for_everyone()


def on_main(build, what: str):  # noqa: ANN001, ANN201 - any callable and what it returns
    """``build()`` on the main process only; the other processes get None.  Every process waits for it, and when it
    fails the other processes stop with its message (none is left waiting in a collective for a rank that quit).
    In a single process this is ``build()``."""
    if expected_processes() == 1:
        return build()
    from accelerate.utils import broadcast_object_list

    from fewstep.errors import FewstepError

    state, result, failure = _state(), None, None
    message: list[str | None] = [None]
    if state.is_main_process:
        try:
            result = build()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
            failure, message[0] = e, f"{type(e).__name__}: {e}"
    broadcast_object_list(message)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise FewstepError(f"{what} failed on the main process: {message[0]}")
    return result

"""The flags that say how to read a user's ``--data``, shared by every command that takes ``--data``.

``@data_options`` adds them to a command's signature and turns ``--data`` plus the flags into one data key
(:func:`fewstep.data.spec.data_key`) before the command runs, so commands see a single ``data`` string.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer

from fewstep.errors import FewstepError


def _opt(name: str, annotation: Any, default: Any, flag: str, help: str) -> inspect.Parameter:
    decl = typer.Option(flag, help=help, rich_help_panel="Your own data") if flag.startswith("--") else \
        typer.Option(help=help, rich_help_panel="Your own data")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, decl])


DATA_PARAMS = [
    _opt("labels", str | None, None, "--labels", "A .npy of integer labels, one per image of a .npy --data."),
    _opt("range_", str | None, None, "--range", "Value range of a float array: 0,1 or -1,1 (uint8 is 0-255); "
         "values outside are clipped with a warning."),
    _opt("resolution", int | None, None, "--resolution", "Resize the shorter side to R and center-crop RxR "
         "(without it every image must have the same size)."),
    _opt("channels", int | None, None, "--channels", "1 or 3 (default: 1 when every image is grayscale, else 3)."),
    _opt("test_fraction", float | None, None, "--test-fraction", "Share of the images held out as the test split "
         "(default 0.1, picked by a permutation seeded with 0; without it, a datasets folder's own test split is "
         "used)."),
    _opt("data_test", str | None, None, "--data-test", "A second source that is the test split (read with the "
         "same flags)."),
    _opt("image_column", str | None, None, "--image-column", "datasets folders: the image column (default: the "
         "Image feature)."),
    _opt("label_column", str | None, None, "--label-column", "datasets folders: the label column (default: the "
         "ClassLabel feature)."),
    _opt("skip_bad_images", bool, False, "--skip-bad-images", "Skip unreadable images and non-image files "
         "(their count is reported) instead of stopping."),
    _opt("memory_budget", str | None, None, "--memory-budget", "Splits larger than this (float32 images) are "
         "read lazily: 512M, 4G (default 2G, or $FEWSTEP_MEMORY_BUDGET)."),
]


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the data flags to ``fn``'s command line; ``fn`` gets ``data`` as a data key."""
    sig = inspect.signature(fn, eval_str=True)  # the command module may use postponed (string) annotations
    names = [p.name for p in DATA_PARAMS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opts = {n: kwargs.pop(n, None) for n in names}
        budget = opts.pop("memory_budget")
        if budget is not None:
            from fewstep.data.datasets import parse_size

            parse_size(budget, "--memory-budget")  # checked before anything runs
            os.environ["FEWSTEP_MEMORY_BUDGET"] = budget  # read by the data layer (and inherited by workers)
        opts["range"] = opts.pop("range_")
        opts["test"] = opts.pop("data_test")
        given = [k for k, v in opts.items() if v is not None and v is not False]
        if kwargs.get("data") is not None:
            from fewstep.data.spec import data_key

            kwargs["data"] = data_key(kwargs["data"], **opts)
        elif given:
            from fewstep.data.spec import FLAGS

            raise FewstepError(f"{', '.join(FLAGS[k] for k in given)} say how to read --data: pass --data too")
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*sig.parameters.values(), *DATA_PARAMS])
    return wrapper

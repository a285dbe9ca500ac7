"""Typed schemas for the files a user hands fewstep (model configs, diffusers configs, bench configs).

A schema is a pydantic model: strict types (``"10"`` is not a number, ``true`` is not 1), finite floats, ranges, and
no unknown keys unless a schema says so.  :func:`check` validates a mapping and turns the first problem into one
:class:`FewstepError` line naming the file, the field as a dotted path (``profiles.quick.n``), the value and what is
allowed.  A field's ``description`` says what is allowed, in words; without one, pydantic's own wording is used.
Validation only checks: callers keep the values as they were read (so a config read and written back is unchanged).
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from fewstep.errors import FewstepError

INT64 = 2**63


class FieldProblem(ValueError):
    """Raised by a model validator about one of its fields (a cross-field rule): the error names that field."""

    def __init__(self, field: str, value: Any, text: str):
        super().__init__(text)
        self.field, self.value, self.text = field, value, text


class Strict(BaseModel):
    """No coercion, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _finite_text(v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as text: a number written that way is still a number."""
    if isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return v
        return f if math.isfinite(f) else v
    return v


Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
YamlFinite = Annotated[float, BeforeValidator(_finite_text), Field(strict=True, allow_inf_nan=False)]
PosInt = Annotated[int, Field(strict=True, ge=1, lt=INT64)]
NonNegInt = Annotated[int, Field(strict=True, ge=0, lt=INT64)]


def describe_value(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types an annotation allows (Annotated and Optional removed)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(tp) if a is not type(None) for t in _unwrap(a)]
    return [tp]


def _step(tp: Any, part: Any) -> Any:
    for t in _unwrap(tp):
        origin, args = typing.get_origin(t), typing.get_args(t)
        if isinstance(t, type) and issubclass(t, BaseModel) and isinstance(part, str) and part in t.model_fields:
            return t.model_fields[part].annotation
        if origin is list and isinstance(part, int):
            return args[0]
        if origin is dict and isinstance(part, str):
            return args[1]
    return None


def _model_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    tp: Any = schema
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return None
    models = [t for t in _unwrap(tp) if isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if models else None


def _description(schema: type[BaseModel], loc: tuple) -> str | None:
    if not loc or not isinstance(loc[-1], str):
        return None
    model = _model_at(schema, loc[:-1])
    if model is None or loc[-1] not in model.model_fields:
        return None
    return model.model_fields[loc[-1]].description


def dotted(prefix: str, loc: tuple) -> str:
    return ".".join([p for p in [prefix] if p] + [str(p) for p in loc])


def explain(schema: type[BaseModel], err: dict[str, Any], where: str, prefix: str = "") -> str:
    """One line for one pydantic error."""
    loc = tuple(err["loc"])
    name = dotted(prefix, loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(schema, loc[:-1])
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=2)
        if len(known) > 16:  # a long list (diffusers' UNet2DModel) would not fit a line: the likely ones
            hint = f"did you mean {' or '.join(close)}?" if close else f"use keys such as {', '.join(known[:8])}, ..."
        else:
            hint = f"use {', '.join(known)}" if known else ""
        return f"{where}: unknown key `{name}`" + (f": {hint}" if hint else "")
    desc = _description(schema, loc)
    if kind == "missing":
        return f"{where} has a malformed field: `{name}` is missing" + (f": give {desc}" if desc else "")
    error = err.get("ctx", {}).get("error")
    if isinstance(error, FieldProblem):
        return f"{where}: {dotted(prefix, loc + (error.field,))} = {describe_value(error.value)}: {error.text}"
    if kind == "value_error":  # a validator's own words are the most precise
        msg = str(error if error is not None else err["msg"])
    elif desc:
        msg = f"give {desc}"
    else:
        msg = re.sub(r" or instance of \w+", "", err["msg"].replace("Input should be", "should be"))
    return f"{where}: {name} = {describe_value(err.get('input'))}: {msg}"


def check(schema: type[BaseModel], obj: Any, where: str, prefix: str = "") -> BaseModel:
    """``obj`` validated by ``schema``, or one FewstepError line (``where``: the file; ``prefix``: the dotted path of
    ``obj`` inside it).  ``obj`` must be a mapping."""
    if not isinstance(obj, dict):
        what = f"{prefix} = {describe_value(obj)}: give" if prefix else "should hold"
        raise FewstepError(f"{where}: {what} a mapping of keys to values")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
        raise FewstepError(explain(schema, errors[0], where, prefix) + more) from None


def non_finite(tensors: dict[str, Any]) -> tuple[int, str | None]:
    """How many NaN or infinite values the floating-point tensors hold, and the first tensor holding one."""
    import torch

    count, first = 0, None
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                count += bad
                first = first or name
    return count, first

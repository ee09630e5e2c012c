"""What a stage function takes, read from its real signature.

`parameters(func)` lists the keys a recipe may set: the function's named parameters, with a
parameter annotated as an options dataclass (`options: TrainOptions | None`) expanded into
that dataclass's fields. The dataclass is found from the annotation alone, so a stage that
adds or renames an options class needs no table here. `bind` does the reverse: it builds
the keyword arguments of a call, options dataclasses included, from a recipe's flat keys.
`type_problem` says when a value clearly does not fit an annotation.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

# parameters the runner supplies itself; a recipe may not set them
RUNNER_FILLED = ("run", "progress")


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any
    required: bool
    owner: str          # "function" or the options dataclass parameter it belongs to


def parameters(func: Callable[..., Any]) -> dict[str, Param]:
    """Keys a recipe may set for `func`: its named parameters, with an options-dataclass
    parameter expanded into that dataclass's fields (keys of both kinds are accepted)."""
    hints = resolved_hints(func)
    out: dict[str, Param] = {}
    for p in inspect.signature(func).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in RUNNER_FILLED:
            continue
        annotation = hints.get(p.name, p.annotation)
        options_cls = options_class(annotation)
        if options_cls is None:
            out[p.name] = Param(p.name, annotation, None if p.default is p.empty else p.default,
                                p.default is p.empty, "function")
            continue
        for param in _field_params(options_cls, p.name, optional=p.default is not p.empty):
            out.setdefault(param.name, param)
    return out


def _field_params(cls: type, owner: str, *, optional: bool) -> list[Param]:
    """The init fields of options dataclass `cls` as Params (required only when the field has
    no default and the parameter holding the dataclass has none either)."""
    field_hints = resolved_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        params.append(Param(f.name, field_hints.get(f.name, f.type), default, not has_default and not optional, owner))
    return params


def options_class(annotation: Any) -> type | None:
    """The dataclass type in `X`, `X | None` or `Optional[X]`, else None."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def resolved_hints(obj: Any) -> dict[str, Any]:
    """The annotations of a function or class as objects. When one cannot be resolved, each
    is resolved on its own (an unresolvable one stays as written) so it hides no other."""
    try:
        return typing.get_type_hints(obj)
    except Exception:
        pass
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    namespace = getattr(obj, "__globals__", None) or (vars(module) if module else {})
    hints = {}
    for name, annotation in getattr(obj, "__annotations__", {}).items():
        try:
            hints[name] = typing.get_type_hints(types.SimpleNamespace(__annotations__={name: annotation}),
                                                namespace)[name]
        except Exception:
            hints[name] = annotation
    return hints


def takes_var_keyword(func: Callable) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())


def bind(func: Callable, remaining: dict[str, Any], *, run, root, progress) -> dict[str, Any]:
    """Pop from `remaining` what `func` takes, building its options dataclass from fields.
    `run` and `progress` are the runner's; `root` fills a `root` parameter not given."""
    signature = inspect.signature(func)
    hints = resolved_hints(func)
    kwargs: dict[str, Any] = {}
    if "root" in signature.parameters and "root" not in remaining and root is not None:
        remaining["root"] = str(root)
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "run":
            if run is not None:
                kwargs["run"] = run
        elif p.name == "progress":
            kwargs["progress"] = progress
        elif (cls := options_class(hints.get(p.name, p.annotation))) is not None:
            if p.name in remaining:      # given whole (unusual): leave it as written
                kwargs[p.name] = remaining.pop(p.name)
                continue
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            fields = {k: remaining.pop(k) for k in list(remaining) if k in names and k not in signature.parameters}
            if fields or p.default is p.empty:
                kwargs[p.name] = cls(**fields)
        elif p.name in remaining:
            kwargs[p.name] = remaining.pop(p.name)
    return kwargs


# --------------------------------------------------------------------------- value types
_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def type_problem(value: Any, annotation: Any) -> str | None:
    """A short description of what `annotation` wants when `value` clearly does not fit it.
    Only plain scalars, lists and their unions are checked; anything else is trusted."""
    if annotation is Any or annotation is inspect.Parameter.empty or value is None and _allows_none(annotation):
        return None
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    wants: list[str] = []
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option) or option
        if origin is typing.Literal:
            if value in typing.get_args(option):
                return None
            wants.append("one of " + ", ".join(map(repr, typing.get_args(option))))
        elif origin in _SCALARS:
            if _fits_scalar(value, origin):
                return None
            wants.append(_SCALARS[origin])
        elif origin in (list, tuple, set, frozenset) or origin is typing.Sequence:
            if isinstance(value, (list, tuple)):
                return None
            wants.append("a list")
        else:
            return None  # a type we do not check (Path, dict, dataclass, ...)
    return " or ".join(wants) if wants else None


def _fits_scalar(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def _allows_none(annotation: Any) -> bool:
    return annotation is None or type(None) in typing.get_args(annotation)

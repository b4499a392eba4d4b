"""Options declared once, as dataclass fields.

A field made with `option(...)` carries its help text, its allowed values (`choices`, a tuple or a
function returning one, for registries) and its range (`low` / `high`, inclusive unless
`low_open`) in its metadata -- the scikit-learn `_parameter_constraints` idea, attached to the
field. From that one declaration:

- `add_options(parser, Cls)` generates the command-line flags (help text shows default and range);
- `given(namespace, Cls)` returns only the values the user typed (flags default to SUPPRESS), so a
  caller can tell "left at the default" from "set to the default";
- `check(obj)` validates an instance -- types, finiteness, ranges, choices -- and raises one
  `MolrmogError` naming the flag, the value and the allowed range;
- `from_dict(Cls, raw, what)` rebuilds an instance from JSON, refusing unknown or ill-typed keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from molrmog.core.errors import MolrmogError

__all__ = ["option", "add_options", "given", "check", "from_dict", "to_dict", "flag_of", "comma_list",
           "int_list", "float_list", "shape3"]


def option(default: Any, help: str | Callable[[], str], *, low: float | None = None, high: float | None = None,
           low_open: bool = False, choices: tuple | Callable[[], tuple] | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None, cli: bool = True,
           flag: str | None = None, positional: bool = False) -> Any:
    """A dataclass field with its command-line declaration (see the module docstring). `help` may be a function
    returning the text (help that lists a registry's entries); `positional` makes it a required positional
    argument (RUN) instead of a flag."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "choices": choices, "parse": parse,
            "metavar": metavar, "cli": cli, "flag": flag, "positional": positional}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable option defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata={"option": meta})


def _meta(f: dataclasses.Field) -> dict | None:
    return f.metadata.get("option")


def flag_of(f: dataclasses.Field | str, prefix: str = "") -> str:
    name = f if isinstance(f, str) else f.name
    meta = None if isinstance(f, str) else _meta(f)
    return (meta or {}).get("flag") or f"--{prefix}{name.replace('_', '-')}"


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _choices(meta: dict) -> tuple | None:
    c = meta.get("choices")
    return tuple(c()) if callable(c) else c


# --- parsers for list-valued flags ---------------------------------------------------------


def comma_list(text: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b')."""
    vals = tuple(v.strip() for v in str(text).split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got an empty one")
    return vals


def int_list(text: str) -> int | tuple[int, ...]:
    """'4' -> 4, '4,6,8' -> (4, 6, 8)."""
    try:
        vals = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals[0] if len(vals) == 1 else vals


def float_list(text: str) -> tuple[float, ...]:
    """'0.1,-0.2' -> (0.1, -0.2)."""
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def shape3(text: str) -> tuple[int, int, int]:
    """'4,7,7' or '4x7x7' -> (4, 7, 7)."""
    try:
        vals = tuple(int(v) for v in str(text).lower().replace("x", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected a shape c,h,w (e.g. 4,7,7), got {text!r}")
    return vals


# --- the command line ------------------------------------------------------------------------


def _range_text(meta: dict) -> str:
    lo, hi = meta["low"], meta["high"]
    if lo is not None and hi is not None:
        return f"{'(' if meta['low_open'] else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{'>' if meta['low_open'] else '>='} {lo:g}"
    if hi is not None:
        return f"<= {hi:g}"
    return ""


def _base_type(tp) -> Any:
    """int | None -> int; tuple[int, ...] -> tuple."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else tp
    return origin or tp


def add_options(parser, cls, *, prefix: str = "", title: str | None = None, skip: tuple[str, ...] = (),
                help_format: dict | None = None) -> None:
    """Add one flag per `option` field of `cls` (fields with cli=False or in `skip` are left out); `{name}` in a
    help text is replaced by `help_format[name]` (a command's own default of a shared option).

    Flags default to SUPPRESS: `given()` then sees exactly what the user typed. Positional options are
    required."""
    target = parser.add_argument_group(title) if title else parser
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = _meta(f)
        if meta is None or not meta["cli"] or f.name in skip:
            continue
        dest = f"{prefix.replace('-', '_')}{f.name}"
        tp = _base_type(hints[f.name])
        extra = [t for t in (_range_text(meta),) if t]
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_base = meta["help"]() if callable(meta["help"]) else meta["help"]
        for k, v in (help_format or {}).items():
            help_base = help_base.replace("{" + k + "}", str(v))
        if default is None:  # the help says what happens without it
            help_text = f"{help_base} ({extra[0]})" if extra else help_base
        else:
            help_text = f"{help_base} (default {shown}{'; ' + extra[0] if extra else ''})"
        if tp is bool:
            if default:
                target.add_argument(f"--{prefix}no-{f.name.replace('_', '-')}", dest=dest, action="store_false",
                                    default=argparse.SUPPRESS, help=help_base)
            else:
                target.add_argument(flag_of(f, prefix), dest=dest, action="store_true", default=argparse.SUPPRESS,
                                    help=meta["help"])
            continue
        choices = _choices(meta)
        parse = _argparse_type(meta["parse"]) if meta["parse"] else (tp if tp in (int, float, str) else str)
        if meta.get("positional"):
            target.add_argument(dest, type=parse, help=help_base, **({"choices": choices} if choices else {}))
            continue
        kw = {"dest": dest, "type": parse, "default": argparse.SUPPRESS, "help": help_text,
              "metavar": meta["metavar"] or ("{" + ",".join(map(str, choices)) + "}" if choices else None)}
        if choices and tp is not tuple:
            kw["choices"] = choices
            kw.pop("metavar")
        target.add_argument(flag_of(f, prefix), **kw)


def _argparse_type(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parse function whose MolrmogError becomes argparse's one-line 'argument --x: ...' error."""
    def parse(text: str):
        try:
            return fn(text)
        except MolrmogError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = getattr(fn, "__name__", "value").lstrip("_")
    return parse


def given(ns: argparse.Namespace, cls, prefix: str = "") -> dict:
    """{field: value} for the flags of `cls` that the user gave on the command line."""
    p = prefix.replace("-", "_")
    names = {f.name for f in dataclasses.fields(cls) if (_meta(f) or {}).get("cli")}
    return {k[len(p):]: v for k, v in vars(ns).items() if k.startswith(p) and k[len(p):] in names}


# --- validation ------------------------------------------------------------------------------


def _type_ok(v, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if origin is tuple:
        if not isinstance(v, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(x, args[0]) for x in v)
        return len(v) == len(args) and all(_type_ok(x, a) for x, a in zip(v, args, strict=True))
    if origin is dict:
        return isinstance(v, dict)
    return isinstance(v, origin or tp)


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check(obj, prefix: str = "", what: str | None = None, key: str | None = None) -> None:
    """Validate every `option` field of a dataclass instance; raise one MolrmogError on the first problem.
    Problems name the command-line flag, or with `key` (e.g. "RUN/config.json: expert_options.mog.") the
    file and the key the value was read from."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        meta = _meta(f)
        if meta is None:
            continue
        v = getattr(obj, f.name)
        name = (f"{key}{f.name}" if key is not None else flag_of(f, prefix)) + (f" ({what})" if what else "")
        if not _type_ok(v, hints[f.name]):
            raise MolrmogError(f"{name} must be of type {_type_name(hints[f.name])}, got {v!r}")
        items = v if isinstance(v, tuple) else (v,)
        for x in items:
            if isinstance(x, float) and not math.isfinite(x):
                raise MolrmogError(f"{name} must be a finite number, got {x}")
            if isinstance(x, (int, float)) and not isinstance(x, bool) and x is not None:
                lo, hi = meta["low"], meta["high"]
                if (lo is not None and (x < lo or (meta["low_open"] and x == lo))) or (hi is not None and x > hi):
                    both = lo is not None and hi is not None
                    raise MolrmogError(f"{name} must {'lie in' if both else 'be'} {_range_text(meta)}, got {x:g}")
        choices = _choices(meta)
        if choices is not None and v is not None:
            bad = [x for x in items if x not in choices]
            if bad or (isinstance(v, tuple) and not v):
                raise MolrmogError(f"{name}: unknown value(s) {bad or list(v)}; choose from "
                                   f"{', '.join(map(str, choices))}")


def to_dict(obj) -> dict:
    """JSON-ready dict of a dataclass instance (tuples become lists, nested dataclasses dicts)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v
    return conv(obj)


def _from_json(v, tp):
    """JSON lists back to tuples where the annotation says tuple."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is not type(None) and typing.get_origin(a) is tuple and isinstance(v, list):
                return tuple(v)
        return v
    if origin is tuple and isinstance(v, list):
        return tuple(v)
    return v


def from_dict(cls, raw: Any, what: str, *, allow_missing: bool = True):
    """Rebuild a dataclass from JSON-like `raw`; unknown keys and bad types are one MolrmogError."""
    if not isinstance(raw, dict):
        raise MolrmogError(f"{what} must be a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise MolrmogError(f"{what} has unknown key(s) {unknown}; known keys: {', '.join(fields)}")
    if not allow_missing:
        missing = sorted(k for k, f in fields.items() if k not in raw and f.default is dataclasses.MISSING)
        if missing:
            raise MolrmogError(f"{what} lacks the key(s) {missing}")
    hints = _hints(cls)
    return cls(**{k: _from_json(v, hints[k]) for k, v in raw.items()})

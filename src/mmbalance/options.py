"""Typed, validated options: one place that turns what a user typed into what a constructor takes.

Every component (method, dataset, encoder, fusion) and every built-in config section declares
its options in its signature: the type hint says what a value may be (``int``, ``float``,
``bool``, ``str``, ``Literal[...]`` choices, ``X | None``, ``list[X]``), and an
``Annotated[..., Interval(...)]`` hint declares its range, e.g.::

    def __init__(self, T: Annotated[float, Interval(0, None, closed="neither")] = 8.0,
                 estimator: Literal["entropy", "variance"] = "entropy"): ...

:func:`coerce_value` converts what YAML or the command line produced (``"1e-3"``, ``"true"``,
``3.0``) to that type and checks the range; anything else fails with one line naming the
option, the value and what is allowed. :func:`describe_options` lists every option with its
type, default, allowed values and the one-line meaning from the docstring (``mmbalance list
methods NAME``).

>>> coerce_value("1e-3", float, "optim.lr")
0.001
>>> coerce_value("abc", Annotated[float, Interval(0, None)], "method 'arl' option 'T'")
Traceback (most recent call last):
...
mmbalance.registry.ConfigError: method 'arl' option 'T' takes a number >= 0, got 'abc'
"""
from __future__ import annotations

import collections.abc
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

from .registry import ConfigError

__all__ = ["Interval", "OptionInfo", "coerce_value", "describe_options", "describe_type", "validate_options",
           "Annotated", "Literal"]

_SEQ = (list, tuple, collections.abc.Sequence)
_MAP = (dict, collections.abc.Mapping)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Interval:
    """A numeric range: ``low``/``high`` (None = unbounded), ``closed`` in both/left/right/neither.

    >>> Interval(0, 1, closed="left").describe()
    'in [0, 1)'
    >>> 1 in Interval(0, 1, closed="left")
    False
    """

    low: float | None = None
    high: float | None = None
    closed: Literal["both", "left", "right", "neither"] = "both"

    def __contains__(self, x: float) -> bool:
        lo_ok = self.low is None or (x >= self.low if self.closed in ("both", "left") else x > self.low)
        hi_ok = self.high is None or (x <= self.high if self.closed in ("both", "right") else x < self.high)
        return lo_ok and hi_ok

    def describe(self) -> str:
        lc = self.closed in ("both", "left")
        hc = self.closed in ("both", "right")
        if self.high is None and self.low is not None:
            return f"{'>=' if lc else '>'} {_num(self.low)}"
        if self.low is None and self.high is not None:
            return f"{'<=' if hc else '<'} {_num(self.high)}"
        if self.low is None and self.high is None:
            return "any"
        return f"in {'[' if lc else '('}{_num(self.low)}, {_num(self.high)}{']' if hc else ')'}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """(the bare type, Annotated metadata)."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        inner, more = _strip(base)
        return inner, [*meta, *more]
    return tp, []


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)


def describe_type(tp: Any) -> str:
    """A short human description of a type hint (for errors and ``list`` output).

    >>> describe_type(Literal["a", "b"] | None)
    "one of 'a', 'b' or null"
    """
    tp, meta = _strip(tp)
    rng = [m for m in meta if isinstance(m, Interval)]
    suffix = f" {rng[0].describe()}" if rng else ""
    if tp is Any or tp is inspect.Parameter.empty:
        return "any value"
    if _is_union(tp):
        args = typing.get_args(tp)
        parts = [describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        if rng:
            text = " or ".join(describe_type(Annotated[(a, *rng)]) for a in args if a is not type(None))
        return text + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true/false"
    if tp is int:
        return "an integer" + suffix
    if tp is float:
        return "a number" + suffix
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin in _SEQ or tp in (list, tuple):
        args = typing.get_args(tp)
        inner = describe_type(args[0]) if args else "values"
        inner = inner.removeprefix("a ").removeprefix("an ")
        for word in ("string", "integer", "number"):
            inner = inner.replace(word, word + "s", 1) if inner.startswith(word) else inner
        return f"a list of {inner}"
    if origin in _MAP or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the type hint ``tp`` and check its declared range; ``where`` names the
    option in the error ("optim.lr", "method 'arl' option 'T'")."""
    base, meta = _strip(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{where} takes {describe_type(tp)}, got {value!r}")

    if base is Any or base is inspect.Parameter.empty:
        return value
    if _is_union(base):
        args = typing.get_args(base)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
            fail()
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_value(value, Annotated[(a, *meta)] if meta else a, where)
            except ConfigError as e:
                errors.append(e)
        fail()
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value in choices and not (isinstance(value, bool) and True not in choices and False not in choices):
            return value
        if isinstance(value, bool):  # YAML reads on/off/yes/no as booleans
            for c in choices:
                if isinstance(c, str) and c.lower() in (_TRUE if value else _FALSE):
                    return c
        if isinstance(value, str):
            for c in choices:
                if str(c) == value:
                    return c
        fail()
    out: Any
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        fail()
    elif base is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            out = int(value)
        elif isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                try:
                    f = float(value.strip())
                except ValueError:
                    fail()
                if not (math.isfinite(f) and f.is_integer()):
                    fail()
                out = int(f)
        else:
            fail()
    elif base is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                fail()
        else:
            fail()
        if not math.isfinite(out):
            fail()
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail()
    elif typing.get_origin(base) in _SEQ or base in (list, tuple):
        args = typing.get_args(base)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if "," in value else [value]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        try:
            return [coerce_value(v, Annotated[(inner, *meta)] if meta else inner, where) for v in value]
        except ConfigError:
            fail()
    elif typing.get_origin(base) in _MAP or base in (dict,):
        if not isinstance(value, Mapping):
            fail()
        return dict(value)
    else:
        return value
    for m in meta:
        if isinstance(m, Interval) and out not in m:
            raise ConfigError(f"{where} takes {describe_type(tp)}, got {value!r}")
    return out


@dataclass(frozen=True)
class OptionInfo:
    """One option of a component, as ``mmbalance list methods NAME`` prints it."""

    name: str
    type: str
    default: Any
    help: str


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # pragma: no cover - an unresolvable hint: fall back to no coercion
        return {}


def _parameters(factory: Callable[..., Any], skip: Sequence[str]) -> list[inspect.Parameter]:
    sig = inspect.signature(factory)
    return [p for p in sig.parameters.values()
            if p.name not in skip and p.name != "self"
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def _doc_help(factory: Callable[..., Any]) -> dict[str, str]:
    """``name: meaning`` lines of the docstring (class and ``__init__``), first sentence each."""
    docs = [inspect.getdoc(factory) or ""]
    if inspect.isclass(factory):
        docs.append(inspect.getdoc(factory.__init__) or "")
    out: dict[str, str] = {}
    for doc in docs:
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^\s*(?:[*-]\s*)?(?:``)?([A-Za-z_][A-Za-z0-9_]*)(?:``)?(?:\s*\([^)]*\))?\s*:\s*(.*)$", line)
            if not m or m.group(1) in out:
                continue
            indent = len(line) - len(line.lstrip())
            text = m.group(2).strip()
            for nxt in lines[i + 1:]:  # continuation lines are indented deeper
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) > indent:
                    text += " " + nxt.strip()
                else:
                    break
            sentence = re.split(r"(?<=[a-z0-9)`'\"]\.)\s+(?=[A-Z(])", text, maxsplit=1)[0]
            out[m.group(1)] = sentence if len(sentence) <= 110 else sentence[:107].rstrip() + "..."
    return out


def describe_options(factory: Callable[..., Any], skip: Sequence[str] = ()) -> list[OptionInfo]:
    """Every option of ``factory`` (a class or function) with type, default and meaning."""
    hints = _hints(factory)
    helps = _doc_help(factory)
    out = []
    for p in _parameters(factory, skip):
        default = None if p.default is inspect.Parameter.empty else p.default
        out.append(OptionInfo(p.name, describe_type(hints.get(p.name, Any)), default, helps.get(p.name, "")))
    return out


def validate_options(kind: str, name: str, factory: Callable[..., Any], options: Mapping[str, Any],
                     skip: Sequence[str] = ()) -> dict[str, Any]:
    """Check option names against ``factory``'s signature (unknown names fail with the valid
    ones), coerce each value to its type hint and check its declared range; return the
    coerced options."""
    params = {p.name: p for p in _parameters(factory, skip)}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    bad = [k for k in options if k not in params and not var_kw]
    if bad:
        raise ConfigError(f"{kind} '{name}' has no option {', '.join(repr(b) for b in bad)}; "
                          f"valid options: {', '.join(params) or '(none)'}")
    hints = _hints(factory)
    return {k: coerce_value(v, hints.get(k, Any), f"{kind} '{name}' option '{k}'") if k in params else v
            for k, v in options.items()}


def options_markdown(factory: Callable[..., Any], skip: Sequence[str] = ()) -> str:
    """The options of ``factory`` as a Markdown table (``docs/methods.md`` is generated with it,
    and a test fails when the page is stale)."""
    rows = ["| option | type / allowed | default | meaning |", "|---|---|---|---|"]
    for o in describe_options(factory, skip):
        default = "null" if o.default is None else repr(o.default)
        cells = [f"`{o.name}`", o.type, f"`{default}`", o.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)

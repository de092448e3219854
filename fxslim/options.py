"""Declarative option schemas: what each pass accepts, checked before any pass runs.

A pass declares `OPTIONS = Schema(Option(...), ...)` next to its `run` and decorates `run` with
`@OPTIONS.checks`. The schema names every keyword-only option of `run` (the defaults stay in the signature,
read from there), its type, its range or choices, whether None is allowed, and a one-line help. The same
schema serves three callers: `load_recipe` (every value of every pass, before anything runs), the pass
manager right after tracing (`check_graph`: module names in `ignore`, data the options need) and a direct
call of `run`. A bad value is a RecipeError naming the pass, the option, the value and what is valid.
This file knows no pass; it never reads a graph beyond its module names."""

from __future__ import annotations

import functools
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fxslim.errors import FxslimError, PassError, RecipeError

_INTERVAL = re.compile(r"([\[(])\s*(-?[\d.e+-]+|-inf)\s*,\s*(-?[\d.e+-]+|inf)\s*([\])])")
_BOUND = re.compile(r"(>=|>|<=|<)\s*(-?[\d.e+-]+)")


@dataclass(frozen=True)
class Interval:
    """A range of numbers written as in maths: "[0, 1)", "(0, 1]", ">= 1", "> 0"."""

    text: str
    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = True

    @classmethod
    def parse(cls, text: str) -> Interval:
        if m := _INTERVAL.fullmatch(text.strip()):
            return cls(text, float(m[2]), float(m[3]), m[1] == "[", m[4] == "]")
        if m := _BOUND.fullmatch(text.strip()):
            op, value = m[1], float(m[2])
            if op.startswith(">"):
                return cls(text, low=value, low_closed=op == ">=")
            return cls(text, high=value, high_closed=op == "<=")
        raise ValueError(f"not an interval: {text!r} (write '[0, 1)', '(0, 1]', '>= 1', '> 0')")

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def describe(self) -> str:
        return self.text if self.text[0] in "<>" else f"in {self.text}"


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a table"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _is(value: Any, kind: type) -> bool:
    """Type test as a recipe reads it: an int is a float, a bool is neither, a tuple is a list."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and not math.isnan(value)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


@dataclass(frozen=True)
class Option:
    """One option of a pass.

    type: bool, int, float, str, list or dict. range: an Interval text ("[0, 1)") for numbers. choices: the
    valid values. items: the type of a list's items. none: None is a valid value (its meaning goes in help).
    check: a test the value must also pass, returning what is wrong with it (or None); `valid` then says in
    words what is valid. graph: "modules" when the value is a list of module names of the traced model,
    "nodes" when node names are accepted too.
    aliases: former names, accepted with a FutureWarning."""

    name: str
    type: type
    help: str
    range: str | None = None
    choices: tuple | None = None
    items: type | None = None
    none: bool = False
    check: Callable[[Any], str | None] | None = None
    valid: str | None = None
    graph: str | None = None
    aliases: tuple[str, ...] = ()
    interval: Interval | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.range is not None:
            object.__setattr__(self, "interval", Interval.parse(self.range))

    def describe(self) -> str:
        """What is valid, in words: the text a bad value's error and `fxslim passes` show."""
        if self.valid:
            text = self.valid
        elif self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.interval is not None:
            text = f"{_TYPE_NAMES[self.type]} {self.interval.describe()}"
        elif self.items is not None:
            text = f"a list of {_PLURALS[self.items]}"
        else:
            text = _TYPE_NAMES[self.type]
        return f"None or {text}" if self.none else text

    def coerce(self, value: Any) -> Any:
        """A list of module names also takes one name; a list option takes a set (sorted); other values stay."""
        if self.graph and isinstance(value, str):
            return [value]
        if self.type is list and isinstance(value, (set, frozenset)):
            return sorted(value)
        return value

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this option, or None when it is valid."""
        if value is None:
            return None if self.none else " must not be None"
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != (self.type is bool):
                return "; valid: " + ", ".join(map(str, self.choices))
            return None
        if not _is(value, self.type):
            return f" must be {self.describe()}"
        if self.interval is not None and value not in self.interval:
            return f" must be {self.describe()}"
        if self.items is not None and not all(_is(v, self.items) for v in value):
            return f" must be {self.describe()}"
        if self.check is not None and (why := self.check(value)):
            return f" {why}"
        return None


def finite(value: float) -> str | None:
    """An Option `check` for numbers that must not be infinite."""
    return None if math.isfinite(value) else "must be finite"


@dataclass(frozen=True)
class Requires:
    """A rule across options: `holds(options)` must be true, else `message` (options are the merged values;
    a message may be a function of them, to show the values)."""

    holds: Callable[[Mapping[str, Any]], bool]
    message: str | Callable[[Mapping[str, Any]], str]


class Schema:
    """The options of one pass: checked values, defaults read from the decorated `run`'s signature."""

    def __init__(
        self,
        *options: Option,
        rules: Iterable[Requires] = (),
        needs_data: Callable[[Mapping[str, Any], Any], str | None] | None = None,
        name: str | None = None,
    ) -> None:
        self.options = {o.name: o for o in options}
        self.rules = tuple(rules)
        self.needs_data = needs_data  # (options, traced model) -> why data is needed (None: not needed)
        self.aliases = {a: o.name for o in options for a in o.aliases}
        self.defaults: dict[str, Any] = {}
        self.pass_name = name or ""  # else the NAME of the module that defines the decorated run

    def checks(self, run: Callable) -> Callable:
        """Decorate a pass's `run`: the schema must name exactly its keyword-only options; every direct call
        is checked like a recipe (values, then the graph and data)."""
        params = inspect.signature(run).parameters.values()
        self.defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        self.pass_name = self.pass_name or run.__globals__.get("NAME") or run.__module__.rsplit(".", 1)[-1]
        if set(self.defaults) != set(self.options):
            raise TypeError(
                f"{run.__module__}.run: options {sorted(self.defaults)} but schema {sorted(self.options)}"
            )
        for name, default in self.defaults.items():
            if default is not inspect.Parameter.empty and (why := self.options[name].problem(default)):
                raise TypeError(f"{run.__module__}.run: default {name}={default!r}{why}")

        @functools.wraps(run)
        def checked(gm, ctx, **options):
            try:
                options = self.check(options)
                self.check_graph(options, gm, ctx.data is not None)
                return run(gm, ctx, **options)
            except FxslimError as exc:
                exc.pass_name = exc.pass_name or self.pass_name
                raise

        checked.schema = self
        return checked

    def check(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with former names renamed; RecipeError for an unknown name or a bad value."""
        fail = functools.partial(RecipeError, pass_name=self.pass_name)
        renamed: dict[str, Any] = {}
        for key, value in options.items():
            name = self.aliases.get(key, key)
            if name != key:  # a FutureWarning: shown by default, to recipe files and CLI users too
                warnings.warn(f"pass {self.pass_name!r}: option {key!r} is now called {name!r}", FutureWarning,
                              stacklevel=3)
            if name not in self.options:
                raise fail(f"no option {key!r}; valid options: {', '.join(self.options) or '(none)'}")
            if name in renamed:
                raise fail(f"option {name!r} is given twice (as {key!r} and under another name)")
            renamed[name] = self.options[name].coerce(value)
        for name, value in renamed.items():
            if why := self.options[name].problem(value):
                raise fail(f"{name}={value!r}{why}")
        merged = {**self.defaults, **renamed}
        for rule in self.rules:
            if not rule.holds(merged):
                raise fail(rule.message(merged) if callable(rule.message) else rule.message)
        return renamed

    def check_graph(self, options: Mapping[str, Any], gm, has_data: bool, *, exact: bool = True) -> None:
        """Checks that need the model: the names an option lists exist, data is there when the options need
        it. `exact=False` (a recipe checked before an earlier pass has run) also accepts a name inside an
        existing module: a pass may replace a layer by a chain whose parts it names (`conv1` -> `conv1.0`)."""
        merged = {**self.defaults, **options}
        modules, nodes = _module_names(gm)
        for name, option in self.options.items():
            if option.graph and merged[name]:
                known = modules if option.graph == "modules" else modules | nodes
                unknown = sorted(n for n in merged[name] if n not in known and (exact or not _under(n, modules)))
                if unknown:
                    raise RecipeError(f"{name} names modules the model does not have: {unknown}",
                                      pass_name=self.pass_name)
        if not has_data and self.needs_data is not None and (why := self.needs_data(merged, gm)):
            raise PassError(f"needs data= ({why}): an iterable of (x, y) batches (e.g. a DataLoader)",
                            pass_name=self.pass_name)

    def table(self) -> list[tuple[str, str, str, str]]:
        """(name, default, valid values, help) per option, in signature order."""
        return [(n, repr(self.defaults[n]), self.options[n].describe(), self.options[n].help) for n in self.defaults]


def _under(name: str, modules: set[str]) -> bool:
    """Whether a dotted prefix of `name` is one of `modules`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _module_names(gm) -> tuple[set[str], set[str]]:
    """(module names, names of the nodes that call a module)."""
    return {name for name, _ in gm.named_modules() if name}, {n.name for n in gm.graph.nodes if n.op == "call_module"}


def schema_of(pass_module) -> Schema:
    """The schema a pass module declares (its decorated `run`)."""
    schema = getattr(pass_module.run, "schema", None)
    if not isinstance(schema, Schema):
        raise RecipeError(f"pass module {pass_module.__name__} declares no option schema (@OPTIONS.checks on run)")
    return schema


def check_graph(specs: Iterable, gm, has_data: bool, registry: Mapping) -> None:
    """Run every pass's graph checks on the traced model before the first pass starts (the first pass's names
    exactly; later passes' names may also lie inside a module an earlier pass can replace)."""
    for i, spec in enumerate(specs):
        schema_of(registry[spec.name]).check_graph(spec.options, gm, has_data, exact=i == 0)


# Options several passes share: one name, one meaning, one check.
def ignore_option(what: str = "module names left as they are", *, nodes: bool = False) -> Option:
    return Option("ignore", list, what, items=str, graph="nodes" if nodes else "modules")


CALIB_BATCHES = Option("calib_batches", int, "calibration batches read from the start of data", range=">= 1")
RECONSTRUCT = Option("reconstruct", bool, "least-squares re-fit of the layers after the change (needs data)")


def reconstruct_needs_data(options: Mapping[str, Any], gm: Any = None) -> str | None:
    """`needs_data` of a pass whose only use of data is `reconstruct=True`."""
    return "reconstruct=True re-fits on data" if options["reconstruct"] else None


def calib_samples_option(default_help: str, *, minimum: int = 1, aliases: tuple[str, ...] = ()) -> Option:
    return Option("calib_samples", int, default_help, range=f">= {minimum}", aliases=aliases)

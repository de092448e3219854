"""Recipes: which passes run, in which order, with which options.

A recipe is a list whose items are a pass name or a dict {"pass": name, **options}, a path to a TOML file
with [[pass]] tables holding the same keys, or the name of a built-in recipe in fxslim/recipes/. Every pass
name, option name and option value is checked against the pass's option schema (fxslim/options.py) before
anything runs; a mistake is a RecipeError that names the pass, the option and what is valid. This file never
runs a pass."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

import tomllib

from fxslim.errors import RecipeError
from fxslim.options import Schema, schema_of

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict = field(default_factory=dict)


class PassRegistry(Mapping[str, ModuleType]):
    """Pass name -> pass module, one per module of fxslim.passes (a pass's NAME is its file name). Names come
    from the package listing; a module is imported on first lookup, so a recipe that runs one pass does not
    import the others (tensorly, scipy's clustering: about half a second of CPU on a first call)."""

    def __init__(self) -> None:
        import fxslim.passes as pkg

        self._names = sorted(i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_"))
        self._loaded: dict[str, ModuleType] = {}

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self._loaded:
            if name not in self._names:
                raise KeyError(name)
            mod = importlib.import_module(f"fxslim.passes.{name}")
            if getattr(mod, "NAME", None) != name or not callable(getattr(mod, "run", None)):
                raise RecipeError(f"module fxslim.passes.{name} is not a pass: it needs NAME = {name!r} and run()")
            schema_of(mod)  # a pass without an option schema is refused on first lookup
            self._loaded[name] = mod
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


@cache
def registry() -> PassRegistry:
    """Every pass of fxslim.passes, keyed by NAME (imported when first looked up)."""
    return PassRegistry()


def pass_schema(name: str) -> Schema:
    """The option schema of pass `name`."""
    return schema_of(registry()[name])


def pass_options(name: str) -> dict[str, object]:
    """The options of pass `name` with their defaults."""
    return dict(pass_schema(name).defaults)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load_recipe(recipe) -> list[PassSpec]:
    """Normalise and validate a recipe (list, TOML path or built-in name) into PassSpecs."""
    if isinstance(recipe, (str, Path)):
        items = _read_toml(_find(recipe))
    elif isinstance(recipe, (list, tuple)):
        items = list(recipe)
    else:
        raise RecipeError(f"a recipe is a list, a TOML path or a built-in name, not {type(recipe).__name__}")
    specs = [_spec(item, i) for i, item in enumerate(items)]
    if not specs:
        raise RecipeError("the recipe is empty")
    return specs


def _find(recipe: str | Path) -> Path:
    path = Path(recipe)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return path
    builtin = RECIPES_DIR / f"{recipe}.toml"
    if builtin.exists():
        return builtin
    raise RecipeError(f"no recipe file or built-in recipe named {str(recipe)!r}; built-in: {builtin_recipes()}")


def _read_toml(path: Path) -> list:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
    if "pass" not in data or not isinstance(data["pass"], list):
        raise RecipeError(f"{path}: a recipe file needs [[pass]] tables, found keys {sorted(data)}")
    return data["pass"]


def _spec(item, position: int) -> PassSpec:
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, dict):
        if "pass" not in item:
            raise RecipeError(f"recipe item {position} has no 'pass' key: {item}")
        options = {k: v for k, v in item.items() if k != "pass"}
        name = item["pass"]
    else:
        raise RecipeError(f"recipe item {position} must be a pass name or a dict, not {type(item).__name__}")
    passes = registry()
    if name not in passes:
        raise RecipeError(f"unknown pass {name!r} (item {position}); valid passes: {', '.join(passes)}")
    return PassSpec(name, pass_schema(name).check(options))

"""The `fxslim` command line: `compress` a model with a recipe, `inspect` its graph and channel groups, list
the `passes`. It is a thin shell over the public API (trace, analyze, compress, export_onnx): it parses
arguments, imports the user's model factory, and turns every `FxslimError` into `error: <message>` with
exit code 2 (`FXSLIM_DEBUG=1` adds the traceback). It must never implement compression logic itself."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fxslim.errors import FxslimError, RecipeError

_FORMATTER = argparse.RawDescriptionHelpFormatter


class CliError(FxslimError):
    """A command-line input that cannot be used: a model factory that does not import, a bad checkpoint."""


# ---------------------------------------------------------------------------------------------- inputs
def load_object(spec: str, what: str = "--model") -> Callable:
    """The object named by `module:attribute` (dots allowed on both sides), e.g. `fxslim.zoo.models:DigitsResNet`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"{what} {spec!r} must look like 'package.module:factory'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script does not put the working directory on the path
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise CliError(f"{what} {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def call_factory(spec: str, what: str = "--model"):
    """Call the factory named by `spec` with no arguments."""
    factory = load_object(spec, what)
    try:
        return factory()
    except Exception as exc:
        name = spec.partition(":")[2]
        raise CliError(f"{what} {spec!r}: calling {name}() failed: {type(exc).__name__}: {exc}") from exc


def load_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """The model built by factory `spec`, with the state_dict at `checkpoint` loaded (weights only)."""
    model = call_factory(spec)
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CliError(f"--checkpoint {checkpoint!r}: cannot load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(state, dict):
            raise CliError(f"--checkpoint {checkpoint!r} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise CliError(f"--checkpoint {checkpoint!r} does not fit --model {spec!r}: {exc}") from exc
    return model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    """`1,3,32,32` -> (1, 3, 32, 32); an argparse type, so a bad value is a usage error."""
    try:
        shape = tuple(int(s) for s in text.replace(" ", "").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32 (positive integers, comma-separated)")
    return shape


def example_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def resolve_recipe(value: str):
    """A recipe TOML path, a built-in recipe name, or a comma-separated list of pass names (checked here,
    so that a typo lists the passes and the built-in recipes at once)."""
    from fxslim.recipe import builtin_recipes, registry

    if value.endswith(".toml") or Path(value).exists():
        return Path(value)
    if value in builtin_recipes():
        return value
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry()]
    if not names or unknown:
        raise RecipeError(
            f"--recipe {value!r}: unknown pass {(unknown or [value])[0]!r}; it is not a .toml file, a built-in "
            f"recipe ({', '.join(builtin_recipes()) or 'none'}) or a comma-separated list of passes; "
            f"valid passes: {', '.join(registry())}"
        )
    return names


def load_data(spec: str | None):
    """Batches from the `--data` factory: an iterable of (x, y), or a (train, test) pair whose train is used."""
    if spec is None:
        return None
    data = call_factory(spec, "--data")
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], torch.Tensor):
        data = data[0]
    return data


# -------------------------------------------------------------------------------------------- commands
def cmd_compress(args: argparse.Namespace) -> int:
    import fxslim
    from fxslim.recipe import load_recipe

    recipe = resolve_recipe(args.recipe)
    load_recipe(recipe)  # every option checked before the model and the data are loaded
    model = load_model(args.model, args.checkpoint)
    x = example_input(args.input_shape, args.seed)
    res = fxslim.compress(model, (x,), recipe, data=load_data(args.data), dump_dir=args.dump_dir, seed=args.seed)
    print(res.summary())
    if args.dump_dir:
        print(f"IR dumps: {args.dump_dir}/")
    if args.onnx:
        error = fxslim.export_onnx(res.module, (x,), args.onnx)
        print(f"ONNX: {args.onnx} (onnxruntime vs PyTorch max abs error {error:.2e})")
    if args.save:
        path = Path(args.save)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(res.module, path)
        except OSError as exc:
            raise CliError(f"--save {args.save!r}: {exc}") from exc
        print(f"saved GraphModule: {path} (load with torch.load(path, weights_only=False))")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import fxslim
    from fxslim.dump import format_ir
    from fxslim.graph.cost import annotate

    model = load_model(args.model, args.checkpoint)
    x = example_input(args.input_shape, args.seed)
    gm = fxslim.trace(model, (x,))
    shape = ",".join(map(str, args.input_shape))
    print(format_ir(gm, annotate(gm, (x,)), f"{args.model} on input {shape}"), end="")
    dg = fxslim.analyze(gm, (x,))
    print("\ndependency groups:")
    print(dg.summary())
    names = ", ".join(f"{u.node} ({u.target})" for u in dg.unsupported)
    print(f"unsupported ops: {names or 'none (every op has a channel rule)'}")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from fxslim.recipe import builtin_recipes, pass_schema, registry

    print('passes (in a recipe: a name, or {"pass": name, option: value, ...}):\n')
    for name, module in registry().items():
        print(f"  {name}")
        print(textwrap.fill(_first_sentence(name, module), 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
        rows = pass_schema(name).table()
        if not rows:
            print("      options: (none)")
        for option, default, valid, help_text in rows:
            print(f"      {option} = {default}   [{valid}]")
            print(textwrap.fill(help_text, 100, initial_indent=" " * 10, subsequent_indent=" " * 10))
    print(f"\nbuilt-in recipes (--recipe NAME): {', '.join(builtin_recipes()) or '(none yet)'}")
    return 0


def _first_sentence(name: str, module) -> str:
    doc = inspect.getdoc(module) or inspect.getdoc(module.run) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=\.)\s(?=[A-Z])", paragraph, maxsplit=1)[0]
    return re.sub(rf"^Pass `{re.escape(name)}`:\s*", "", sentence) or "(no description)"


# ---------------------------------------------------------------------------------------------- parser
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="import path of a callable that returns the nn.Module, called with no arguments "
        "(e.g. fxslim.zoo.models:DigitsResNet); the working directory is importable",
    )
    p.add_argument(
        "--input-shape",
        required=True,
        type=parse_shape,
        metavar="N,C,H,W",
        help="shape of the random example input used for tracing, costs and checks",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a state_dict saved with torch.save(model.state_dict(), PATH), loaded weights-only",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the example input and of the passes (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxslim",
        formatter_class=_FORMATTER,
        description="fxslim: compress a trained PyTorch model by rewriting its torch.fx graph.",
        epilog="examples:\n"
        "  fxslim passes\n"
        "  fxslim inspect --model fxslim.zoo.models:DigitsResNet --input-shape 1,1,8,8\n"
        "  fxslim compress --model fxslim.zoo.models:DigitsResNet --input-shape 1,1,8,8 \\\n"
        "      --recipe fold_bn,prune_channels --dump-dir out/ir --onnx out/model.onnx\n\n"
        "Run 'fxslim COMMAND --help' for the options of a command. FXSLIM_DEBUG=1 shows tracebacks\n"
        "and each pass's decisions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "compress",
        formatter_class=_FORMATTER,
        help="run a recipe of passes on a model, export the result",
        description="Trace the model, run the recipe's passes in order (each pass is timed, its params/MACs\n"
        "recounted and the output shapes checked), print the per-pass table, and optionally\n"
        "write IR dumps, an ONNX file (checked against PyTorch in onnxruntime) and the\n"
        "compressed GraphModule.",
        epilog="--recipe takes one of:\n"
        "  - a comma-separated list of pass names, run with default options: fold_bn,prune_channels\n"
        "  - the name of a built-in recipe (listed by 'fxslim passes')\n"
        "  - a TOML file with one [[pass]] table per pass, options as keys:\n"
        "        [[pass]]\n"
        '        pass = "prune_channels"\n'
        "        ratio = 0.3\n"
        "        [[pass]]\n"
        '        pass = "fold_bn"\n\n'
        "Passes that need data (finetune, bn_recalibrate) need --data.\n\n"
        "example:\n"
        "  fxslim compress --model fxslim.zoo.models:DigitsResNet --input-shape 1,1,8,8 \\\n"
        "      --recipe fold_bn,prune_channels --dump-dir out/ir --onnx out/model.onnx --save out/model.pt\n"
        "  fxslim compress --model mypkg.nets:build --checkpoint state.pt --input-shape 1,3,32,32 \\\n"
        "      --recipe recipe.toml --data mypkg.data:train_loader",
    )
    _add_model_args(p)
    p.add_argument(
        "--recipe",
        required=True,
        metavar="RECIPE",
        help="a .toml recipe file, a built-in recipe name, or pass names joined by commas",
    )
    p.add_argument(
        "--data",
        metavar="MODULE:FACTORY",
        help="callable (no arguments) returning an iterable of (x, y) batches, or a (train, test) "
        "pair (train is used); needed by finetune and bn_recalibrate",
    )
    p.add_argument("--dump-dir", metavar="DIR", help="write numbered IR dumps (000_input.txt, 001_<pass>.txt, ...)")
    p.add_argument("--onnx", metavar="PATH", help="export the compressed model to ONNX and check its parity")
    p.add_argument("--save", metavar="PATH", help="torch.save the compressed GraphModule to PATH")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "inspect",
        formatter_class=_FORMATTER,
        help="print a model's graph with costs and its channel groups",
        description="Trace the model and print one row per graph node (op, target, output shape, params,\n"
        "MACs), then the dependency groups: the sets of coupled channels that passes remove or\n"
        "merge together (frozen ones say why), and the ops with no channel rule.",
        epilog="example:\n  fxslim inspect --model fxslim.zoo.models:DigitsResNet --input-shape 1,1,8,8",
    )
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "passes",
        formatter_class=_FORMATTER,
        help="list the passes, their options and the built-in recipes",
        description="List every registered pass with what it does and its options (with defaults),\n"
        "and the built-in recipes usable as --recipe NAME.",
        epilog="example:\n  fxslim passes",
    )
    p.set_defaults(func=cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage or fxslim error)."""
    from fxslim.pass_api import debug_enabled

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors: return the code instead of leaving the caller
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except FxslimError as exc:
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

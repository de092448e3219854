"""Pass `finetune`: train a copy of the rewritten model on `ctx.data` to win back the accuracy that
compression cost, with cross entropy on class-index targets, optionally distilled from the untouched
reference model (Hinton et al. 2015), optionally with a LR schedule and early stopping on held-out batches.
With `adaptive=True` it first measures the accuracy drop against the reference on the held-out batches and
trains only when the drop exceeds `min_drop` (the equivariant-pruning paper's rule: fine-tune when the
drop is over 2 points, Adam 1e-3, ReduceLROnPlateau(0.5, patience 10), at most 50 epochs, early stopping,
optional distillation at T=4; the recipe gives those options, see `PAPER_ADAPTIVE`; `COSINE_ADAPTIVE` is the
same gate with a cosine schedule, for cuts that leave the model near chance).
It is the only pass that changes weights by gradient descent; it never mutates the GraphModule it is given
or the reference, never changes the caller's global RNG state, and prints nothing but a tqdm bar (shown
only on a terminal)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from torch import fx

from fxslim import symmetry
from fxslim.errors import PassError
from fxslim.module_state import device_of
from fxslim.options import Option, Schema, finite
from fxslim.pass_api import PassContext, PassResult
from fxslim.training import OPTIMIZERS, SCHEDULERS, evaluate_accuracy, fit, fit_record_empty

NAME = "finetune"

# The equivariant-pruning paper's adaptive fine-tune as recipe options (kd_temperature=4.0 adds its KD).
PAPER_ADAPTIVE = {
    "adaptive": True,
    "min_drop": 0.02,
    "epochs": 50,
    "lr": 1e-3,
    "optimizer": "adam",
    "scheduler": "plateau",
    "patience": 15,
}

# The same gate with a cosine schedule from a higher rate, no early stopping: what a whole-field cut of a
# C4 net needs (every field matters there, so the cut model starts near chance and the fine-tune retrains).
# Fields 50% of the rotated-digits C4 net (tools/bench_equivariant.py): the paper's options end 1.7 points
# below the 60-epoch baseline, these 1.9 above it, yet 3.9 below the unpruned net given the same fine-tune.
# One-off checks of the choice: Adam 1e-3 with the same cosine ended at +0.0, 50 epochs at 3e-3 at -0.3.
COSINE_ADAPTIVE = {
    "adaptive": True,
    "min_drop": 0.02,
    "epochs": 100,
    "lr": 3e-3,
    "optimizer": "adam",
    "scheduler": "cosine",
}


OPTIONS = Schema(
    Option("epochs", int, "passes over the training batches (an upper bound with patience)", range=">= 0"),
    Option("lr", float, "learning rate", range=">= 0", check=finite),
    Option("optimizer", str, "adam, or sgd (momentum 0.9, Nesterov)", choices=OPTIMIZERS),
    Option("weight_decay", float, "L2 penalty handed to the optimizer", range=">= 0", check=finite),
    Option("scheduler", str, "LR schedule: step (StepLR), cosine, plateau (ReduceLROnPlateau); None: constant",
           choices=tuple(s for s in SCHEDULERS if s), none=True),
    Option("step_size", int, "epochs between LR decays of the step scheduler", range=">= 1"),
    Option("gamma", float, "LR decay factor of the step scheduler", range="(0, 1]"),
    Option("kd_temperature", float, "distil from the untouched model at this temperature; None: labels only",
           range="> 0", none=True, check=finite),
    Option("kd_alpha", float, "weight of the distillation term", range="[0, 1]"),
    Option("patience", int, "early stopping after this many epochs without a better val accuracy; None: off",
           range=">= 1", none=True),
    Option("val_fraction", float, "fraction of the batches held out for validation", range="(0, 1)"),
    Option("max_batches_per_epoch", int, "cap on the training batches per epoch; None: all", range=">= 1",
           none=True),
    Option("adaptive", bool, "train only when the accuracy drop against the untouched model exceeds min_drop"),
    Option("min_drop", float, "the accuracy drop (0.02 = 2 points) that triggers training when adaptive",
           range="[0, 1)"),
    needs_data=lambda o, gm: "the training batches",
)


@OPTIONS.checks
def run(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    scheduler: str | None = None,
    step_size: int = 10,
    gamma: float = 0.8,
    kd_temperature: float | None = None,
    kd_alpha: float = 0.5,
    patience: int | None = None,
    val_fraction: float = 0.1,
    max_batches_per_epoch: int | None = None,
    adaptive: bool = False,
    min_drop: float = 0.02,
) -> PassResult:
    """Train a copy of `gm` on `ctx.data` and return it in eval mode.

    epochs: passes over the training batches (an upper bound when `patience` is set).
    lr: learning rate.
    optimizer: "adam" or "sgd" (momentum 0.9, Nesterov).
    weight_decay: L2 penalty handed to the optimizer.
    scheduler: None, "step" (StepLR), "cosine" (cosine annealing over `epochs`) or "plateau"
        (ReduceLROnPlateau on the validation loss, factor 0.5, patience 10 epochs).
    step_size: epochs between LR decays of the "step" scheduler (10: the FCOS paper's setting).
    gamma: LR decay factor of the "step" scheduler (0.8: the FCOS paper's setting).
    kd_temperature: distil from `ctx.reference` at this temperature; None trains on the labels alone.
    kd_alpha: weight of the distillation term, loss = (1 - a) * CE + a * T^2 * KL(teacher_T || student_T).
    patience: stop after this many epochs without a better validation accuracy, keeping the best weights;
        None trains all `epochs`.
    val_fraction: fraction of the batches (the last ones, at least one) held out when `patience` or the
        "plateau" scheduler needs a validation score. Pass data in a fixed order (a list, or a DataLoader
        without shuffle) for the held-out batches to stay the same from epoch to epoch.
    max_batches_per_epoch: cap on the training batches per epoch; None uses them all.
    adaptive: first score `gm` and `ctx.reference` on the held-out batches (`val_fraction`) and train only
        when the reference's accuracy minus `gm`'s exceeds `min_drop`; otherwise `gm` is returned unchanged.
    min_drop: the accuracy drop (a fraction: 0.02 = 2 points) that triggers training when `adaptive`.

    With `adaptive`, the record also holds "reference_acc", "acc_before", "drop_before", "trained" (bool)
    and "acc_after" (held-out accuracy of the returned model).
    record: {"epochs": int, "steps": int, "final_train_loss": float | None, "final_train_acc": float | None,
    "best_val_acc": float | None, "stopped_early": bool}.
    """
    opts = Options(**{k: v for k, v in locals().items() if k not in ("gm", "ctx")})
    data = ctx.require_data(NAME)
    if kd_temperature is not None and ctx.reference is None:
        raise PassError("kd_temperature is set but ctx.reference (the teacher) is None")
    if adaptive and ctx.reference is None:
        raise PassError("adaptive=True compares with ctx.reference, which is None")
    return _adaptive(gm, ctx, data, opts) if adaptive else _train(gm, ctx, data, opts)


def _train(gm: fx.GraphModule, ctx: PassContext, data: Iterable, opts: Options) -> PassResult:
    """Train a copy of `gm` with `opts` (the adaptive gate, if any, has already decided to train)."""
    gm = copy.deepcopy(gm)
    home = device_of(gm)
    gm.to(ctx.device)
    if not any(p.requires_grad for p in gm.parameters()) or opts.epochs == 0:
        gm.eval().to(home)
        return PassResult(gm, changed=False, record=fit_record_empty())
    # A copy of the teacher: moving or switching the reference to eval would mutate the caller's model.
    teacher = copy.deepcopy(ctx.reference).to(ctx.device).eval() if opts.kd_temperature is not None else None
    needs_val = opts.patience is not None or opts.scheduler == "plateau"
    # A model that declares a symmetry group (e2cnn) trains by projected gradient descent: its convs are
    # projected back onto the equivariant subspace before every forward, so the invariance survives.
    hook = None
    if symmetry.declared_group(gm):
        if not symmetry.can_project(gm):
            raise PassError(
                f"training would break the declared {gm.meta['group']} symmetry; "
                "only C4 models with regular or trivial fields are kept equivariant"
            )
        hook = gm.register_forward_pre_hook(lambda module, args: symmetry.project_(module))
    record = fit(
        gm,
        lambda epoch: _split_epoch(data, needs_val, opts.val_fraction, opts.max_batches_per_epoch),
        **{k: getattr(opts, k) for k in _FIT_OPTIONS},
        teacher=teacher,
        seed=ctx.seed,
        device=ctx.device,
        desc=NAME,
    )
    if hook is not None:
        hook.remove()
        symmetry.project_(gm)
        record["symmetrized"] = True
    gm.eval().to(home)
    ctx.debug("finetune: %s", record)
    return PassResult(gm, changed=record["steps"] > 0, record=record)


def _adaptive(gm: fx.GraphModule, ctx: PassContext, data: Iterable, opts: Options) -> PassResult:
    """Train only when the held-out accuracy drop against the reference exceeds `min_drop` (paper step 5)."""
    _, val = _split_epoch(data, True, opts.val_fraction, None)
    # Scoring switches a module to eval and moves it: copies, never the caller's modules.
    ref_acc = evaluate_accuracy(copy.deepcopy(ctx.reference).to(ctx.device), val, ctx.device)
    before = evaluate_accuracy(copy.deepcopy(gm).to(ctx.device), val, ctx.device)
    gate = {"reference_acc": ref_acc, "acc_before": before, "drop_before": ref_acc - before}
    ctx.debug("finetune adaptive: %s (min_drop %s)", gate, opts.min_drop)
    if ref_acc - before <= opts.min_drop:
        return PassResult(gm, False, {**fit_record_empty(), **gate, "trained": False, "acc_after": before})
    res = _train(gm, ctx, data, opts)
    after = evaluate_accuracy(copy.deepcopy(res.module).to(ctx.device), val, ctx.device)
    return PassResult(res.module, res.changed, {**res.record, **gate, "trained": True, "acc_after": after})


def _split_epoch(data: Iterable, needs_val: bool, val_fraction: float, max_batches: int | None) -> tuple[list, list]:
    """This epoch's (training, held-out) batches: the data iterated once, the last batches held out."""
    if not needs_val:
        train = list(itertools.islice(data, max_batches) if max_batches is not None else data)
        val: list = []
    else:
        batches = list(data)
        n_val = max(1, int(len(batches) * val_fraction))
        if n_val >= len(batches):
            raise PassError(
                f"{len(batches)} batch(es) cannot be split into training and validation; "
                "give more batches, or drop patience / the plateau scheduler"
            )
        train, val = batches[:-n_val], batches[-n_val:]
        if max_batches is not None:
            train = train[:max_batches]
    if not train:
        raise PassError(
            "ctx.data yielded no training batches (it must be re-iterable each epoch: "
            "a list or a DataLoader, not a generator)"
        )
    return train, val


# The options the training loop (fxslim.training.fit) takes under the same names.
_FIT_OPTIONS = ("epochs", "lr", "optimizer", "weight_decay", "scheduler", "step_size", "gamma", "kd_temperature",
                "kd_alpha", "patience")


@dataclass(frozen=True)
class Options:
    """The pass's options (documented on `run`), checked once and handed to the gate and the trainer."""

    epochs: int
    lr: float
    optimizer: str
    weight_decay: float
    scheduler: str | None
    step_size: int
    gamma: float
    kd_temperature: float | None
    kd_alpha: float
    patience: int | None
    val_fraction: float
    max_batches_per_epoch: int | None
    adaptive: bool
    min_drop: float

"""Option schemas: every value of every pass is checked before the first pass starts (a bad value in the last
pass of a recipe that begins with a fine-tune fails at once, naming the pass, option, value and valid range),
graph checks run right after tracing, each pass's schema matches its `run`, and `fxslim passes` shows it."""

import time

import pytest
import torch
from torch import nn

import fxslim
from fxslim.cli import main
from fxslim.errors import PassError, RecipeError
from fxslim.options import Interval, Option, Schema
from fxslim.recipe import load_recipe, pass_schema, registry


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class CountingData:
    """Batches that count how often they were iterated: the proof that no pass started."""

    def __init__(self) -> None:
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            yield torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


@pytest.mark.parametrize(
    "last, match",
    [
        ({"pass": "lowrank_conv", "method": "bogus"}, r"pass 'lowrank_conv': method='bogus'; valid: tucker, cp, tt, a"),
        ({"pass": "prune_channels", "ratio": 1.5}, r"pass 'prune_channels': ratio=1.5 must be a number in \[0, 1\)"),
        ({"pass": "quantize", "calib_batches": 0}, r"pass 'quantize': calib_batches=0 must be an integer >= 1"),
    ],
)
def test_a_bad_value_in_the_last_pass_fails_before_the_first_fine_tune(last, match) -> None:
    data = CountingData()
    recipe = [{"pass": "finetune", "epochs": 3}, "prune_channels", last]
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=match):
        fxslim.compress(Net(), (torch.randn(1, 3, 8, 8),), recipe, data=data)
    assert time.perf_counter() - t0 < 1.0
    assert data.iterations == 0


def test_graph_checks_run_after_tracing_before_any_pass() -> None:
    data = CountingData()
    x = (torch.randn(1, 3, 8, 8),)
    with pytest.raises(RecipeError, match=r"pass 'prune_channels': ignore names modules .* not have: \['nope'\]"):
        fxslim.compress(Net(), x, [{"pass": "finetune", "epochs": 1}, {"pass": "prune_channels", "ignore": ["nope"]}],
                        data=data)
    assert data.iterations == 0
    # reconstruct=True without data: a PassError before the first pass (fold_bn would otherwise run first)
    with pytest.raises(PassError, match=r"pass 'prune_channels': needs data= \(reconstruct=True"):
        fxslim.compress(Net().eval(), x, ["fold_bn", {"pass": "prune_channels", "reconstruct": True}])
    with pytest.raises(PassError, match=r"pass 'finetune': needs data="):
        fxslim.compress(Net(), x, ["fold_bn", "finetune"])


def test_types_ranges_choices_rules_and_former_names() -> None:
    schema = pass_schema("finetune")
    assert schema.check({"epochs": 0}) == {"epochs": 0}
    for bad, match in [
        ({"epochs": "3"}, r"epochs='3' must be an integer >= 0"),
        ({"epochs": True}, r"epochs=True must be an integer >= 0"),
        ({"lr": float("nan")}, r"lr=nan must be a number >= 0"),
        ({"scheduler": "linear"}, r"scheduler='linear'; valid: step, cosine, plateau"),
        ({"patience": 0}, r"patience=0 must be None or an integer >= 1"),
        ({"epoch": 3}, r"no option 'epoch'; valid options: epochs, lr"),
        ({"lr": None}, r"lr=None must not be None"),
    ]:
        with pytest.raises(RecipeError, match=match):
            schema.check(bad)
    assert pass_schema("finetune").check({"scheduler": None}) == {"scheduler": None}
    # a rule across options
    with pytest.raises(RecipeError, match="give exactly one of epsilon"):
        load_recipe([{"pass": "fcos_fuse", "threshold": 0.2}])
    assert load_recipe([{"pass": "fcos_fuse", "epsilon": None, "threshold": 0.2}])[0].options["threshold"] == 0.2
    # a former name is renamed, with a warning
    with pytest.warns(FutureWarning, match="'batches' is now called 'calib_batches'"):
        spec = load_recipe([{"pass": "bn_recalibrate", "batches": 4}])[0]
    assert spec.options == {"calib_batches": 4}
    with pytest.raises(RecipeError, match="given twice"), pytest.warns(FutureWarning):
        load_recipe([{"pass": "bn_recalibrate", "batches": 4, "calib_batches": 4}])


def test_every_pass_schema_names_exactly_its_run_options_and_accepts_its_defaults() -> None:
    for name in registry():
        schema = pass_schema(name)
        assert list(schema.defaults) == [row[0] for row in schema.table()]
        assert set(schema.defaults) == set(schema.options), name
        assert schema.check({}) == {}
        for option in schema.options.values():
            assert option.help and option.describe(), (name, option.name)


def test_a_schema_that_disagrees_with_run_is_refused_at_import() -> None:
    schema = Schema(Option("ratio", float, "fraction", range="[0, 1)"))
    with pytest.raises(TypeError, match="schema"):

        @schema.checks
        def run(gm, ctx, *, ratio=0.5, extra=1):
            return gm

    with pytest.raises(TypeError, match=r"default ratio=2.0 must be a number in \[0, 1\)"):

        @Schema(Option("ratio", float, "fraction", range="[0, 1)")).checks
        def run2(gm, ctx, *, ratio=2.0):
            return gm


@pytest.mark.parametrize(
    "text, inside, outside",
    [("[0, 1)", [0, 0.5], [1, -0.1]), ("(0, 1]", [1, 1e-9], [0, 1.1]), (">= 1", [1, 1e9], [0.99]),
     ("> 0", [1e-9], [0])],
)
def test_intervals(text, inside, outside) -> None:
    interval = Interval.parse(text)
    assert all(x in interval for x in inside) and not any(x in interval for x in outside)


def test_cli_passes_prints_each_option_with_its_range(capsys) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "ratio = 0.5   [a number in [0, 1)]" in out
    assert "method = 'tucker'   [one of tucker, cp, tt, auto]" in out
    assert "calib_batches = 32   [an integer >= 1]" in out


def test_names_a_later_pass_lists_may_lie_inside_a_module_an_earlier_pass_replaces() -> None:
    x = (torch.randn(1, 3, 8, 8),)
    # lowrank_conv turns conv into the chain conv.0, conv.1, conv.2: a later pass may name its parts
    res = fxslim.compress(Net().eval(), x, [{"pass": "lowrank_conv", "rank": 0.5},
                                            {"pass": "magnitude_prune", "sparsity": 0.5, "ignore": ["conv.0"]}])
    layers = res.report[1].details["layers"]
    assert layers.keys() >= {"conv.1", "conv.2"} and "conv.0" not in layers
    with pytest.raises(RecipeError, match=r"ignore names modules the model does not have: \['conv.0'\]"):
        fxslim.compress(Net().eval(), x, [{"pass": "magnitude_prune", "ignore": ["conv.0"]}])  # the first pass: exact
    with pytest.raises(RecipeError, match=r"\['nope.0'\]"):
        fxslim.compress(Net().eval(), x, ["fold_bn", {"pass": "magnitude_prune", "ignore": ["nope.0"]}])


def test_list_options_take_one_string_or_a_set_and_data_is_needed_only_when_used() -> None:
    assert pass_schema("quantize").check({"fp32_modules": "conv"}) == {"fp32_modules": ["conv"]}
    assert pass_schema("prune_channels").check({"ignore": {"fc", "conv"}}) == {"ignore": ["conv", "fc"]}
    # a rank search needs data only when there is a layer to factorise
    res = fxslim.compress(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), (torch.randn(1, 3, 8, 8),), ["lowrank_linear"])
    assert not res.report[0].changed
    conv = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()  # its one conv ignored by node name: nothing to search
    res = fxslim.compress(conv, (torch.randn(1, 3, 8, 8),), [{"pass": "lowrank_conv", "ignore": ["_0"]}])
    assert not res.report[0].changed
    with pytest.raises(PassError, match=r"pass 'lowrank_conv': needs data= \(rank=None searches ranks"):
        fxslim.compress(Net().eval(), (torch.randn(1, 3, 8, 8),), ["lowrank_conv"])


def test_cross_option_errors_show_the_values() -> None:
    with pytest.raises(RecipeError, match=r"sparsity=0.3 contradicts pattern 2:4"):
        load_recipe([{"pass": "magnitude_prune", "sparsity": 0.3, "pattern": "2:4"}])
    with pytest.raises(RecipeError, match=r"max_ratio=0.2 must be in \[ratio, 1\) = \[0.5, 1\)"):
        load_recipe([{"pass": "prune_channels", "objective": "latency", "max_ratio": 0.2}])
    with pytest.raises(RecipeError, match=r"candidates only applies to method='auto', not 'tucker'"):
        load_recipe([{"pass": "lowrank_conv", "candidates": ["cp"]}])


def test_the_cli_checks_the_recipe_before_loading_the_model_or_the_data(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "slow_job.py").write_text(
        "def model():\n    raise AssertionError('model loaded before the recipe was checked')\n"
        "def data():\n    raise AssertionError('data loaded before the recipe was checked')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[pass]]\npass = "finetune"\n\n[[pass]]\npass = "lowrank_conv"\nmethod = "bogus"\n')
    code = main(["compress", "--model", "slow_job:model", "--input-shape", "1,3,8,8", "--recipe", str(recipe),
                 "--data", "slow_job:data"])
    assert code == 2
    assert "pass 'lowrank_conv': method='bogus'; valid: tucker, cp, tt, auto" in capsys.readouterr().err

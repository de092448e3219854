"""The `fxslim` command line, run in-process through `main([...])`: each subcommand on the zoo's
DigitsResNet, the files `compress` writes, and the exit code 2 + one-line message of every user error."""

from __future__ import annotations

import pytest
import torch

from fxslim.cli import main

MODEL = ["--model", "fxslim.zoo.models:DigitsResNet", "--input-shape", "2,1,8,8"]


def test_passes_lists_registered_passes_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "prune_channels" in out and "fold_bn" in out
    assert "ratio = 0.5   [a number in [0, 1)]" in out
    assert "importance = 'l1'   [one of l1, l2, bn_scale, random]" in out
    assert "built-in recipes" in out


@pytest.mark.parametrize("command", ["compress", "inspect", "passes"])
def test_every_command_has_help_with_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example" in out and f"fxslim {command}" in out


def test_inspect_prints_table_groups_and_unsupported_ops(capsys):
    assert main(["inspect", *MODEL]) == 0
    out = capsys.readouterr().out
    assert "stem_0" in out and "stem.0 (Conv2d)" in out and "2x32x8x8" in out  # node table with shapes
    assert "params: 77,290" in out
    assert "5 groups (4 prunable)" in out and "Group#0(size=32, prunable" in out
    assert "unsupported ops: none" in out


def test_compress_writes_dumps_onnx_and_a_loadable_module(tmp_path, capsys):
    dump, onnx_path, saved = tmp_path / "ir", tmp_path / "m.onnx", tmp_path / "m.pt"
    code = main(
        [
            "compress",
            *MODEL,
            "--recipe",
            "fold_bn,prune_channels",
            "--dump-dir",
            str(dump),
            "--onnx",
            str(onnx_path),
            "--save",
            str(saved),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "fold_bn" in out and "prune_channels" in out and "total" in out  # res.summary()
    assert "max abs error" in out
    assert sorted(p.name for p in dump.iterdir()) == ["000_input.txt", "001_fold_bn.txt", "002_prune_channels.txt"]
    assert onnx_path.stat().st_size > 0
    module = torch.load(saved, weights_only=False)
    assert isinstance(module, torch.fx.GraphModule)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = module(x)
    assert y.shape == (2, 10)
    from fxslim.export import ort_run, ort_session  # the saved module is the model that was exported

    assert torch.allclose(torch.from_numpy(ort_run(ort_session(onnx_path), x)[0]), y, atol=1e-5)
    assert sum(p.numel() for p in module.parameters()) < 77_290


def test_compress_reads_a_toml_recipe_and_a_checkpoint(tmp_path, capsys):
    from fxslim.zoo.models import DigitsResNet

    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\npass = "prune_channels"\nratio = 0.25\n')
    ckpt = tmp_path / "state.pt"
    torch.save(DigitsResNet().state_dict(), ckpt)
    assert main(["compress", *MODEL, "--recipe", str(recipe), "--checkpoint", str(ckpt)]) == 0
    assert "prune_channels" in capsys.readouterr().out


def test_bad_model_exits_2_naming_the_module(capsys):
    assert main(["compress", "--model", "nope:nothing", "--input-shape", "1,1,8,8", "--recipe", "fold_bn"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'nope'" in err and "Traceback" not in err


def test_missing_factory_exits_2_naming_the_attribute(capsys):
    assert main(["inspect", "--model", "fxslim.zoo.models:Nope", "--input-shape", "1,1,8,8"]) == 2
    assert "has no attribute 'Nope'" in capsys.readouterr().err


def test_unknown_pass_exits_2_listing_valid_passes(capsys):
    assert main(["compress", *MODEL, "--recipe", "fold_bn,prune_chanels"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'prune_chanels'" in err and "valid passes:" in err and "prune_channels" in err


def test_pass_error_without_data_is_a_one_line_error(capsys):
    assert main(["compress", *MODEL, "--recipe", "finetune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pass 'finetune'") and "Traceback" not in err


def test_fxslim_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("FXSLIM_DEBUG", "1")
    assert main(["inspect", "--model", "nope:nothing", "--input-shape", "1,1,8,8"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: --model 'nope:nothing'" in err


def test_bad_input_shape_is_a_usage_error(capsys):
    assert main(["inspect", "--model", "fxslim.zoo.models:DigitsResNet", "--input-shape", "1,x"]) == 2
    assert "not a shape" in capsys.readouterr().err

"""The pass registry: every module of fxslim.passes is a pass whose NAME is its file name; a recipe imports
only the passes it names (a fresh interpreter that runs prune_channels never imports the low-rank or FCOS
passes and their tensorly / scipy clustering dependencies); a module that is not a pass is a RecipeError."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from fxslim.errors import RecipeError
from fxslim.recipe import PassRegistry, registry


def test_every_listed_module_is_a_pass_named_after_its_file():
    reg = registry()
    assert "prune_channels" in reg and "lowrank_conv" in reg and "nope" not in reg
    assert len(reg) == len(list(reg)) >= 12
    for name, module in reg.items():
        assert module.NAME == name and callable(module.run)
    with pytest.raises(KeyError):
        reg["nope"]


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s
def test_one_pass_recipe_imports_only_that_pass():
    code = (
        "import sys, torch, fxslim\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))\n"
        "fxslim.compress(m.eval(), (torch.randn(1, 3, 8, 8),), ['prune_channels'])\n"
        "print(sorted(k for k in sys.modules if k.startswith('fxslim.passes.')))\n"
        "print('tensorly' in sys.modules, 'scipy.cluster' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['fxslim.passes.prune_channels']"
    assert out[1] == "False False"


def test_a_module_that_is_not_a_pass_is_a_recipe_error(monkeypatch):
    reg = PassRegistry()
    fake = types.ModuleType("fxslim.passes.helper")  # no NAME, no run
    monkeypatch.setitem(sys.modules, "fxslim.passes.helper", fake)
    monkeypatch.setattr(reg, "_names", [*reg._names, "helper"])
    with pytest.raises(RecipeError, match="fxslim.passes.helper is not a pass"):
        reg["helper"]

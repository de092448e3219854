"""tools/bench_lrf.py's reading of the curves: verdicts with the tie margin, and the models each task builds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_lrf as bl  # noqa: E402

from fxslim.zoo import models as zoo_models  # noqa: E402


@pytest.mark.parametrize(
    ("hybrid", "other", "verdict"),
    [
        ((725_972, True), (726_356, True), "ties"),  # one small layer apart: 0.05 % fewer MACs is not a win
        ((133_000, True), (143_000, True), "wins"),  # 7 % fewer
        ((143_000, True), (133_000, True), "loses"),
        ((1_000, True), (1_010, True), "ties"),  # exactly 1 % of the larger
        ((1_000, True), (1_011, True), "wins"),
        ((1_000, True), (1_005, False), "open"),  # within the margin of a "≤" bound: could be a loss
        ((900, True), (1_000, False), "open"),  # below a bound: the other's true value may be lower still
        ((1_100, False), (1_000, True), "open"),
        ((None, True), (1_000, True), "loses"),
        ((1_000, True), (None, True), "wins"),
    ],
)
def test_compare_with_the_tie_margin(hybrid, other, verdict):
    assert bl.compare(hybrid, other, bl.TIE_MARGIN) == verdict


def test_equal_accuracy_applies_the_margin():
    # Each curve: half its MACs at 50 % and its full point above the level, so the level (97 %) is read between
    # them at the same share of every curve's MACs and the margins between the curves carry over.
    base = {"macs": 1_000_000, "accuracy": 0.98}
    points = [
        {"variant": v, "similarity": s, "macs": m * f, "accuracy": a}
        for v, m in [("tucker", 500_000), ("cp", 496_000), ("tt", 700_000), ("hybrid", 497_000)]
        for s, f, a in [(0.5, 0.5, 0.5), (0.8, 1.0, 0.975)]
    ]
    (row,) = bl.equal_accuracy({"model": "m", "baseline": base, "points": points}, [1.0])
    assert row["macs"]["hybrid"][1] is True  # interpolated, not a bound
    assert row["macs"]["hybrid"][0] == pytest.approx(497_000 * (0.5 + 0.5 * 0.47 / 0.475))
    assert row["verdicts"] == {"hybrid": {"tucker": "ties", "cp": "ties", "tt": "wins"}}


def test_models_follow_the_image_task():
    args = bl.parse_args(["--models", "resnet20,resnet20_1d", "--image-task", "rotated_digits", "--image-size", "16"])
    (img, amr) = bl.chosen_models(args)
    assert img == ("ResNet-20 (rotated digits 16²)", "resnet20", "rotated_digits", {"in_ch": 1},
                   {"size": 16, "angles": "any"})
    assert amr[0] == "ResNet-20-1D (AMR)" and amr[2] == "amr"
    assert bl.chosen_models(bl.parse_args(["--models", "vgg_bn"]))[0][:3] == ("VGG-BN (digits)", "vgg_bn", "digits")


def test_hybrids_option_is_checked():
    assert bl.parse_args(["--hybrids", "hybrid"]).hybrids == ("hybrid",)
    with pytest.raises(SystemExit):
        bl.parse_args(["--hybrids", "hybrid,nope"])
    with pytest.raises(SystemExit):
        bl.parse_args(["--hybrids", "hybrid_ft"])


def test_models_option_defaults_to_the_issues_three_and_is_checked():
    assert [m[1] for m in bl.chosen_models(bl.parse_args([]))] == ["resnet20", "vgg_bn", "resnet20_1d"]
    extra = bl.chosen_models(bl.parse_args(["--models", "resnet56,densenet_small"]))
    assert [(m[0], m[2]) for m in extra] == [("ResNet-56 (digits)", "digits"), ("DenseNet-S (digits)", "digits")]
    assert all(m[3] == {"in_ch": 1} for m in extra)  # the digits are 1-channel images
    assert all(m[1] in zoo_models.MODELS for m in bl.MODELS)
    assert [m[1] for m in bl.chosen_models(bl.parse_args(["--models", "resnet20,"]))] == ["resnet20"]
    with pytest.raises(SystemExit):
        bl.parse_args(["--models", "resnet20,resnet21"])


def test_levels_above_the_baseline_are_labelled_as_such():
    base = {"macs": 1_000, "accuracy": 0.95}
    variants = ("tucker", "cp", "tt", "hybrid")
    points = [{"variant": v, "similarity": 0.7, "macs": 400, "accuracy": 0.97} for v in variants]
    rows = bl.equal_accuracy({"model": "m", "baseline": base, "points": points}, [1.0, -1.0])
    assert [r["level"] for r in rows] == [pytest.approx(0.94), pytest.approx(0.96)]
    table = bl.equal_accuracy_table(rows, {"m": 1_000})
    assert "94.00% (−1 pt)" in table and "96.00% (+1 pt)" in table

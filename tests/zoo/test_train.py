"""Training harness: trains once, caches weights keyed by the configuration, reloads them weights-only."""

from __future__ import annotations

import pytest
import torch

from fxslim.zoo.train import TrainConfig, checkpoint_path, evaluate, load_dataset, train_baseline


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSLIM_CACHE", str(tmp_path))


def test_trains_once_then_loads_the_cached_weights():
    config = TrainConfig(epochs=2, batch_size=64, patience=None)
    first = train_baseline("digits_resnet", "digits", config=config)
    assert not first.cached and first.path.exists() and first.info["record"]["epochs"] == 2
    assert first.info["eval"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    again = train_baseline("digits_resnet", "digits", config=config)
    assert again.cached and again.path == first.path
    for (k, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    state = torch.load(first.path, weights_only=True)  # what the harness itself does
    assert set(state) == {"state_dict", "info"}
    other = TrainConfig(epochs=3, batch_size=64, patience=None)
    assert checkpoint_path("digits_resnet", {"num_classes": 10}, "digits", {}, other) != first.path


def test_amr_evaluation_reports_per_snr_accuracy():
    ds = load_dataset("amr", batch_size=64, n_per_class_snr=5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 128, 11))
    out = evaluate(model, ds)
    assert sorted(out["per_snr"]) == list(range(-20, 20, 2))
    assert 0 <= out["accuracy_snr_ge10"] <= 1 and 0 <= out["accuracy"] <= 1
    assert ds.example().shape == (1, 2, 128) and ds.num_classes == 11


def test_unknown_dataset_is_a_clear_error():
    from fxslim.zoo.errors import DataError

    with pytest.raises(DataError, match="valid: amr, digits"):
        load_dataset("cifar")

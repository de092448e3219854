"""The synthetic AMR generator, its cache, splits and metrics, and the readers of the real RadioML files
(tested on small files written here in the real formats)."""

from __future__ import annotations

import pickle
import time

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from fxslim.errors import FxslimError
from fxslim.zoo import amr
from fxslim.zoo.amr import MODULATIONS, RML2018_CLASSES, SNRS, AMRData, Channel, DataError


@pytest.fixture(scope="module")
def small() -> amr.AMRParts:
    return amr.generate_parts(3, seed=0)


# ------------------------------------------------------------------------------------------- generator


def test_shapes_dtypes_and_unit_power(small):
    d = small.data
    n = 3 * len(MODULATIONS) * len(SNRS)
    assert d.x.shape == (n, 2, 128) and d.x.dtype == np.float32
    assert d.y.shape == (n,) and d.y.dtype == np.int64 and d.snr.shape == (n,) and d.snr.dtype == np.int64
    assert d.classes == list(MODULATIONS) and len(MODULATIONS) == 11
    assert np.isfinite(d.x).all()
    np.testing.assert_allclose((d.x**2).sum(axis=1).mean(axis=1), 1.0, rtol=1e-5)  # unit average power per frame
    assert amr.generate(1, length=1024, snrs=[0]).x.shape == (11, 2, 1024)


def test_every_class_and_snr_has_exactly_n_frames(small):
    d = small.data
    cells, counts = np.unique(np.stack([d.y, d.snr]), axis=1, return_counts=True)
    assert cells.shape[1] == 11 * 20 and (counts == 3).all()


def test_snr_labels_are_exactly_the_requested_grid(small):
    assert list(SNRS) == list(range(-20, 20, 2))
    assert sorted(set(small.data.snr.tolist())) == list(range(-20, 20, 2))
    d = amr.generate(2, snrs=(-4, 6), seed=3)
    assert sorted(set(d.snr.tolist())) == [-4, 6] and len(d) == 2 * 2 * 11


def test_seeded_determinism():
    a, b = amr.generate(2, seed=5), amr.generate(2, seed=5)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and np.array_equal(a.snr, b.snr)
    c = amr.generate(2, seed=6)
    assert np.array_equal(a.y, c.y) and not np.allclose(a.x, c.x)
    parts = amr.generate_parts(2, seed=5)
    assert np.array_equal(parts.data.x, a.x)  # the parts hook produces the very same frames


def test_measured_snr_of_each_frame_matches_its_label(small):
    """The frame is exactly signal + noise, and 10·log10(P_signal / P_noise) of each frame is its label."""
    d = small.data
    np.testing.assert_allclose(small.signal + small.noise, d.x, atol=1e-6)
    p_signal = (small.signal.astype(np.float64) ** 2).sum(axis=1).mean(axis=1)
    p_noise = (small.noise.astype(np.float64) ** 2).sum(axis=1).mean(axis=1)
    measured = 10 * np.log10(p_signal / p_noise)
    assert np.abs(measured - d.snr).max() < 1.0
    # the noise really is in the frame: at −20 dB it carries ~99% of the power, at 18 dB ~1.6%
    share = p_noise / (d.x.astype(np.float64) ** 2).sum(axis=1).mean(axis=1)
    assert share[d.snr == -20].min() > 0.95 and share[d.snr == 18].max() < 0.05
    # and it is white: the lag-1 autocorrelation of the noise is small, that of the pulse-shaped signal is not
    noise = small.noise[:, 0] + 1j * small.noise[:, 1]
    lag1 = np.abs(np.mean(noise[:, 1:] * noise[:, :-1].conj())) / np.mean(np.abs(noise) ** 2)
    assert lag1 < 0.05


def test_impairments_switch_off_cleanly():
    """Without channel impairments a BPSK frame is real up to one phase rotation, and its matched-filtered
    samples on the symbol grid land on ±1 (RRC·RRC is a Nyquist pulse)."""
    clean = Channel(max_cfo=0.0, multipath_taps=0, timing_offset=False)
    d = amr.generate_parts(4, snrs=[18], channel=clean, seed=1)
    z = d.signal[:, 0] + 1j * d.signal[:, 1]
    bpsk = z[d.data.y == MODULATIONS.index("BPSK")]
    # undo the random carrier phase: the phase of the frame's dominant axis
    bpsk = bpsk * np.exp(-0.5j * np.angle(np.sum(bpsk**2, axis=1, keepdims=True)))
    assert np.abs(bpsk.imag).max() < 1e-3 * np.abs(bpsk.real).max()
    matched = np.array([np.convolve(row.real, amr.rrc_taps(8), mode="same") for row in bpsk])
    symbols = matched[:, 48:-48:8]  # away from the frame edges, on the symbol grid (no timing offset)
    symbols /= np.abs(symbols).mean(axis=1, keepdims=True)
    assert np.abs(np.abs(symbols) - 1).max() < 0.05


@pytest.mark.parametrize("rolloff", [0.35, 0.25, 0.5])  # 0.25 and 0.5 put t = ±T/(4β) on a tap
def test_rrc_taps_are_a_root_nyquist_pulse(rolloff):
    h = amr.rrc_taps(8, 12, rolloff)
    assert len(h) == 97 and np.isfinite(h).all()
    assert np.allclose(h, h[::-1]) and np.isclose((h**2).sum(), 1.0)
    rc = np.convolve(h, h)
    centre = len(rc) // 2
    assert np.isclose(rc[centre], 1.0) and np.abs(rc[centre::8][1:]).max() < 0.01  # zero ISI (up to truncation)


def test_bad_arguments_raise_data_error():
    with pytest.raises(DataError, match="n_per_class_snr"):
        amr.generate(0)
    with pytest.raises(DataError, match="SNR"):
        amr.generate(1, snrs=[])
    assert issubclass(DataError, FxslimError)


# ----------------------------------------------------------------------------------------------- cache


def test_cache_round_trip_loads_the_npz(tmp_path, monkeypatch):
    kwargs = dict(n_per_class_snr=2, snrs=(0, 10), seed=4)
    first = amr.load_or_generate(tmp_path, **kwargs)
    files = list(tmp_path.glob("amr-*.npz"))
    assert files == [amr.cache_path(tmp_path, **kwargs)]

    def no_generation(*args, **kw):
        raise AssertionError("the cached file should have been loaded")

    monkeypatch.setattr(amr, "generate", no_generation)
    start = time.perf_counter()
    second = amr.load_or_generate(tmp_path, **kwargs)
    assert time.perf_counter() - start < 1.0
    for field in ("x", "y", "snr"):
        assert np.array_equal(getattr(first, field), getattr(second, field))
        assert getattr(first, field).dtype == getattr(second, field).dtype
    assert second.classes == first.classes == list(MODULATIONS)


def test_cache_key_covers_arguments_and_a_corrupt_file_is_regenerated(tmp_path):
    a = amr.cache_path(tmp_path, n_per_class_snr=2, seed=0)
    assert a == amr.cache_path(tmp_path, n_per_class_snr=2, seed=0, length=128)  # defaults filled in
    assert a != amr.cache_path(tmp_path, n_per_class_snr=2, seed=1)
    assert a != amr.cache_path(tmp_path, n_per_class_snr=2, seed=0, channel=Channel(max_cfo=0.0))
    path = amr.cache_path(tmp_path, n_per_class_snr=1, snrs=[0])
    path.write_bytes(b"not a zip file")
    d = amr.load_or_generate(tmp_path, n_per_class_snr=1, snrs=[0])
    assert np.array_equal(d.x, amr.generate(1, snrs=[0]).x)
    assert np.load(path)["x"].shape == (11, 2, 128)  # rewritten
    with pytest.raises(DataError, match="generate"):
        amr.load_or_generate(tmp_path, n_per_class_snr=1, frames=3)


def test_default_cache_dir_follows_fxslim_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FXSLIM_CACHE", str(tmp_path))
    assert amr.default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("FXSLIM_CACHE")
    assert amr.default_cache_dir().parts[-3:] == (".cache", "fxslim", "data")


# -------------------------------------------------------------------------------- splits, loaders, metrics


def test_splits_are_stratified_disjoint_and_seeded():
    d = amr.generate(10, snrs=(0, 10))
    d.x[:, 0, 0] = np.arange(len(d))  # tag each frame so that it can be found again
    train, val, test = amr.splits(d, val=0.1, test=0.2, seed=0)
    tags = [s.x[:, 0, 0].astype(int) for s in (train, val, test)]
    assert sorted(np.concatenate(tags).tolist()) == list(range(len(d)))
    for part, per_cell in ((train, 7), (val, 1), (test, 2)):
        _, counts = np.unique(np.stack([part.y, part.snr]), axis=1, return_counts=True)
        assert len(counts) == 22 and (counts == per_cell).all()
    again = amr.splits(d, seed=0)[2]
    other = amr.splits(d, seed=1)[2]
    assert np.array_equal(again.x, test.x) and not np.array_equal(other.x, test.x)
    with pytest.raises(DataError):
        amr.splits(d, val=0.5, test=0.5)


def test_to_loader_batches():
    d = amr.generate(1, snrs=(0, 2, 4))  # 33 frames
    batches = amr.to_loader(d, batch_size=8)
    assert [len(y) for _, y in batches] == [8, 8, 8, 8, 1]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (8, 2, 128) and y.dtype == torch.int64
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(d.y))  # unshuffled: frame order
    shuffled = amr.to_loader(d, batch_size=8, shuffle=True, seed=0)
    ys = torch.cat([y for _, y in shuffled])
    assert sorted(ys.tolist()) == sorted(d.y.tolist()) and not torch.equal(ys, torch.from_numpy(d.y))
    assert torch.equal(
        torch.cat([x for x, _ in amr.to_loader(d, 8, shuffle=True, seed=0)]), torch.cat([x for x, _ in shuffled])
    )


def test_accuracy_per_snr_and_summary():
    d = AMRData(
        np.zeros((6, 2, 4), np.float32),
        np.array([0, 1, 2, 0, 1, 2]),
        np.array([-10, -10, 0, 0, 10, 12]),
        ["a", "b", "c"],
    )
    pred = np.array([0, 0, 2, 1, 1, 2])  # right at −10: 1/2, at 0: 1/2, at 10: 1/1, at 12: 1/1
    assert amr.accuracy_per_snr(pred, d) == {-10: 0.5, 0: 0.5, 10: 1.0, 12: 1.0}
    assert amr.summary_accuracy(pred, d) == {"overall": 4 / 6, "high_snr": 1.0}
    logits = np.eye(3)[pred] * 5.0
    assert amr.summary_accuracy(logits, d) == amr.summary_accuracy(pred, d)
    with pytest.raises(DataError, match="shape"):
        amr.accuracy_per_snr(pred[:3], d)


# ------------------------------------------------------------------------------------------ RML2016 pickle


def _rml2016_dict(length: int = 128) -> dict:
    rng = np.random.default_rng(0)
    names = ["QAM16", "QAM64", "8PSK", "WBFM", "BPSK", "CPFSK", "AM-DSB", "GFSK", "PAM4", "QPSK", "AM-SSB"]
    return {(m, s): rng.standard_normal((3, 2, length)).astype(np.float32) for m in names for s in (-2, 4)}


def test_rml2016_round_trip(tmp_path):
    content = _rml2016_dict()
    path = tmp_path / "RML2016.10a_dict.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))  # the original is a Python 2 pickle (protocol 2)
    d = amr.load_rml2016(path)
    assert d.classes == list(MODULATIONS)  # QAM16/QAM64 read as 16QAM/64QAM: indices match the synthetic set
    assert d.x.shape == (11 * 2 * 3, 2, 128) and d.x.dtype == np.float32 and d.y.dtype == np.int64
    for (mod, snr), frames in content.items():
        name = {"QAM16": "16QAM", "QAM64": "64QAM"}.get(mod, mod)
        rows = (d.y == MODULATIONS.index(name)) & (d.snr == snr)
        assert np.array_equal(d.x[rows], frames)


def test_rml2016_other_names_and_bytes_keys(tmp_path):
    rng = np.random.default_rng(1)
    content = {(b"ZED", 0): rng.standard_normal((2, 2, 16)), (b"ALPHA", 0): rng.standard_normal((1, 2, 16))}
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))
    d = amr.load_rml2016(path)
    assert d.classes == ["ALPHA", "ZED"] and d.y.tolist() == [0, 1, 1]
    assert np.allclose(d.x[0], content[(b"ALPHA", 0)][0])


def test_rml2016_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        amr.load_rml2016(tmp_path / "missing.pkl")
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(pickle.dumps(_rml2016_dict(), protocol=2)[:1000])  # truncated
    with pytest.raises(DataError, match="not a readable pickle"):
        amr.load_rml2016(corrupt)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x00\x01 this is no pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        amr.load_rml2016(garbage)
    cases = {
        "list.pkl": ([1, 2, 3], "dict"),
        "key.pkl": ({"BPSK": np.zeros((1, 2, 128))}, "not a .modulation, snr. pair"),
        "shape.pkl": ({("BPSK", 0): np.zeros((1, 3, 128))}, r"shape \(1, 3, 128\)"),
        "lengths.pkl": ({("BPSK", 0): np.zeros((1, 2, 128)), ("QPSK", 0): np.zeros((1, 2, 64))}, "lengths"),
        "snr.pkl": ({("BPSK", "high"): np.zeros((1, 2, 128))}, "non-integer SNR"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(content, protocol=2))
        with pytest.raises(DataError, match=message):
            amr.load_rml2016(path)


# ------------------------------------------------------------------------------------------- RML2018 HDF5


def _write_rml2018(path, n: int = 30, length: int = 64, drop: str | None = None, **override) -> dict:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 24, size=n)
    arrays = {
        "X": rng.standard_normal((n, length, 2)).astype(np.float32),
        "Y": np.eye(24, dtype=np.int64)[labels],
        "Z": rng.choice(np.arange(-20, 32, 2), size=(n, 1)).astype(np.int64),
    }
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if key != drop:
                f.create_dataset(key, data=value)
    return arrays


def test_rml2018_round_trip(tmp_path):
    path = tmp_path / "GOLD_XYZ_OSC.0001_1024.hdf5"
    arrays = _write_rml2018(path)
    d = amr.load_rml2018(path, chunk=7)  # several chunks
    assert d.classes == list(RML2018_CLASSES) and len(d.classes) == 24 and d.classes[0] == "OOK"
    assert d.x.shape == (30, 2, 64) and d.x.dtype == np.float32
    assert np.array_equal(d.x, arrays["X"].transpose(0, 2, 1))
    assert np.array_equal(d.y, arrays["Y"].argmax(axis=1)) and np.array_equal(d.snr, arrays["Z"][:, 0])
    kept = amr.load_rml2018(path, snrs=[0, 10, 20], chunk=4)
    rows = np.isin(arrays["Z"][:, 0], [0, 10, 20])
    assert np.array_equal(kept.x, d.x[rows]) and np.array_equal(kept.y, d.y[rows]) and set(kept.snr) <= {0, 10, 20}


def test_rml2018_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        amr.load_rml2018(tmp_path / "missing.hdf5")
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))  # HDF5 signature, garbage after
    with pytest.raises(DataError, match="not a readable HDF5"):
        amr.load_rml2018(corrupt)
    cases = [
        (dict(drop="Z"), r"missing dataset\(s\) \['Z'\]"),
        (dict(X=np.zeros((30, 64, 3), np.float32)), r"X has shape \(30, 64, 3\)"),
        (dict(Y=np.zeros((30, 11), np.int64)), r"Y has shape \(30, 11\)"),
        (dict(Y=np.ones((30, 24), np.int64)), "not one-hot"),
        (dict(Z=np.zeros((29, 1), np.int64)), r"Z has shape \(29, 1\)"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.hdf5"
        _write_rml2018(path, **kwargs)
        with pytest.raises(DataError, match=message):
            amr.load_rml2018(path)


# -------------------------------------------------------------------------------------------- learnable


@pytest.mark.slow
def test_small_cnn_learns_the_synthetic_set():
    """A 3-layer 1-D CNN trained 8 epochs (Adam) on 3,300 frames at 0…18 dB reaches > 50% accuracy on
    fresh frames at SNR >= 10 dB (chance: 1/11 ≈ 9%; about 72% when measured), and stays near chance at
    ≤ −14 dB, where the noise swamps the signal. ~15 s on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: extra threads only contend on a shared 2-core machine
    try:
        torch.manual_seed(0)
        train = amr.generate(30, snrs=range(0, 20, 2), seed=1)
        test = amr.generate(10, seed=2)

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv1d(i, o, 7, padding=3), nn.BatchNorm1d(o), nn.ReLU(), nn.MaxPool1d(2)]

        net = nn.Sequential(
            *block(2, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 11)
        )
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        batches = amr.to_loader(train, batch_size=64, shuffle=True, seed=0)
        for _ in range(8):
            net.train()
            for x, y in batches:
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(x) for x, _ in amr.to_loader(test, batch_size=512)])
    finally:
        torch.set_num_threads(threads)
    summary = amr.summary_accuracy(logits.numpy(), test)
    per_snr = amr.accuracy_per_snr(logits.numpy(), test)
    assert summary["high_snr"] > 0.5, (summary, per_snr)
    assert np.mean([per_snr[s] for s in (-20, -18, -16, -14)]) < 0.25, per_snr

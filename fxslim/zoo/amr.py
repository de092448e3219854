"""Automatic-modulation-recognition (AMR) data shaped like DeepSig's RadioML sets: a seeded, vectorised
synthetic generator of I/Q frames (11 modulations, SNR −20…18 dB, pulse shaping, timing/frequency/phase
offsets, multipath fading, AWGN), an on-disk `.npz` cache of what it generates, stratified splits, loaders
of (x, y) batches, per-SNR accuracy, and readers for the real RML2016.10a/b pickles and RML2018.01a HDF5
files. This file never trains or changes a model and never downloads anything.

Modelling simplifications (the synthetic set is a stand-in with the same shapes and the same kinds of
impairment as RadioML, not a replica of its GNU Radio channel model):
- The analog classes (AM-DSB, AM-SSB, WBFM) are driven by band-limited Gaussian noise standing in for
  speech/music: `AUDIO_BANDWIDTH` cycles/sample, no silences (RadioML's real audio has silences, which
  makes AM-DSB and WBFM look like a bare carrier; ours never do).
- AM-DSB keeps its carrier (modulation index `AM_INDEX`); AM-SSB is the upper sideband without carrier.
- GFSK and CPFSK are binary with modulation index 0.5; GFSK's frequency pulse is Gaussian (BT 0.35).
- Multipath is a sample-spaced block-Rayleigh channel (constant over a frame), not a time-varying one;
  there is no sample-rate offset drift within a frame.
- Noise power is set exactly per frame (the Gaussian draw is rescaled to the target power), so the label
  is the frame's true SNR, not only its expectation.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.fft import next_fast_len
from scipy.signal import fftconvolve, hilbert

from fxslim.zoo.errors import DataError  # one DataError for every loader of the zoo

MODULATIONS: tuple[str, ...] = (
    "BPSK", "QPSK", "8PSK", "16QAM", "64QAM", "PAM4", "GFSK", "CPFSK", "AM-DSB", "AM-SSB", "WBFM",
)  # fmt: skip
SNRS: range = range(-20, 20, 2)  # −20…18 dB, RadioML 2016's grid

# RML2018.01a's one-hot column order, as listed in its paper (O'Shea, Roy & Clancy 2018, "Over-the-air deep
# learning based radio signal classification"). The classes.txt shipped with the data set lists another
# order, which users have found not to match the labels.
RML2018_CLASSES: tuple[str, ...] = (
    "OOK", "4ASK", "8ASK", "BPSK", "QPSK", "8PSK", "16PSK", "32PSK", "16APSK", "32APSK", "64APSK",
    "128APSK", "16QAM", "32QAM", "64QAM", "128QAM", "256QAM", "AM-SSB-WC", "AM-SSB-SC", "AM-DSB-WC",
    "AM-DSB-SC", "FM", "GMSK", "OQPSK",
)  # fmt: skip
# RML2016 dict keys spell the QAMs the other way round; mapped so that its indices match MODULATIONS.
_RML2016_ALIASES = {"QAM16": "16QAM", "QAM64": "64QAM"}

AUDIO_BANDWIDTH = 0.02  # cycles/sample of the analog classes' random "audio" source
AM_INDEX = 0.5  # AM-DSB: s = 1 + AM_INDEX * m(t), |m| <= 1, so never over-modulated
FM_DEVIATION = 0.05  # WBFM peak frequency deviation, cycles/sample (β = 0.05 / 0.02 = 2.5: wideband)
FSK_INDEX = 0.5  # GFSK/CPFSK modulation index h (MSK-like)
GFSK_BT = 0.35
RRC_SPAN = 12  # RRC length in symbols (12: truncation ISI of RRC*RRC below 0.2%)
FRAC_DELAY_HALF = 8  # windowed-sinc fractional-delay filter: 2 * 8 + 1 taps
GENERATOR_VERSION = 1  # bump when the generator's output changes, so stale caches are not reused


@dataclass(frozen=True)
class Channel:
    """Impairments of the synthetic set. Defaults are the data set's; tests may switch parts off."""

    rolloff: float = 0.35  # RRC roll-off β
    max_cfo: float = 0.001  # carrier frequency offset, uniform in ±max_cfo cycles/sample
    multipath_taps: int = 3  # sample-spaced Rayleigh taps (1 = flat fading)
    multipath_decay: float = 1.0  # exponential power-delay profile p_k ∝ exp(-k / decay)
    timing_offset: bool = True  # uniform sampling-time offset in [0, sps) samples


@dataclass
class AMRData:
    """I/Q frames with labels. x: float32 (N, 2, L) (I, Q rows); y: int64 (N,) index into `classes`;
    snr: int64 (N,) in dB; classes: the class names."""

    x: np.ndarray
    y: np.ndarray
    snr: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.x)
        if self.x.ndim != 3 or self.x.shape[1] != 2:
            raise DataError(f"AMRData.x must be (N, 2, L), got shape {self.x.shape}")
        if self.y.shape != (n,) or self.snr.shape != (n,):
            raise DataError(f"AMRData.y and .snr must be ({n},), got {self.y.shape} and {self.snr.shape}")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> AMRData:
        """The frames at `index` (integer indices or a boolean mask), same classes."""
        return AMRData(self.x[index], self.y[index], self.snr[index], list(self.classes))


@dataclass
class AMRParts:
    """A generated set with its two additive parts, scaled like the frames: data.x == signal + noise."""

    data: AMRData
    signal: np.ndarray | None  # float32 (N, 2, L): the impaired signal before noise
    noise: np.ndarray | None  # float32 (N, 2, L)


# --------------------------------------------------------------------------------------------- generator


def rrc_taps(sps: int, span: int = RRC_SPAN, rolloff: float = 0.35) -> np.ndarray:
    """Root-raised-cosine taps, `span * sps + 1` of them, unit energy.

    With t in symbol periods and β the roll-off (e.g. Wikipedia "Root-raised-cosine filter"; Proakis &
    Salehi, Digital Communications, 5th ed., §9.2):
      h(t) = [sin(πt(1−β)) + 4βt·cos(πt(1+β))] / [πt(1 − (4βt)²)],
      h(0) = 1 + β(4/π − 1),
      h(±1/(4β)) = β/√2 · [(1 + 2/π)·sin(π/(4β)) + (1 − 2/π)·cos(π/(4β))].
    """
    t = np.arange(-(span * sps) // 2, (span * sps) // 2 + 1) / sps
    beta = rolloff
    with np.errstate(divide="ignore", invalid="ignore"):
        h = (np.sin(np.pi * t * (1 - beta)) + 4 * beta * t * np.cos(np.pi * t * (1 + beta))) / (
            np.pi * t * (1 - (4 * beta * t) ** 2)
        )
    h[t == 0] = 1 + beta * (4 / np.pi - 1)
    if beta > 0:
        singular = np.isclose(np.abs(t), 1 / (4 * beta))
        h[singular] = (beta / np.sqrt(2)) * (
            (1 + 2 / np.pi) * np.sin(np.pi / (4 * beta)) + (1 - 2 / np.pi) * np.cos(np.pi / (4 * beta))
        )
    return h / np.sqrt(np.sum(h**2))


def _gaussian_taps(sps: int, bt: float, span: int = 4) -> np.ndarray:
    """GFSK frequency-pulse filter, unit DC gain. 3GPP TS 45.004 §2.4 (GMSK):
    h(t) = exp(−t²/(2δ²T²)) / (√(2π)·δT), δ = √(ln 2) / (2π·BT), T = sps samples."""
    t = np.arange(-(span * sps) // 2, (span * sps) // 2 + 1)
    delta_t = np.sqrt(np.log(2)) / (2 * np.pi * bt) * sps
    h = np.exp(-(t**2) / (2 * delta_t**2))
    return h / h.sum()


def _constellation(mod: str) -> np.ndarray:
    """Unit-average-power symbol alphabet of a linear modulation."""
    if mod == "BPSK":
        return np.array([-1.0, 1.0], dtype=complex)
    if mod == "QPSK":
        return np.exp(1j * (np.pi / 4 + np.pi / 2 * np.arange(4)))
    if mod == "8PSK":
        return np.exp(2j * np.pi * np.arange(8) / 8)
    if mod in ("16QAM", "64QAM"):
        m = 4 if mod == "16QAM" else 8
        levels = np.arange(-(m - 1), m, 2, dtype=float)
        points = (levels[:, None] + 1j * levels[None, :]).ravel()
        return points / np.sqrt(np.mean(np.abs(points) ** 2))
    if mod == "PAM4":
        return np.array([-3.0, -1.0, 1.0, 3.0], dtype=complex) / np.sqrt(5)
    raise DataError(f"no constellation for {mod!r}")


def _audio(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Band-limited Gaussian noise standing in for audio: (n, m) real, zero mean, peak |m| = 1. Drawn in
    the frequency domain (bins 1..AUDIO_BANDWIDTH·m) so it is exactly band-limited, with no filter edges."""
    k = max(1, int(AUDIO_BANDWIDTH * m))
    spectrum = np.zeros((n, m // 2 + 1), dtype=complex)
    spectrum[:, 1 : k + 1] = rng.standard_normal((n, k)) + 1j * rng.standard_normal((n, k))
    audio = np.fft.irfft(spectrum, n=m, axis=1)
    return audio / np.max(np.abs(audio), axis=1, keepdims=True)


def _baseband(mod: str, rng: np.random.Generator, n: int, m: int, sps: int) -> tuple[np.ndarray, bool]:
    """(n, m) complex baseband of one modulation before any filtering (m a multiple of sps), and whether it
    still needs RRC pulse shaping (linear modulations: symbol impulses every sps samples)."""
    n_sym = m // sps
    if mod in ("GFSK", "CPFSK"):
        bits = rng.integers(0, 2, size=(n, n_sym)) * 2.0 - 1.0
        freq = np.repeat(bits, sps, axis=1)  # NRZ frequency pulse of CPFSK
        if mod == "GFSK":
            freq = fftconvolve(freq, _gaussian_taps(sps, GFSK_BT)[None, :], mode="same", axes=1)
        # continuous phase: φ[n] = π·h·Σ f[k] / sps, i.e. ±π·h per symbol
        return np.exp(1j * np.pi * FSK_INDEX * np.cumsum(freq, axis=1) / sps), False
    if mod in ("AM-DSB", "AM-SSB", "WBFM"):
        audio = _audio(rng, n, m)
        if mod == "AM-DSB":
            return (1 + AM_INDEX * audio).astype(complex), False
        if mod == "AM-SSB":
            return hilbert(audio, axis=1), False  # analytic signal m + j·H{m}: upper sideband only
        return np.exp(2j * np.pi * FM_DEVIATION * np.cumsum(audio, axis=1)), False
    alphabet = _constellation(mod)
    impulses = np.zeros((n, m), dtype=complex)
    impulses[:, ::sps] = alphabet[rng.integers(0, len(alphabet), size=(n, n_sym))]
    return impulses, True


def _fractional_delay_taps(delay: np.ndarray) -> np.ndarray:
    """(n, 2·FRAC_DELAY_HALF + 1) taps delaying row i by delay[i] ∈ [0, 1) samples about the centre tap:
    Hann-windowed sinc h_k = sinc(k − d)·w(k − d), unit DC gain (Laakso et al., "Splitting the unit delay",
    IEEE Signal Processing Magazine 1996, windowed-sinc design)."""
    k = np.arange(-FRAC_DELAY_HALF, FRAC_DELAY_HALF + 1)[None, :] - delay[:, None]
    taps = np.sinc(k) * 0.5 * (1 + np.cos(np.pi * k / (FRAC_DELAY_HALF + 1)))
    return taps / taps.sum(axis=1, keepdims=True)


def _rayleigh_taps(rng: np.random.Generator, n: int, taps: int, decay: float) -> np.ndarray:
    """(n, taps) block-Rayleigh channels: h_k ~ CN(0, p_k), p_k ∝ exp(−k/decay), Σ p_k = 1, so the average
    received power equals the transmitted power (each frame's own power varies: fading)."""
    power = np.exp(-np.arange(taps) / decay)
    power /= power.sum()
    return (rng.standard_normal((n, taps)) + 1j * rng.standard_normal((n, taps))) * np.sqrt(power / 2)


def _spectrum(taps: np.ndarray, centre: int, m: int) -> np.ndarray:
    """Length-m DFT of FIR taps (n, T) whose tap `centre` is time zero (tap k placed at index (k − centre)
    mod m). Multiplying a signal's DFT by it is a circular, 'same'-aligned convolution; the wrap-around
    lands in the margin that is cropped."""
    padded = np.zeros((taps.shape[0], m), dtype=complex)
    padded[:, (np.arange(taps.shape[1]) - centre) % m] = taps
    return np.fft.fft(padded, axis=1)


def _power(z: np.ndarray) -> np.ndarray:
    """Mean |z|² of each row, (n, 1)."""
    return np.mean(z.real**2 + z.imag**2, axis=1, keepdims=True)


def _frame_length(length: int, sps: int, channel: Channel) -> tuple[int, int]:
    """(m, margin): the generated length (a multiple of sps, FFT-friendly) and the margin on each side that
    absorbs filter edges, circular wrap-around and the integer timing offset."""
    margin = RRC_SPAN * sps // 2 + FRAC_DELAY_HALF + max(channel.multipath_taps, 1) + sps
    margin = -(-margin // sps) * sps  # a whole number of symbols: without timing offset, frames start on a symbol
    m = length + 2 * margin
    while m % sps or next_fast_len(m) != m:
        m += 1
    return m, margin


def _impaired_signal(
    mod: str, rng: np.random.Generator, n: int, length: int, sps: int, channel: Channel, rrc: np.ndarray
) -> np.ndarray:
    """(n, length) complex frames of one modulation with every impairment but noise."""
    m, margin = _frame_length(length, sps, channel)
    z, shaped = _baseband(mod, rng, n, m, sps)
    # timing offset and multipath are both LTI: one per-frame FIR for the two, applied together with pulse
    # shaping as one frequency-domain product
    fir = _fractional_delay_taps(rng.random(n) if channel.timing_offset else np.zeros(n))
    if channel.multipath_taps > 0:
        paths = _rayleigh_taps(rng, n, channel.multipath_taps, channel.multipath_decay)
        combined = np.zeros((n, fir.shape[1] + channel.multipath_taps - 1), dtype=complex)
        for k in range(channel.multipath_taps):  # a few taps: a loop over taps, vectorised over frames
            combined[:, k : k + fir.shape[1]] += paths[:, k : k + 1] * fir
        fir = combined
    response = _spectrum(fir, FRAC_DELAY_HALF, m) * (rrc if shaped else 1)
    z = np.fft.ifft(np.fft.fft(z, axis=1) * response, axis=1)
    # the integer part of the timing offset: where each frame is cut from the longer generated signal
    shift = rng.integers(0, sps, size=n) if channel.timing_offset else np.zeros(n, dtype=np.int64)
    t = np.arange(length)
    z = np.take_along_axis(z, (margin + shift)[:, None] + t[None, :], axis=1)
    cfo = rng.uniform(-channel.max_cfo, channel.max_cfo, size=(n, 1))
    return z * np.exp(1j * (2 * np.pi * cfo * t[None, :] + rng.uniform(0, 2 * np.pi, size=(n, 1))))


def _awgn(rng: np.random.Generator, z: np.ndarray, snr_db: int) -> np.ndarray:
    """Complex Gaussian noise for frames z at SNR snr_db of each frame's own power: σ² = P_s / 10^(SNR/10).
    The draw is rescaled so that its measured power is exactly σ², so the label is the frame's true SNR."""
    p_signal = np.maximum(_power(z), np.finfo(float).tiny)
    noise = rng.standard_normal(z.shape) + 1j * rng.standard_normal(z.shape)
    return noise * np.sqrt(p_signal / 10 ** (snr_db / 10) / _power(noise))


def _synthesise(
    n_per_class_snr: int, length: int, snrs: Iterable[int], seed: int, sps: int, channel: Channel, parts: bool
) -> AMRParts:
    snr_grid = [int(s) for s in snrs]
    if n_per_class_snr < 1 or length < 1 or sps < 2 or not snr_grid or channel.multipath_taps < 0:
        raise DataError(
            f"need n_per_class_snr >= 1, length >= 1, sps >= 2, at least one SNR and multipath_taps >= 0; got "
            f"n_per_class_snr={n_per_class_snr}, length={length}, sps={sps}, snrs={snr_grid}, {channel}"
        )
    rng = np.random.default_rng(seed)
    m, _ = _frame_length(length, sps, channel)
    rrc = _spectrum(rrc_taps(sps, RRC_SPAN, channel.rolloff)[None, :], RRC_SPAN * sps // 2, m)
    n = n_per_class_snr
    total = n * len(snr_grid) * len(MODULATIONS)
    # preallocated outputs filled block by block ((class, SNR) blocks of n frames keep temporaries small;
    # the 2×1024 set is ~360 MB per output array)
    x = np.empty((total, 2, length), dtype=np.float32)
    signal = np.empty_like(x) if parts else None
    noise_out = np.empty_like(x) if parts else None
    block = 0
    for mod in MODULATIONS:
        for snr_db in snr_grid:
            z = _impaired_signal(mod, rng, n, length, sps, channel, rrc)
            noise = _awgn(rng, z, snr_db)
            gain = 1 / np.sqrt(_power(z + noise))  # unit average power per frame, as RadioML
            rows = slice(block * n, (block + 1) * n)
            _write_iq(x, rows, (z + noise) * gain)
            if parts:
                _write_iq(signal, rows, z * gain)
                _write_iq(noise_out, rows, noise * gain)
            block += 1
    y = np.repeat(np.arange(len(MODULATIONS), dtype=np.int64), n * len(snr_grid))
    snr = np.tile(np.repeat(np.asarray(snr_grid, dtype=np.int64), n), len(MODULATIONS))
    return AMRParts(AMRData(x, y, snr, list(MODULATIONS)), signal, noise_out)


def _write_iq(out: np.ndarray, rows: slice, z: np.ndarray) -> None:
    out[rows, 0] = z.real
    out[rows, 1] = z.imag


def generate_parts(n_per_class_snr: int, **settings: Any) -> AMRParts:
    """`generate` (same frames, bit for bit; `settings` are its length, snrs, seed, sps and channel), also
    returning each frame's signal and noise parts scaled like the frame, so that its SNR can be measured:
    10·log10(mean|signal|² / mean|noise|²) is its label."""
    bound = inspect.signature(generate).bind(n_per_class_snr, **settings)
    bound.apply_defaults()
    return _synthesise(*bound.arguments.values(), parts=True)


def generate(
    n_per_class_snr: int,
    length: int = 128,
    snrs: Iterable[int] = SNRS,
    seed: int = 0,
    sps: int = 8,
    channel: Channel = Channel(),  # noqa: B008 (frozen dataclass: an immutable default)
) -> AMRData:
    """A synthetic AMR set: `n_per_class_snr` frames of `length` I/Q samples for every (class, SNR), ordered
    by class, then SNR. Per frame: random symbols (or random audio for the analog classes), RRC pulse
    shaping at `sps` samples/symbol, a random timing offset (windowed-sinc fractional delay plus an integer
    shift, uniform over one symbol), Rayleigh multipath, carrier frequency and phase offset, AWGN at the
    labelled SNR of that frame's signal power, then unit average power. Deterministic for given arguments."""
    return _synthesise(n_per_class_snr, length, snrs, seed, sps, channel, parts=False).data


# ------------------------------------------------------------------------------------------------- cache

_GENERATE_SIGNATURE = inspect.signature(generate)  # the cache key's argument list


def default_cache_dir() -> Path:
    """Where generated sets are cached: `$FXSLIM_CACHE/data` when FXSLIM_CACHE is set (the root of every
    fxslim cache), else `~/.cache/fxslim/data`."""
    root = os.environ.get("FXSLIM_CACHE")
    return Path(root) / "data" if root else Path.home() / ".cache" / "fxslim" / "data"


def cache_path(cache_dir: str | os.PathLike | None = None, **kwargs) -> Path:
    """The `.npz` file that `load_or_generate(cache_dir, **kwargs)` reads or writes: keyed by a hash of all
    of `generate`'s arguments (defaults filled in) and GENERATOR_VERSION."""
    try:
        bound = _GENERATE_SIGNATURE.bind(**kwargs)
    except TypeError as e:
        names = ", ".join(_GENERATE_SIGNATURE.parameters)
        raise DataError(f"load_or_generate: {e}; generate() takes {names}") from e
    bound.apply_defaults()
    args = dict(bound.arguments)
    args["snrs"] = [int(s) for s in args["snrs"]]
    args["channel"] = asdict(args["channel"])
    args["version"] = GENERATOR_VERSION
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"amr-{key}.npz"


def load_or_generate(cache_dir: str | os.PathLike | None = None, **kwargs) -> AMRData:
    """`generate(**kwargs)`, cached: the first call writes `<cache_dir>/amr-<hash>.npz`, later calls load it.
    An unreadable cache file is regenerated and replaced."""
    path = cache_path(cache_dir, **kwargs)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return AMRData(f["x"], f["y"], f["snr"], [str(c) for c in f["classes"]])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, DataError):
            pass  # a truncated or foreign file: fall through and rewrite it
    data = generate(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # write-then-rename: readers never see half a file
    with open(tmp, "wb") as f:
        np.savez(f, x=data.x, y=data.y, snr=data.snr, classes=np.array(data.classes))
    os.replace(tmp, path)
    return data


# ------------------------------------------------------------------------------------- splits and loaders


def splits(data: AMRData, val: float = 0.1, test: float = 0.2, seed: int = 0) -> tuple[AMRData, AMRData, AMRData]:
    """(train, val, test), stratified by (class, SNR): in each cell of c frames, round(c·test) go to test and
    round(c·(test + val)) − round(c·test) to val, chosen at random (seeded); each part keeps the original
    frame order."""
    if not (0 <= val and 0 <= test and val + test < 1):
        raise DataError(f"splits: need val >= 0, test >= 0 and val + test < 1, got val={val}, test={test}")
    rng = np.random.default_rng(seed)
    _, cell = np.unique(np.stack([data.y, data.snr]), axis=1, return_inverse=True)
    cell = cell.ravel()
    order = np.lexsort((rng.random(len(data)), cell))  # by cell, random within a cell
    counts = np.bincount(cell)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(data), dtype=np.int64)
    rank[order] = np.arange(len(data)) - starts[cell[order]]
    n_test = np.round(counts * test).astype(np.int64)[cell]
    n_held = np.round(counts * (test + val)).astype(np.int64)[cell]
    is_test, is_val = rank < n_test, (rank >= n_test) & (rank < n_held)
    return data.take(~(is_test | is_val)), data.take(is_val), data.take(is_test)


def to_loader(
    data: AMRData, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of (x float32 (B, 2, L), y int64 (B,)) batches, re-iterable like `fxslim.zoo.data`'s loaders.
    Unshuffled, batches follow the frame order, so predictions line up with `data.snr`; shuffled, the order
    is a fixed seeded permutation."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    x, y = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32)), torch.from_numpy(data.y.astype(np.int64))
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    return [(x[index[i : i + batch_size]], y[index[i : i + batch_size]]) for i in range(0, len(y), batch_size)]


def _predicted_classes(pred: np.ndarray, data: AMRData) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.ndim == 2:  # logits or probabilities
        pred = pred.argmax(axis=1)
    if pred.shape != data.y.shape:
        raise DataError(f"predictions have shape {pred.shape}, expected ({len(data)},) or ({len(data)}, classes)")
    return pred


def accuracy_per_snr(pred: np.ndarray, data: AMRData) -> dict[int, float]:
    """{snr: accuracy} over the SNRs present, ascending. `pred`: class indices (N,) or scores (N, classes)."""
    correct = _predicted_classes(pred, data) == data.y
    return {int(s): float(correct[data.snr == s].mean()) for s in np.unique(data.snr)}


def summary_accuracy(pred: np.ndarray, data: AMRData, high_snr_db: int = 10) -> dict[str, float]:
    """{"overall": accuracy over all frames, "high_snr": accuracy over frames with SNR >= high_snr_db}
    (nan when there are none)."""
    correct = _predicted_classes(pred, data) == data.y
    high = data.snr >= high_snr_db
    return {"overall": float(correct.mean()), "high_snr": float(correct[high].mean()) if high.any() else float("nan")}


# ------------------------------------------------------------------------------------------- real files


def load_rml2016(path: str | os.PathLike) -> AMRData:
    """RML2016.10a (`RML2016.10a_dict.pkl`) or RML2016.10b (`RML2016.10b.dat`): a pickled dict
    {(modulation, snr): float array (n, 2, 128)}, written by Python 2 (hence latin1 decoding).

    Security: unpickling runs code chosen by whoever wrote the file; only load files you trust.

    When every modulation name is one of MODULATIONS ("QAM16"/"QAM64" are read as "16QAM"/"64QAM"), the
    classes are MODULATIONS, in that order, so indices match the synthetic set (RML2016.10b has no AM-SSB:
    that class then has no frames); otherwise the classes are the file's names, sorted. Frames are ordered
    by class, then SNR."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"RML2016 file not found: {path}")
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")
    except Exception as e:  # a corrupt pickle can fail in many ways (EOFError, UnpicklingError, ImportError…)
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(content, dict) or not content:
        raise DataError(f"{path}: expected a non-empty dict {{(modulation, snr): array}}, got {type(content).__name__}")
    cells: dict[tuple[str, int], np.ndarray] = {}
    lengths = set()
    for key, frames in content.items():
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], (str, bytes))):
            raise DataError(f"{path}: key {key!r} is not a (modulation, snr) pair")
        mod = key[0].decode("latin1") if isinstance(key[0], bytes) else key[0]
        try:
            snr = int(key[1])
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: key {key!r} has a non-integer SNR") from e
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.shape[1] != 2 or not np.issubdtype(frames.dtype, np.number):
            raise DataError(f"{path}: {key!r} holds shape {frames.shape} dtype {frames.dtype}, expected (n, 2, L)")
        lengths.add(frames.shape[2])
        cells[(_RML2016_ALIASES.get(mod, mod), snr)] = frames
    if len(lengths) != 1:
        raise DataError(f"{path}: frames of different lengths {sorted(lengths)}")
    names = {mod for mod, _ in cells}
    classes = list(MODULATIONS) if names <= set(MODULATIONS) else sorted(names)
    keys = sorted(cells, key=lambda k: (classes.index(k[0]), k[1]))
    x = np.concatenate([cells[k] for k in keys]).astype(np.float32)
    y = np.concatenate([np.full(len(cells[k]), classes.index(k[0]), dtype=np.int64) for k in keys])
    snr = np.concatenate([np.full(len(cells[k]), k[1], dtype=np.int64) for k in keys])
    return AMRData(x, y, snr, classes)


def load_rml2018(path: str | os.PathLike, snrs: Sequence[int] | None = None, chunk: int = 65536) -> AMRData:
    """RML2018.01a (`GOLD_XYZ_OSC.0001_1024.hdf5`): X float (N, 1024, 2), Y one-hot (N, 24) in
    RML2018_CLASSES order, Z snr (N, 1). Returns x as (N, 2, L). The full file is ~20 GB as float32:
    `snrs` keeps only those SNRs (read in chunks of `chunk` rows, so memory is about the kept frames)."""
    import h5py  # lazy: only needed for the real 2018 file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"RML2018 file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        missing = [k for k in ("X", "Y", "Z") if k not in f]
        if missing:
            raise DataError(f"{path}: missing dataset(s) {missing}; RML2018.01a has X, Y, Z (has {sorted(f.keys())})")
        X, Y, Z = f["X"], f["Y"], f["Z"]
        n = X.shape[0]
        if len(X.shape) != 3 or X.shape[2] != 2:
            raise DataError(f"{path}: X has shape {X.shape}, expected (N, L, 2)")
        if Y.shape != (n, len(RML2018_CLASSES)):
            raise DataError(f"{path}: Y has shape {Y.shape}, expected ({n}, {len(RML2018_CLASSES)}) one-hot")
        if Z.shape not in ((n, 1), (n,)):
            raise DataError(f"{path}: Z has shape {Z.shape}, expected ({n}, 1)")
        snr_all = np.asarray(Z[...]).reshape(n).astype(np.int64)
        keep = np.ones(n, dtype=bool) if snrs is None else np.isin(snr_all, np.asarray(list(snrs), dtype=np.int64))
        xs, ys = [], []
        for lo in range(0, n, chunk):  # chunked: Y alone is ~0.5 GB in the real file
            rows = keep[lo : lo + chunk]
            if not rows.any():
                continue
            onehot = np.asarray(Y[lo : lo + chunk])[rows]
            if not (np.isin(onehot, (0, 1)).all() and (onehot.sum(axis=1) == 1).all()):
                raise DataError(f"{path}: Y rows {lo}..{lo + len(rows) - 1} are not one-hot")
            ys.append(onehot.argmax(axis=1).astype(np.int64))
            xs.append(np.asarray(X[lo : lo + chunk], dtype=np.float32)[rows].transpose(0, 2, 1))
    x = np.concatenate(xs) if xs else np.zeros((0, 2, X.shape[1]), dtype=np.float32)
    y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    return AMRData(np.ascontiguousarray(x), y, snr_all[keep], list(RML2018_CLASSES))

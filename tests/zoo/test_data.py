"""fxslim.zoo.data: batching helpers, rotated digits (exact rot90, arbitrary angles, size checks), mnist1d
generation and its .npz cache, and the EuroSAT-style image-folder loader on small files written here."""

from __future__ import annotations

import random

import mnist1d.data
import numpy as np
import pytest
import torch
from PIL import Image

from fxslim.errors import FxslimError
from fxslim.zoo.data import (
    check_rot90_size,
    digits_loaders,
    digits_tensors,
    image_folder,
    mnist1d_arrays,
    mnist1d_loaders,
    rot90_batch,
    rotate_batch,
    rotated_digits,
    rotated_digits_tensors,
    seeded_split,
    to_batches,
    upsampled_digits,
)
from fxslim.zoo.errors import DataError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches into its own folder: no test reads a file another run left behind."""
    monkeypatch.setenv("FXSLIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


# --- helpers ----------------------------------------------------------------------------------------------


def test_seeded_split_is_a_seeded_partition():
    train, test = seeded_split(10, 0.8, seed=3)
    assert len(train) == 8 and len(test) == 2
    assert sorted(torch.cat([train, test]).tolist()) == list(range(10))
    assert torch.equal(seeded_split(10, 0.8, seed=3)[0], train)
    assert not torch.equal(seeded_split(10, 0.8, seed=4)[0], train)
    with pytest.raises(DataError, match="train_fraction"):
        seeded_split(10, 1.0)


def test_to_batches_cuts_in_order_or_in_a_seeded_order():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = to_batches(x, y, 4)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(10))
    shuffled = torch.cat([b[1] for b in to_batches(x, y, 4, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))
    assert torch.equal(shuffled, torch.cat([b[1] for b in to_batches(x, y, 4, shuffle=True, seed=1)]))
    for b in to_batches(x, y, 3, shuffle=True, seed=1):
        assert torch.equal(b[0][:, 0].long(), b[1])  # x and y stay paired
    with pytest.raises(DataError, match="batch_size"):
        to_batches(x, y, 0)
    with pytest.raises(DataError, match="10 vs 9"):
        to_batches(x, y[:9], 4)


def test_digits_loaders_keep_their_split_and_order_and_error_types():
    # The algorithm digits_loaders had before the shared helpers: its batches must not change.
    x, y = digits_tensors()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(7))
    train, test = digits_loaders(batch_size=50, seed=7)
    assert torch.equal(torch.cat([b[0] for b in train]), x[order[:1437]])
    assert torch.equal(torch.cat([b[1] for b in test]), y[order[1437:]])
    assert len(train[0][1]) == 50
    with pytest.raises(ValueError):  # callers that caught ValueError before DataError existed still do
        digits_loaders(batch_size=0)
    assert issubclass(DataError, FxslimError)


# --- rotated digits ---------------------------------------------------------------------------------------


def test_rot90_batch_is_an_exact_rotation_and_k_then_4_minus_k_is_the_identity():
    x = torch.rand(6, 2, 5, 5)
    for k in range(5):
        assert torch.equal(rot90_batch(x, k), torch.rot90(x, k, dims=(-2, -1)))
        assert torch.equal(rot90_batch(rot90_batch(x, k), 4 - k), x)
    assert torch.equal(rot90_batch(x, -1), rot90_batch(x, 3))
    ks = torch.tensor([0, 1, 2, 3, 5, -1])
    rotated = rot90_batch(x, ks)
    for i, k in enumerate(ks.tolist()):
        assert torch.equal(rotated[i], torch.rot90(x[i], k % 4, dims=(-2, -1)))
    assert torch.equal(rot90_batch(rotated, 4 - ks), x)
    with pytest.raises(DataError, match="square"):
        rot90_batch(torch.rand(2, 1, 4, 5), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="shape"):
        rot90_batch(x, torch.tensor([1, 2]))


def test_rot90_digits_are_exact_rotations_of_the_upsampled_digits():
    upright, y0 = upsampled_digits(28)
    assert upright.shape == (1797, 1, 28, 28) and upright.dtype == torch.float32
    assert upright.min() >= 0 and upright.max() <= 1
    x, y, degrees = rotated_digits_tensors(28, "rot90", seed=0)
    assert torch.equal(y, y0) and x.shape == upright.shape
    k = (degrees // 90).long()
    assert torch.equal(k * 90, degrees.long())
    assert torch.equal(rot90_batch(x, -k), upright)  # bit for bit: rot90 only permutes pixels
    counts = torch.bincount(k, minlength=4) / len(k)
    assert counts.min() > 0.2 and counts.max() < 0.3  # each quarter turn about equally often
    again, _, again_degrees = rotated_digits_tensors(28, "rot90", seed=0)
    assert torch.equal(again, x) and torch.equal(again_degrees, degrees)
    assert not torch.equal(rotated_digits_tensors(28, "rot90", seed=1)[2], degrees)


def test_arbitrary_angles_are_seeded_bilinear_rotations_in_range():
    x, y, degrees = rotated_digits_tensors(28, "any", seed=0)
    assert x.shape == (1797, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert degrees.min() >= 0 and degrees.max() < 360 and (degrees % 90 != 0).all()
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(rotated_digits_tensors(28, "any", seed=0)[0], x)
    upright, _ = upsampled_digits(28)
    # Same direction as rot90, and exact at a quarter turn (the pixel grid maps onto itself).
    assert torch.equal(rotate_batch(upright[:20], torch.full((20,), 90.0)), rot90_batch(upright[:20], 1))
    assert torch.allclose(rotate_batch(upright[:20], torch.zeros(20)), upright[:20])


def test_rotated_digit_loaders_share_the_digits_split():
    train, test = rotated_digits(28, "rot90", seed=2, batch_size=100)
    plain_train, plain_test = digits_loaders(batch_size=100, seed=2)
    assert torch.equal(torch.cat([b[1] for b in train]), torch.cat([b[1] for b in plain_train]))
    assert torch.equal(torch.cat([b[1] for b in test]), torch.cat([b[1] for b in plain_test]))
    x, y = train[0]
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    share = torch.bincount(torch.cat([b[1] for b in train]), minlength=10) / 1437
    assert share.min() > 0.08 and share.max() < 0.12  # the digits are nearly balanced; the split keeps it
    upright_train, upright_test = rotated_digits(28, "rot90", seed=2, batch_size=100, rotate_train=False)
    assert torch.equal(upright_test[0][0], test[0][0])
    upright, _ = upsampled_digits(28)
    index = seeded_split(1797, 0.8, seed=2)[0][:100]
    assert torch.equal(upright_train[0][0], upright[index])


def test_sizes_are_validated_and_checked_against_the_models_windows():
    for bad in (7, 28.0, True, "28"):
        with pytest.raises(DataError, match="size"):
            upsampled_digits(bad)
    with pytest.raises(DataError, match="angles"):
        rotated_digits_tensors(28, "rot45")
    conv_pool = [(3, 1, 1), (3, 1, 1), (2, 2, 0)]
    check_rot90_size(28, conv_pool)
    with pytest.raises(DataError, match="layer 2.*1 row"):  # docs/notes/facts.md: 29 into a 2x2 pool
        check_rot90_size(29, conv_pool)
    with pytest.raises(DataError, match="size 29"):
        rotated_digits(29, layers=conv_pool)
    check_rot90_size(29, [(3, 2, 1), (3, 2, 1)])  # strided 3×3 with padding 1: odd sizes 29 → 15 → 8
    with pytest.raises(DataError, match="layer 0"):
        check_rot90_size(28, [(3, 2, 1)])
    with pytest.raises(DataError, match="does not fit"):
        check_rot90_size(8, [(2, 2, 0)] * 4)


# --- mnist1d ----------------------------------------------------------------------------------------------


def test_mnist1d_shapes_balance_and_layouts():
    # n=1000, not the default 5000: the generator is a Python loop (~1 ms a sample) and the test must stay short.
    train, test = mnist1d_loaders(batch_size=128, seed=0, n=1000)
    assert sum(len(b[1]) for b in train) == 800 and sum(len(b[1]) for b in test) == 200
    x, y = train[0]
    assert x.shape == (128, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([b[1] for b in train + test])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 100))  # the generator draws per class
    image_train, image_test = mnist1d_loaders(batch_size=128, seed=0, n=1000, layout="image")
    assert image_train[0][0].shape == (128, 1, 1, 40)
    assert torch.equal(image_train[0][0].flatten(), x.flatten()) and torch.equal(image_test[0][1], test[0][1])
    other, _ = mnist1d_loaders(batch_size=128, seed=1, n=1000)
    assert not torch.equal(other[0][1], y)  # the seed orders the training samples...
    assert torch.equal(torch.cat([b[1] for b in other]).sort()[0], torch.cat([b[1] for b in train]).sort()[0])
    with pytest.raises(DataError, match="layout"):
        mnist1d_loaders(layout="2d")


def test_mnist1d_cache_round_trip(private_cache, monkeypatch):
    random.seed(11)
    np.random.seed(11)
    before = random.random(), np.random.rand()
    random.seed(11)
    np.random.seed(11)
    first = mnist1d_arrays(n=200)
    assert (random.random(), np.random.rand()) == before  # make_dataset's reseeding did not leak out
    files = list(private_cache.glob("mnist1d-*.npz"))
    assert len(files) == 1 and not list(private_cache.glob("*.tmp"))
    assert first["x"].shape == (160, 40) and first["x_test"].shape == (40, 40)

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached arrays should have been loaded")

    with monkeypatch.context() as patch:  # a context of its own: undoing it keeps FXSLIM_CACHE set
        patch.setattr(mnist1d.data, "make_dataset", no_generation)
        second = mnist1d_arrays(n=200)
        assert all(np.array_equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
        with pytest.raises(AssertionError, match="cached"):
            mnist1d_arrays(n=300)  # other arguments, other file

    whole = files[0].read_bytes()
    for damaged in (whole[: len(whole) // 2], b"not an npz file"):  # truncated or foreign: regenerated
        files[0].write_bytes(damaged)
        third = mnist1d_arrays(n=200)
        assert all(np.array_equal(first[k], third[k]) for k in first)
        assert files[0].read_bytes() == whole
    for bad in (0, 15, 20.0):
        with pytest.raises(DataError, match="multiple of 10"):
            mnist1d_arrays(n=bad)


# --- image folders ----------------------------------------------------------------------------------------


def _write_rgb(path, seed, size=(5, 6)):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


def _two_class_tree(root):
    (root / "River").mkdir(parents=True)
    (root / "Forest").mkdir()
    pixels = {
        ("Forest", "b.png"): _write_rgb(root / "Forest" / "b.png", 1),
        ("Forest", "a.png"): _write_rgb(root / "Forest" / "a.png", 2),
        ("River", "c.PNG"): _write_rgb(root / "River" / "c.PNG", 3),
    }
    (root / "River" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return pixels


def test_image_folder_reads_sorted_classes_and_scales_to_unit_range(tmp_path):
    pixels = _two_class_tree(tmp_path / "eurosat")
    x, y, classes = image_folder(tmp_path / "eurosat")
    assert classes == ["Forest", "River"]
    assert x.shape == (3, 3, 5, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 1]
    for i, key in enumerate([("Forest", "a.png"), ("Forest", "b.png"), ("River", "c.PNG")]):
        expected = torch.from_numpy(pixels[key].astype(np.float32) / 255).permute(2, 0, 1)
        assert torch.allclose(x[i], expected)
    resized, _, _ = image_folder(tmp_path / "eurosat", size=4)
    assert resized.shape == (3, 3, 4, 4) and resized.min() >= 0 and resized.max() <= 1
    assert image_folder(tmp_path / "eurosat", size=(2, 3))[0].shape == (3, 3, 2, 3)


def test_image_folder_grey_and_16_bit_images(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 51, np.uint8), "L").save(tmp_path / "a" / "grey.png")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "a" / "deep.tif")
    x, _, _ = image_folder(tmp_path)
    assert x.shape == (2, 1, 4, 4) and torch.allclose(x[1], torch.full((1, 4, 4), 0.2)) and x[0].max() == 1
    _write_rgb(tmp_path / "a" / "colour.png", 0, size=(4, 4))
    x, _, _ = image_folder(tmp_path)
    assert x.shape == (3, 3, 4, 4) and torch.equal(x[2][0], x[2][2])  # grey repeated over RGB when mixed


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder(tmp_path)
    root = tmp_path / "eurosat"
    _two_class_tree(root)
    (root / "Empty").mkdir()
    (root / "Empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="Empty.*holds no image"):
        image_folder(root)
    (root / "Empty" / "readme.txt").unlink()
    (root / "Empty").rmdir()

    _write_rgb(root / "River" / "wide.png", 4, size=(5, 7))
    with pytest.raises(DataError, match=r"wide\.png.*5×7.*size="):
        image_folder(root)
    assert image_folder(root, size=8)[0].shape == (4, 3, 8, 8)

    (root / "River" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png") as raised:
        image_folder(root, size=8)
    assert isinstance(raised.value, FxslimError)
    with pytest.raises(DataError, match="size must be"):
        image_folder(root, size=(0, 4))

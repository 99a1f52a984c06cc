"""Train/eval transforms: image and label stay aligned, labels are never interpolated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deeplabv2.data import EvalTransform, SyntheticDataset, TrainTransform
from deeplabv2.model.preprocessing import CAFFE_BGR, TORCHVISION_RGB, Preprocessing

# Leaves RGB values unchanged, so the output image can be compared with the input colours.
IDENTITY = Preprocessing("RGB", 1.0, (0.0, 0.0, 0.0))
NUM_VALUES = 12
FAST = settings(max_examples=60, deadline=None)  # per test: leaves others' settings alone


def encode(label: np.ndarray) -> np.ndarray:
    """A distinct RGB colour per label value (``uint8`` ``(..., 3)``): the image *is* the label."""
    v = label.astype(np.int64)
    return np.stack([v * 20 + 10, 250 - v * 20, (v * 53) % 256], -1).astype(np.uint8)


def decode_matches(image: torch.Tensor, label: torch.Tensor, tol: float) -> torch.Tensor:
    """``(h, w)`` bool: the output pixel's colour is the encoding of its output label."""
    want = torch.from_numpy(encode(label.clamp(max=NUM_VALUES).numpy())).permute(2, 0, 1)
    return ((image - want.float()).abs() <= tol).all(0)


@st.composite
def block_labels(draw, min_block=8):
    """Labels made of ``block x block`` squares (block >= ``min_block``) of values < 12."""
    block = draw(st.integers(min_block, 12))
    gh, gw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31))
    grid = np.random.default_rng(seed).integers(0, NUM_VALUES, (gh, gw))
    return np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)


@st.composite
def noisy_labels(draw):
    """Arbitrary labels: any size, a random subset of values incl. 255, no structure."""
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    values = draw(st.lists(st.sampled_from(list(range(30)) + [255]), min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**31))
    return np.random.default_rng(seed).choice(np.array(values, np.uint8), (h, w))


crops = st.tuples(st.integers(1, 48), st.integers(1, 48))
seeds = st.integers(0, 2**31)


@FAST
@given(block_labels(min_block=1), crops, seeds)
def test_without_scaling_every_pixel_keeps_its_label_colour(label, crop, seed):
    t = TrainTransform(crop, scale_range=(1.0, 1.0), flip=True, preprocessing=IDENTITY)
    out = t(encode(label), label, np.random.default_rng(seed))
    image, lbl = out["image"], out["label"]
    real = lbl != 255  # input labels are < 12, so 255 is exactly the padding
    assert decode_matches(image, lbl, 0)[real].all()
    assert (image[:, ~real] == 0).all()


@FAST
@given(block_labels(), crops, seeds, st.floats(0.5, 1.5))
def test_scaled_crops_stay_aligned(label, crop, seed, scale):
    """Away from label edges, the bilinear image colour is the colour of the nearest label."""
    t = TrainTransform(crop, scale_range=(scale, scale), flip=True, preprocessing=IDENTITY)
    out = t(encode(label), label, np.random.default_rng(seed))
    image, lbl = out["image"], out["label"]
    # pixels whose 3x3 neighbourhood has one label (and is no padding)
    pad = torch.nn.functional.pad(lbl[None, None].float(), (1, 1, 1, 1), value=-1)[0, 0]
    windows = pad.unfold(0, 3, 1).unfold(1, 3, 1).reshape(*lbl.shape, 9)
    interior = (windows == lbl[..., None]).all(-1) & (lbl != 255)
    assert decode_matches(image, lbl, 1.01)[interior].all()


def test_alignment_check_catches_a_one_pixel_shift():
    """The property above is strong enough to see a misaligned label."""
    label = np.kron(np.arange(16).reshape(4, 4) % NUM_VALUES, np.ones((8, 8), int)).astype(
        np.uint8)
    out = TrainTransform((32, 32), (1, 1), flip=False, preprocessing=IDENTITY)(
        encode(label), label, np.random.default_rng(0))
    shifted = torch.roll(out["label"], 1, dims=1)
    assert not decode_matches(out["image"], shifted, 1.01).all()


@FAST
@given(noisy_labels(), crops, seeds, st.floats(0.3, 2.0), st.floats(0.0, 1.0))
def test_label_values_are_never_interpolated_and_shapes_are_exact(label, crop, seed, lo, span):
    t = TrainTransform(crop, scale_range=(lo, lo + span), preprocessing=CAFFE_BGR)
    image = np.random.default_rng(seed).integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    out = t(image, label, np.random.default_rng(seed))
    assert out["image"].shape == (3, *crop) and out["image"].dtype == torch.float32
    assert out["label"].shape == crop and out["label"].dtype == torch.int64
    assert set(out["label"].unique().tolist()) <= set(np.unique(label).tolist()) | {255}


@FAST
@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 20), st.integers(0, 20), seeds)
def test_small_images_are_padded_with_ignore_and_the_mean(h, w, extra_h, extra_w, seed):
    label = np.zeros((h, w), np.uint8)
    image = np.full((h, w, 3), 200, np.uint8)
    crop = (h + extra_h, w + extra_w)
    out = TrainTransform(crop, (1, 1), preprocessing=CAFFE_BGR)(image, label,
                                                               np.random.default_rng(seed))
    # the image sits at the top left, the padding fills the bottom and right
    assert (out["label"][:h, :w] == 0).all() and (out["label"] == 255).sum() == \
        crop[0] * crop[1] - h * w
    assert (out["image"][:, h:, :] == 0).all() and (out["image"][:, :, w:] == 0).all()
    assert (out["image"][:, :h, :w] != 0).all()


@pytest.mark.parametrize("pre", [CAFFE_BGR, TORCHVISION_RGB])
def test_padding_is_what_the_mean_pixel_becomes(pre):
    """Zero padding after normalisation = padding with the preprocessing's mean pixel (up to
    the half grey level lost by rounding the mean to uint8)."""
    mean = np.array(pre.mean_pixel_rgb_uint8(), np.uint8)
    half_level = 0.5 / (pre.scale * min(pre.std))
    assert pre(np.broadcast_to(mean, (2, 2, 3)).copy()).abs().max() <= half_level + 1e-6


def test_flip_happens_half_the_time_and_mirrors_both():
    label = np.arange(12, dtype=np.uint8).reshape(1, 12) % NUM_VALUES
    t = TrainTransform((1, 12), (1, 1), flip=True, preprocessing=IDENTITY)
    flips = 0
    for seed in range(40):
        out = t(encode(label), label, np.random.default_rng(seed))
        flipped = out["label"][0, 0].item() == 11
        assert out["label"][0].tolist() == (label[0, ::-1] if flipped else label[0]).tolist()
        assert decode_matches(out["image"], out["label"], 0).all()
        flips += flipped
    assert 8 <= flips <= 32
    no_flip = TrainTransform((1, 12), (1, 1), flip=False, preprocessing=IDENTITY)
    assert all(no_flip(encode(label), label, np.random.default_rng(s))["label"][0, 0] == 0
               for s in range(10))


def test_same_seed_epoch_index_gives_the_same_sample():
    t = TrainTransform((40, 56), scale_range=(0.5, 1.5))
    ds = SyntheticDataset("train", size=(48, 64), num_samples=4, seed=1, transform=t)
    a, b = ds[2], ds[2]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["name"] == "synthetic_train_000002"
    ds.set_epoch(1)
    c = ds[2]
    assert not torch.equal(a["image"], c["image"])
    ds.set_epoch(0)
    assert torch.equal(ds[2]["label"], a["label"])


def test_eval_transform_is_the_whole_image_preprocessed():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    label = np.full((5, 7), 3, np.uint8)
    out = EvalTransform(CAFFE_BGR)(image, label, None)
    assert torch.equal(out["image"], CAFFE_BGR(image)[0])
    assert out["label"].dtype == torch.int64 and out["label"].shape == (5, 7)
    assert (out["label"] == 3).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        TrainTransform((0, 10))
    with pytest.raises(ValueError):
        TrainTransform(10, scale_range=(1.5, 0.5))


def test_discrete_scale_set_draws_only_its_scales():
    # The released DeepLab v2 recipe draws the scale from {0.5, 0.75, 1, 1.25, 1.5}: a 40x40
    # label scaled by s keeps round(40 s) rows before padding/cropping to 80x80.
    t = TrainTransform((80, 80), scale_range=(0.5, 1.5), flip=False, preprocessing=IDENTITY,
                       scales=[0.5, 0.75, 1, 1.25, 1.5])
    image = np.zeros((40, 40, 3), np.uint8)
    label = np.zeros((40, 40), np.uint8)
    valid_rows = set()
    for seed in range(60):
        out = t(image, label, np.random.default_rng(seed))
        valid_rows.add(int((out["label"] != 255).any(1).sum()))
    assert valid_rows == {20, 30, 40, 50, 60}
    with pytest.raises(ValueError, match="scales must be positive"):
        TrainTransform(10, scales=[1, 0])

"""The parts of the domain adaptation methods against independent computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from deeplabv2.adapt.discriminator import (FCDiscriminator, adversarial_loss,
                                           discriminator_loss, domain_loss)
from deeplabv2.adapt.entropy import (charbonnier_entropy, entropy_loss, entropy_map,
                                     self_information)
from deeplabv2.adapt.fda import fda_source_to_target, low_frequency_size
from deeplabv2.adapt.mix import (EMATeacher, classmix_masks, colour_jitter, confidence_weight,
                                 gaussian_blur, mix, strong_augment, weighted_cross_entropy)


# -- FDA ----------------------------------------------------------------------------------------
def fda_numpy(src, trg, beta):
    """The amplitude swap written with NumPy's FFT, corner blocks of side floor(min(H, W) beta)."""
    fs, ft = np.fft.fft2(src, axes=(-2, -1)), np.fft.fft2(trg, axes=(-2, -1))
    amp, pha, amp_t = np.abs(fs), np.angle(fs), np.abs(ft)
    h, w = src.shape[-2:]
    b = int(np.floor(min(h, w) * beta))
    for ys in (slice(0, b), slice(h - b, h)):
        for xs in (slice(0, b), slice(w - b, w)):
            amp[..., ys, xs] = amp_t[..., ys, xs]
    return np.real(np.fft.ifft2(amp * np.exp(1j * pha), axes=(-2, -1)))


@pytest.mark.parametrize("beta", [0.01, 0.05, 0.09, 0.2])
def test_fda_matches_the_numpy_reference(beta):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 255, (2, 3, 48, 80))
    trg = rng.uniform(0, 255, (2, 3, 48, 80)) * 0.5 + 60
    out = fda_source_to_target(torch.from_numpy(src), torch.from_numpy(trg), beta)
    np.testing.assert_allclose(out.numpy(), fda_numpy(src, trg, beta), rtol=1e-4, atol=1e-2)
    b = low_frequency_size(48, 80, beta)
    if b:  # the mean colour (the DC bin) is the target's, the phase the source's
        np.testing.assert_allclose(out.numpy().mean((-1, -2)), trg.mean((-1, -2)), rtol=1e-4)


def test_fda_with_a_band_of_zero_is_the_identity_and_sizes_must_match():
    x = torch.rand(1, 3, 20, 30) * 255
    assert low_frequency_size(20, 30, 0.01) == 0
    assert torch.equal(fda_source_to_target(x, torch.zeros_like(x), 0.01), x)
    with pytest.raises(ValueError, match="same height and width"):
        fda_source_to_target(x, torch.zeros(1, 3, 21, 30), 0.05)
    with pytest.raises(ValueError, match="beta"):
        fda_source_to_target(x, x, 0.7)


# -- entropy ------------------------------------------------------------------------------------
def test_entropy_maps_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 4, 6)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = -(p * np.log(p)).sum(1) / np.log(5)
    t = torch.from_numpy(logits)
    np.testing.assert_allclose(entropy_map(t).numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(self_information(t).sum(1).numpy(), ref, rtol=1e-6)
    assert entropy_loss(t).item() == pytest.approx(ref.mean())
    assert charbonnier_entropy(t).item() == pytest.approx(((ref ** 2 + 1e-8) ** 2).mean())
    # uniform scores: entropy 1; confident scores: 0
    assert entropy_map(torch.zeros(1, 7, 2, 2)).allclose(torch.ones(1, 2, 2))
    sharp = torch.full((1, 7, 2, 2), -1e4)
    sharp[:, 3] = 1e4
    assert entropy_map(sharp).abs().max() < 1e-6


def test_minimising_entropy_sharpens_the_prediction():
    logits = torch.tensor([[[[1.0]], [[0.5]], [[0.0]]]], requires_grad=True)
    entropy_loss(logits).backward()
    # gradient descent raises the winning score and lowers the others
    assert logits.grad[0, 0] < 0 and logits.grad[0, 2] > 0


# -- discriminator ------------------------------------------------------------------------------
def test_discriminator_shapes_and_the_sign_of_each_term():
    torch.manual_seed(0)
    d = FCDiscriminator(19)
    assert d(torch.randn(2, 19, 65, 129)).shape == (2, 1, 2, 4)  # five 4x4/2 convolutions
    assert domain_loss(torch.full((1, 1, 2, 2), 20.0), 1.0) < 1e-6  # says "target", is target
    assert domain_loss(torch.full((1, 1, 2, 2), 20.0), 0.0) > 10
    target_map = torch.softmax(torch.randn(2, 19, 33, 33), 1).requires_grad_()
    source_map = torch.softmax(torch.randn(2, 19, 33, 33), 1)
    # the segmentation network's term: D frozen (no gradient), the map gets one
    adversarial_loss(d, target_map).backward()
    assert all(p.grad is None for p in d.parameters()) and target_map.grad is not None
    assert all(p.requires_grad for p in d.parameters())
    # ... and it is the BCE of D's output against "source" (0)
    with torch.no_grad():
        out = d(target_map)
        expected = nn.functional.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
    assert adversarial_loss(d, target_map).item() == pytest.approx(expected.item())
    # the discriminator's term: only D gets gradients, and steps lower it (a narrow D: fast)
    d = FCDiscriminator(19, width=8)
    target_map.grad = None
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.9, 0.99))
    before = discriminator_loss(d, source_map, target_map)
    before.backward()
    assert target_map.grad is None and all(p.grad is not None for p in d.parameters())
    for _ in range(5):
        opt.zero_grad()
        discriminator_loss(d, source_map, target_map).backward()
        opt.step()
    assert discriminator_loss(d, source_map, target_map) < before


# -- DACS ---------------------------------------------------------------------------------------
def test_classmix_takes_half_of_the_present_classes_and_ignores_255():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 255]],
                           [[4, 4, 4, 4], [255, 255, 4, 4]]])
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        masks = classmix_masks(labels, g)
        chosen = set(labels[0][masks[0] == 1].tolist())
        assert len(chosen) == 2 and 255 not in chosen  # ceil(4 / 2) of {0, 1, 2, 3}
        for c in chosen:  # every pixel of a chosen class, none of the others
            assert (masks[0][labels[0] == c] == 1).all()
        assert (masks[0][labels[0] == 255] == 0).all()
        assert masks[1].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]  # ceil(1 / 2) = 1 class


def test_mix_of_images_labels_and_weights():
    m = torch.tensor([[[1.0, 0.0]]])
    src, trg = torch.full((1, 3, 1, 2), 10.0), torch.full((1, 3, 1, 2), 2.0)
    assert mix(m, src, trg)[0, :, 0].tolist() == [[10.0, 2.0]] * 3
    labels = mix(m, torch.tensor([[[5, 5]]]), torch.tensor([[[7, 7]]]))
    assert labels.tolist() == [[[5, 7]]] and labels.dtype == torch.int64
    w = mix(m, torch.ones(1, 1, 2), torch.full((1, 1, 2), 0.3))
    torch.testing.assert_close(w, torch.tensor([[[1.0, 0.3]]]))


def test_confidence_weight_and_weighted_cross_entropy():
    probs = torch.tensor([0.99, 0.5, 0.97, 0.2]).view(1, 1, 2, 2)
    probs = torch.cat([probs, 1 - probs], 1)  # max: 0.99, 0.5, 0.97, 0.8
    assert confidence_weight(probs) == pytest.approx(0.5)
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 255]]])
    weights = torch.tensor([[[1.0, 0.5], [0.25, 1.0]]])
    ce = nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(
        (ce * weights).sum().item() / 4)


def test_ema_teacher_rate_schedule():
    student = nn.Linear(2, 2)
    teacher = EMATeacher(student, alpha=0.99)
    with torch.no_grad():
        student.weight.fill_(1.0)
    assert teacher.update(student, 0) == 0.0  # iteration 0: the teacher becomes the student
    assert torch.equal(teacher.model.weight, student.weight)
    with torch.no_grad():
        student.weight.fill_(3.0)
    assert teacher.update(student, 9) == pytest.approx(0.9)  # min(1 - 1/10, 0.99)
    torch.testing.assert_close(teacher.model.weight, torch.full((2, 2), 0.9 * 1 + 0.1 * 3))
    assert teacher.update(student, 10_000) == 0.99
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training


def test_strong_augmentation_keeps_grey_grey_and_constant_images_constant():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((2, 3, 16, 24), 100.0)
    out = colour_jitter(grey, 0.25, g)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-3) and torch.allclose(out[:, 1], out[:, 2], atol=1e-3)
    assert gaussian_blur(grey, 0.8).allclose(grey)
    x = torch.rand(2, 3, 16, 24, generator=g) * 255
    y = strong_augment(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255 + 1e-3
    blurred = gaussian_blur(x, 1.0)
    assert blurred.std() < x.std()  # smoother
    assert abs(blurred.mean() - x.mean()) < 1.0
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 200
    rotated = colour_jitter(red, 1.0, torch.Generator().manual_seed(3))
    assert not torch.allclose(rotated[:, 0], red[:, 0])  # hue moved off pure red
    assert math.isfinite(float(rotated.sum()))


_BLUR_UNDER_AUTOCAST = """
import torch
from deeplabv2.adapt.mix import gaussian_blur
torch.manual_seed(0)
x = (torch.rand(2, 3, 96, 160) * 255).contiguous(memory_format=torch.channels_last)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = gaussian_blur(x, 0.7)
assert y.dtype == torch.float32, y.dtype
assert torch.equal(y, gaussian_blur(x.contiguous(), 0.7))
print("ok")
"""


def test_blur_runs_in_float32_under_bf16_autocast_on_channels_last_input():
    """DACS blurs inside the training step, under the AMP autocast: the blur must not follow
    it (a bf16 channels-last depthwise 1x17 convolution never returned on an AMX Xeon, torch
    2.13). In a subprocess with a timeout, so that a regression fails instead of hanging."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", _BLUR_UNDER_AUTOCAST], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]

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
from deeplabv2.adapt.mix import (EMATeacher, apply_colour_jitter, blur_kernel_size,
                                 classmix_masks, colour_jitter, confidence_weight, gaussian_blur,
                                 jitter_parameters, mix, strong_augment, weighted_cross_entropy)


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


@pytest.mark.parametrize("alignment", ["caffe", "pytorch"])
def test_minent_is_advents_entropy_of_the_upsampled_softmax(alignment):
    """train_UDA.py train_minent: interp_target (the scores at the target crop's size), softmax,
    entropy_loss = -sum(p log2(p + 1e-30)) / (n h w log2 C); main and auxiliary terms."""
    from deeplabv2 import build_model
    from deeplabv2.adapt.methods import MinEnt, Step
    from deeplabv2.config import AdaptConfig
    from deeplabv2.model import get_alignment
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                         "num_classes": 5, "aux_head": True}).eval()
    model.alignment = get_alignment(alignment)
    with torch.no_grad():
        for conv in [*model.head.convs, *model.aux_head.convs]:
            conv.weight.normal_(0, 0.3)
    settings = AdaptConfig(method="minent", multi_level=True, lambda_ent=0.001,
                           lambda_ent_aux=0.0002)
    method = MinEnt(settings, model)
    target = torch.randn(2, 3, 45, 61)
    step = Step(net=model, model=model, images=target, labels=torch.zeros(2, 45, 61).long(),
                target=target, iteration=0, seg_loss=lambda s, l: s.sum())
    with torch.no_grad():
        got = method.loss(step, 1)
        main, aux = model(target, upsample=True, aux=True)  # the model's own upsampling

    def released(scores):
        p = torch.softmax(scores.double(), 1)
        n, c, h, w = p.shape
        return float(-(p * torch.log2(p + 1e-30)).sum() / (n * h * w * math.log2(c)))
    assert main.shape[-2:] == (45, 61)
    want = 0.001 * released(main) + 0.0002 * released(aux)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # not the stride-8 entropy it was computed on before
    with torch.no_grad():
        m8, a8 = model(target, upsample=False, aux=True)
    assert abs(0.001 * released(m8) + 0.0002 * released(a8) - want) > 1e-4 * want


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
def test_classmix_counts_255_as_a_value_and_may_paste_it_as_dacs_released():
    """trainUDA.py: classes = torch.unique(labels[i]) (the ``!= ignore_label`` filter commented
    out), ceil(n / 2) of them drawn: 255 is one of the n and is sometimes pasted."""
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 255]],
                           [[4, 4, 4, 4], [255, 255, 4, 4]]])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        masks = classmix_masks(labels, g)
        for i in range(2):
            chosen = set(labels[i][masks[i] == 1].tolist())
            present = set(labels[i].unique().tolist())
            assert len(chosen) == math.ceil(len(present) / 2)  # 5 -> 3 (image 0), 2 -> 1
            for c in present:  # all pixels of a chosen value, none of the others
                assert (masks[i][labels[i] == c] == (1 if c in chosen else 0)).all()
            seen.add((i, 255 in chosen))
    assert seen == {(0, True), (0, False), (1, True), (1, False)}
    # the commented-out filter, for who wants it: 255 is never drawn, ceil(4 / 2) of 0..3
    for _ in range(10):
        masks = classmix_masks(labels, g, ignored_is_a_class=False)
        chosen = set(labels[0][masks[0] == 1].tolist())
        assert len(chosen) == 2 and 255 not in chosen
        assert masks[1].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # a pasted 255 stays 255 in the mixed label: no loss there
    m = (labels == 255).float()
    mixed = mix(m, labels, torch.zeros_like(labels))
    assert (mixed[labels == 255] == 255).all() and (mixed[labels != 255] == 0).all()


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


# kornia 0.2.1-0.5.x ColorJitter as DACS calls it (transformsgpu.colorJitter), written out per
# pixel with the standard library's colorsys: the image DACS hands kornia is BGR in [0, 1].
def _jitter_reference(rgb255, shift, contrast, saturation, hue_rad, order):
    import colorsys
    x = np.asarray(rgb255, np.float64)[::-1] / 255  # BGR, kornia reads channel 0 as red
    for step in order:
        if step == 0:
            x = np.clip(x + shift, 0, 1)
        elif step == 1:
            x = np.clip(x * contrast, 0, 1)
        else:
            y = np.empty_like(x)
            for i in range(x.shape[1]):
                for j in range(x.shape[2]):
                    h, s_, v = colorsys.rgb_to_hsv(*x[:, i, j])
                    if step == 2:
                        s_ = min(max(s_ * saturation, 0.0), 1.0)
                    else:
                        h = (h + hue_rad / (2 * math.pi)) % 1.0
                    y[:, i, j] = colorsys.hsv_to_rgb(h, s_, v)
            x = y
    return x[::-1] * 255


def test_colour_jitter_is_kornias_on_the_bgr_image_in_the_drawn_order():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=g) * 255
    x[0, :, 0, 0] = torch.tensor([200.0, 0.0, 0.0])  # pure red, a grey, a two-way maximum
    x[0, :, 0, 1] = 90.0
    x[0, :, 0, 2] = torch.tensor([120.0, 120.0, 30.0])
    orders = set()
    for _ in range(6):
        params = jitter_parameters(2, 0.25, g)
        got = apply_colour_jitter(x, params)
        for i in range(2):
            orders.add(tuple(params["order"][i].tolist()))
            want = _jitter_reference(x[i].numpy(), float(params["brightness"][i]),
                                     float(params["contrast"][i]), float(params["saturation"][i]),
                                     float(params["hue"][i]), params["order"][i].tolist())
            np.testing.assert_allclose(got[i].numpy(), want, atol=2e-3)
    assert len(orders) > 3  # a permutation per image and call
    # the order matters, and each order is the reference's
    params = {"brightness": torch.tensor([0.2]), "contrast": torch.tensor([1.25]),
              "saturation": torch.tensor([0.8]), "hue": torch.tensor([1.0]),
              "order": torch.tensor([[0, 1, 2, 3]])}
    outs = []
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        params["order"] = torch.tensor([order])
        outs.append(apply_colour_jitter(x[:1], params)[0])
        np.testing.assert_allclose(outs[-1].numpy(), _jitter_reference(
            x[0].numpy(), 0.2, 1.25, 0.8, 1.0, order), atol=2e-3)
    assert not torch.allclose(outs[0], outs[1], atol=1.0)


def test_each_jitter_step_by_its_definition():
    one = {"brightness": torch.tensor([0.0]), "contrast": torch.tensor([1.0]),
           "saturation": torch.tensor([1.0]), "hue": torch.tensor([0.0])}
    def run(img, **kw):
        p = {**one, **{k: torch.tensor([v]) for k, v in kw.items()}}
        p["order"] = torch.tensor([[0, 1, 2, 3]])
        return apply_colour_jitter(torch.tensor(img, dtype=torch.float32).view(1, 3, 1, -1), p
                                   ).view(3, -1)
    grey = [[100.0, 250.0], [100.0, 250.0], [100.0, 250.0]]
    # brightness: additive in [0, 1] (0.1 -> +25.5 of 255), clamped at 1
    torch.testing.assert_close(run(grey, brightness=0.1), torch.tensor([[125.5, 255.0]] * 3))
    # contrast: a factor about 0, no mean, clamped at 1
    torch.testing.assert_close(run(grey, contrast=1.2), torch.tensor([[120.0, 255.0]] * 3))
    # saturation: grey has none to scale; a colour moves towards / away from its maximum
    torch.testing.assert_close(run(grey, saturation=0.75), torch.tensor(grey))
    col = [[200.0], [100.0], [50.0]]  # v = 200: each channel c -> 200 - f (200 - c)
    torch.testing.assert_close(run(col, saturation=0.5), torch.tensor([[200.0], [150.0], [125.0]]))
    # hue: radians, on the BGR image, so +d there is -d on our RGB. Our red (200, 0, 0) is
    # (0, 0, 200) to kornia, blue (240 degrees); +60 degrees: magenta (200, 0, 200) either way
    # round. On RGB that is red turned by -60 degrees.
    torch.testing.assert_close(run([[200.0], [0.0], [0.0]], hue=math.pi / 3),
                               torch.tensor([[200.0], [0.0], [200.0]]), atol=1e-3, rtol=0)
    # and by -pi/3 on BGR, +60 degrees on RGB: yellow
    torch.testing.assert_close(run([[200.0], [0.0], [0.0]], hue=-math.pi / 3),
                               torch.tensor([[200.0], [200.0], [0.0]]), atol=1e-3, rtol=0)


def test_jitter_draws_kornias_ranges_per_image():
    g = torch.Generator().manual_seed(1)
    p = jitter_parameters(3000, 0.25, g)
    for key, lo, hi in (("brightness", -0.25, 0.25), ("contrast", 0.75, 1.25),
                        ("saturation", 0.75, 1.25), ("hue", -math.pi / 2, math.pi / 2)):
        v = p[key]
        assert v.shape == (3000,) and v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6, key
        span = hi - lo  # uniform: reaches near both ends, mean in the middle
        assert v.min() < lo + 0.01 * span and v.max() > hi - 0.01 * span, key
        assert abs(float(v.mean()) - (lo + hi) / 2) < 0.03 * span, key
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # permutations
    assert len({tuple(o) for o in p["order"].tolist()}) == 24
    # kornia's clamps: brightness factor in [0, 2], hue in [-0.5, 0.5] turns
    p = jitter_parameters(2000, 1.5, g)
    assert p["brightness"].min() >= -1 and p["brightness"].max() <= 1
    assert p["brightness"].min() < -0.95 and p["brightness"].max() > 0.95
    assert p["hue"].abs().max() <= math.pi + 1e-6 and p["hue"].abs().max() > 0.97 * math.pi
    assert p["contrast"].min() >= 0 and p["contrast"].max() > 2.4
    with pytest.raises(ValueError, match="strength"):
        jitter_parameters(1, -0.1)


def test_blur_kernel_and_values_are_dacs_kornia_blur():
    for length in range(1, 1200):
        c = np.ceil(0.1 * length)  # transformsgpu.gaussian_blur's kernel_size_y / _x
        assert blur_kernel_size(length) == int(np.floor(c - 0.5 + c % 2)), length
    assert blur_kernel_size(512) == 51 and blur_kernel_size(1024) == 103
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 52, 64, generator=g) * 255
    sigmas = torch.tensor([0.4, 1.1])
    got = gaussian_blur(x, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        kh, kw = 5, 7  # 52 -> ceil 6 -> 5; 64 -> ceil 7 -> 7
        def k1(k):
            r = np.arange(k) - k // 2
            w = np.exp(-r ** 2 / (2 * sigma ** 2))
            return w / w.sum()
        kern = np.outer(k1(kh), k1(kw))
        pad = np.pad(x[i].double().numpy(), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                     mode="reflect")
        want = np.zeros((3, 52, 64))
        for dy in range(kh):
            for dx in range(kw):
                want += kern[dy, dx] * pad[:, dy:dy + 52, dx:dx + 64]
        np.testing.assert_allclose(got[i].numpy(), want, atol=1e-3)
    # tiny sides: kernel 1, no blur on that axis
    small = torch.rand(1, 3, 9, 64, generator=g)  # 9 rows: ceil(0.9) = 1
    other = small.clone()
    other[:, :, 0] = 0  # rows do not mix: the others' blur is unchanged
    assert torch.equal(gaussian_blur(small, 0.5)[:, :, 1:], gaussian_blur(other, 0.5)[:, :, 1:])
    assert not torch.allclose(gaussian_blur(small, 0.5), small)  # the columns' still blurs
    assert gaussian_blur(torch.full((1, 3, 30, 30), 7.0), 0.8).allclose(torch.tensor(7.0))
    with pytest.raises(ValueError, match="3 sigmas for 2 images"):
        gaussian_blur(x, torch.tensor([0.2, 0.3, 0.4]))


def test_strong_augment_jitters_then_blurs_with_dacs_probabilities(monkeypatch):
    import deeplabv2.adapt.mix as mixmod
    calls = []
    monkeypatch.setattr(mixmod, "colour_jitter",
                        lambda im, s, g=None: (calls.append(("jitter", s)), im + 1)[1])
    monkeypatch.setattr(mixmod, "gaussian_blur",
                        lambda im, sig: (calls.append(("blur", sig, float(im.mean()))), im)[1])
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(2, 3, 4, 4)
    n, jit, blur = 3000, 0, 0
    sigmas = []
    for _ in range(n):
        calls.clear()
        mixmod.strong_augment(x, g)
        names = [c[0] for c in calls]
        assert names in ([], ["jitter"], ["blur"], ["jitter", "blur"])
        jit += "jitter" in names
        if "blur" in names:
            blur += 1
            _, sig, mean_seen = calls[-1]
            assert mean_seen == (1.0 if "jitter" in names else 0.0)  # blur sees the jittered
            sigmas.append(sig)
        if "jitter" in names:
            assert calls[0][1] == 0.25
    assert abs(jit / n - 0.8) < 0.03 and abs(blur / n - 0.5) < 0.03
    s = torch.stack(sigmas)
    assert s.shape[1] == 2 and (s >= 0.15).all() and (s <= 1.15).all()  # one per image
    assert (s[:, 0] != s[:, 1]).all() and s.min() < 0.17 and s.max() > 1.13


def test_strong_augmentation_keeps_grey_grey_and_range():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((2, 3, 16, 24), 100.0)
    out = colour_jitter(grey, 0.25, g)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-3) and torch.allclose(out[:, 1], out[:, 2], atol=1e-3)
    x = torch.rand(2, 3, 16, 24, generator=g) * 255
    for _ in range(5):
        y = strong_augment(x, g)
        assert y.shape == x.shape and y.min() >= -1e-3 and y.max() <= 255 + 1e-3


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

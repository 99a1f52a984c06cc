"""Test-time modes: whole image, sliding window, multi-scale and flip, against known answers."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deeplabv2 import build_model
from deeplabv2.inference.front import InferenceConfig, infer, predict_probs, window_starts

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 5}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(TINY).eval()


def image(n, h, w, seed=1):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 50


class Pixelwise(nn.Module):
    """Scores of each pixel from that pixel alone (a 1x1 conv): exactly translation-equivariant,
    so any tiling of the image into windows must give back the whole-image answer."""

    def __init__(self, classes=4):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x, upsample=True):
        return self.conv(x)


class WindowConstant(nn.Module):
    """Two classes, one probability per window: ``p0 = 0.1 + 0.4/3 * (left column index)``,
    read from channel 0 of the window's top-left pixel."""

    def forward(self, x, upsample=True):
        p0 = 0.1 + 0.4 / 3 * x[:, 0, 0, 0]
        logits = torch.stack([p0.log(), (1 - p0).log()], 1)
        return logits[:, :, None, None].expand(-1, -1, *x.shape[-2:])


def test_scale_one_whole_image_is_the_single_scale_path(tiny):
    x = image(2, 37, 45)
    expected = predict_probs(tiny, x)
    assert torch.equal(infer(tiny, x), expected)
    assert torch.equal(InferenceConfig()(tiny, x), expected)
    out = infer(tiny, x, avg_scales=[1.0, 1.0])  # the same pass twice, averaged
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 37, 45)


def test_window_covering_the_image_is_whole_image_inference(tiny):
    x = image(1, 41, 57)
    out = infer(tiny, x, mode="sliding", crop_size=(41, 57))
    torch.testing.assert_close(out, predict_probs(tiny, x), rtol=0, atol=1e-6)


def test_image_smaller_than_the_window_is_zero_padded_then_cropped(tiny):
    x = image(2, 20, 30)
    out = infer(tiny, x, mode="sliding", crop_size=33, stride=16)
    padded = F.pad(x, (0, 3, 0, 13))  # zero = the mean pixel after preprocessing
    expected = predict_probs(tiny, padded)[:, :, :20, :30]
    assert out.shape == (2, 5, 20, 30)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # only one side too small: padded to the window's height, tiled along the width
    assert infer(tiny, image(1, 20, 70), mode="sliding", crop_size=33).shape == (1, 5, 20, 70)


def test_window_starts_end_at_the_border():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 1) == [0]
    assert window_starts(1024, 513, 342) == [0, 342, 511]
    assert window_starts(2048, 513, 342) == [0, 342, 684, 1026, 1368, 1535]


def test_overlapping_windows_average_with_the_count_map():
    # width 10, crop 4, stride 3: windows at columns 0, 3, 6 with p0 = 0.1, 0.5, 0.9.
    x = torch.arange(10.0).expand(1, 3, 2, 10).clone()
    out = infer(WindowConstant(), x, mode="sliding", crop_size=(2, 4), stride=(2, 3))
    expected = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.5, 0.5, 0.7, 0.9, 0.9, 0.9])
    torch.testing.assert_close(out[0, 0], expected.expand(2, 10))
    torch.testing.assert_close(out.sum(1), torch.ones(1, 2, 10))


@pytest.mark.parametrize("crop, stride", [((8, 8), (3, 5)), ((16, 7), (16, 7)), ((5, 5), (1, 2))])
def test_sliding_equals_whole_for_a_translation_equivariant_model(crop, stride):
    model, x = Pixelwise(), image(2, 19, 23)
    out = infer(model, x, mode="sliding", crop_size=crop, stride=stride)
    torch.testing.assert_close(out, predict_probs(model, x))


def test_flip_adds_nothing_for_a_mirror_equivariant_model():
    # Left-right symmetric kernels make every conv commute with the mirror, as long as each
    # stride-2 layer samples a symmetric grid: widths 33 -> 17 -> 9 -> 5 are all odd.
    torch.manual_seed(3)
    model = build_model(TINY).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    x = image(1, 29, 33)
    plain = infer(model, x)
    torch.testing.assert_close(infer(model, x.flip(-1)), plain.flip(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(infer(model, x, flip=True), plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(infer(model, x, flip=True, avg_scales=[1.0, 1.0]), plain,
                               rtol=0, atol=1e-5)


def test_flip_averaging_makes_any_model_mirror_equivariant(tiny):
    x = image(1, 30, 44)
    plain = infer(tiny, x)
    averaged = infer(tiny, x, flip=True)
    assert not torch.allclose(plain, averaged)  # the tiny model is not symmetric by itself
    torch.testing.assert_close(averaged, (plain + infer(tiny, x.flip(-1)).flip(-1)) / 2)
    torch.testing.assert_close(infer(tiny, x.flip(-1), flip=True), averaged.flip(-1))


def test_multi_scale_averages_the_resized_single_scale_probabilities(tiny):
    x = image(1, 40, 52)
    half = infer(tiny, x, avg_scales=[0.5])
    # Caffe's Interp: (40 - 1) // 2 + 1 = 20, (52 - 1) // 2 + 1 = 26, corners aligned
    small = F.interpolate(x, size=(20, 26), mode="bilinear", align_corners=True)
    expected = F.interpolate(predict_probs(tiny, small), size=(40, 52), mode="bilinear",
                             align_corners=True)
    torch.testing.assert_close(half, expected)
    both = infer(tiny, x, avg_scales=[0.5, 1.0, 1.5])
    parts = [infer(tiny, x, avg_scales=[s]) for s in (0.5, 1.0, 1.5)]
    torch.testing.assert_close(both, sum(parts) / 3)
    torch.testing.assert_close(both.sum(1), torch.ones(1, 40, 52))
    # multi-scale, flip and sliding together: shape and normalisation
    out = infer(tiny, x, mode="sliding", crop_size=24, stride=16, avg_scales=[0.75, 1.25], flip=True)
    assert out.shape == (1, 5, 40, 52)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 40, 52))


def test_invalid_arguments_name_the_value(tiny):
    x = image(1, 16, 16)
    with pytest.raises(ValueError, match=r"stride \[9, 9\] is larger than crop_size \[8, 8\]"):
        infer(tiny, x, mode="sliding", crop_size=8, stride=9)
    with pytest.raises(ValueError, match="scales must be positive, got -0.5"):
        infer(tiny, x, avg_scales=[1.0, -0.5])
    with pytest.raises(ValueError, match="scales must be positive, got 0.0"):
        InferenceConfig(avg_scales=[0])
    with pytest.raises(ValueError, match="scales must be positive, got -1.0"):
        InferenceConfig(msc_scales=[1, -1])
    with pytest.raises(ValueError, match="'scales' is now 'avg_scales'"):
        InferenceConfig.from_dict({"scales": [1.0]})
    with pytest.raises(ValueError, match="needs crop_size"):
        infer(tiny, x, mode="sliding")
    with pytest.raises(ValueError, match="'tiles'"):
        infer(tiny, x, mode="tiles")
    with pytest.raises(ValueError, match="crop_size must be a positive int"):
        InferenceConfig(mode="sliding", crop_size=[0, 5])


def test_config_from_dict_and_as_predict_callable(tiny):
    cfg = InferenceConfig.from_dict({"mode": "sliding", "avg_scales": [0.5, 1], "flip": True,
                                     "crop_size": 513, "msc_scales": [1, 0.75, 0.5]})
    assert cfg.crop_size == (513, 513) and cfg.stride == (342, 342)
    assert cfg.avg_scales == (0.5, 1.0) and cfg.msc_scales == (1.0, 0.75, 0.5)
    assert cfg.describe() == ("sliding 513x513 / 342x342, MSC max-fused 1,0.75,0.5, averaged "
                              "scales 0.5,1, flip")
    assert InferenceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown inference keys \\['flips'\\]; valid: mode, "
                                         "msc_scales, avg_scales, flip, crop_size, stride"):
        InferenceConfig.from_dict({"flips": True})
    x = image(1, 24, 24)
    small = InferenceConfig(mode="sliding", crop_size=16, stride=8, flip=True)
    torch.testing.assert_close(small(tiny, x), infer(tiny, x, mode="sliding", crop_size=16,
                                                     stride=8, flip=True))


def test_bf16_autocast_returns_float32_probabilities(tiny):
    x = image(1, 24, 24)
    out = infer(tiny, x, mode="sliding", crop_size=16, amp="bf16", channels_last=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, infer(tiny, x, mode="sliding", crop_size=16),
                               rtol=0, atol=0.05)


class WindowLogits(nn.Module):
    """Two classes; each window's scores are constant: ``(s, 0)`` with ``s`` the window's
    top-left value of channel 0 (the test puts a window's score there)."""

    def forward(self, x, upsample=True):
        s = x[:, :1, :1, :1].expand(-1, 1, *x.shape[-2:])
        return torch.cat([s, torch.zeros_like(s)], 1)


def test_window_fuse_logits_averages_scores_before_one_softmax():
    # one row of 6 pixels, windows of 4 every 2: [0, 4) and [2, 6); window scores 2 and -2
    x = torch.zeros(1, 3, 1, 6)
    x[0, 0, 0, 0], x[0, 0, 0, 2] = 2.0, -2.0
    sig = lambda v: 1 / (1 + torch.exp(torch.tensor(-v)))  # softmax of (v, 0), class 0
    p = infer(WindowLogits(), x, mode="sliding", crop_size=(1, 4), stride=(1, 2),
              window_fuse="logits")
    # the overlap [2, 4): mean score 0 -> 0.5; the rest one window each: sigmoid(+-2)
    expected = torch.stack([sig(2.0)] * 2 + [torch.tensor(0.5)] * 2 + [sig(-2.0)] * 2)
    torch.testing.assert_close(p[0, 0, 0], expected)
    probs = infer(WindowLogits(), x, mode="sliding", crop_size=(1, 4), stride=(1, 2))
    # averaged probabilities give the same here (sigmoid(2) + sigmoid(-2) = 1); with the second
    # window at score 0 the two rules part in the overlap
    torch.testing.assert_close(probs[0, 0, 0], expected)
    x[0, 0, 0, 2] = 0.0
    p = infer(WindowLogits(), x, mode="sliding", crop_size=(1, 4), stride=(1, 2),
              window_fuse="logits")
    probs = infer(WindowLogits(), x, mode="sliding", crop_size=(1, 4), stride=(1, 2))
    torch.testing.assert_close(p[0, 0, 0, 2], sig(1.0))  # softmax of the mean scores (1, 0)
    torch.testing.assert_close(probs[0, 0, 0, 2], (sig(2.0) + 0.5) / 2)  # mean of softmaxes
    cfg = InferenceConfig(mode="sliding", crop_size=(1, 4), stride=(1, 2), window_fuse="logits")
    torch.testing.assert_close(cfg(WindowLogits(), x), p)
    assert "window logits averaged" in cfg.describe()
    with pytest.raises(ValueError, match="window_fuse must be one of probs, logits; got 'max'"):
        InferenceConfig(mode="sliding", crop_size=4, window_fuse="max")

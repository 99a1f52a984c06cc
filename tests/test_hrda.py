"""HRDA (lhoyer/HRDA): detail-crop coordinates, scale-attention fusion, the two-crop forward and
its losses, full-resolution sliding inference. Expected values are worked out by hand or with
plain tensor operations written here, not with the module's own helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from deeplabv2.model.deeplab import build_model
from deeplabv2.model.hrda import (HRDA, detail_crop_box, fuse_scales, hrda_losses, scale_box,
                                  weighted_ce)


def tiny_network(layout="torchvision", classes=3, seed=0):
    torch.manual_seed(seed)
    net = build_model(dict(num_classes=classes, blocks=[1, 1, 1, 1], width=8, layout=layout,
                           atrous_rates=[6, 12], bn="train"))
    for conv in net.head.convs:  # visible scores
        torch.nn.init.normal_(conv.weight, 0.0, 0.3)
    return net


# -- (1) detail-crop coordinates ----------------------------------------------------------------
def test_crop_box_is_the_generators_two_draws_times_eight():
    # 1024 context, 512 detail, divisible 8: (1024 - 512 + 1) // 8 = 64 positions per side,
    # rows drawn first
    g = torch.Generator().manual_seed(123)
    box = detail_crop_box(1024, 1024, 512, 8, g)
    g2 = torch.Generator().manual_seed(123)
    a = int(torch.randint(0, 64, (1,), generator=g2))
    b = int(torch.randint(0, 64, (1,), generator=g2))
    assert box == (8 * a, 8 * a + 512, 8 * b, 8 * b + 512)
    assert detail_crop_box(1024, 1024, 512, 8, torch.Generator().manual_seed(123)) == box


def test_crop_offsets_cover_the_grid_but_not_the_last_position_as_released():
    # 40 rows, crop 16, divisible 8: margin 24, (24 + 1) // 8 = 3 -> offsets {0, 8, 16};
    # 24 (the crop at the very bottom) is never drawn, as numpy's exclusive randint releases it
    g = torch.Generator().manual_seed(0)
    tops, lefts = set(), set()
    for _ in range(300):
        y1, y2, x1, x2 = detail_crop_box(40, 56, 16, 8, g)
        assert (y2 - y1, x2 - x1) == (16, 16)
        tops.add(y1), lefts.add(x1)
    assert tops == {0, 8, 16}
    assert lefts == {0, 8, 16, 24, 32}  # (40 + 1) // 8 = 5


def test_crop_box_where_the_grid_leaves_one_position_whatever_the_draw():
    # a 40x48 context crop, a 32x32 detail crop, divisible 8: the rows have a margin of 8,
    # (8 + 1) // 8 = 1 position (top 0); the columns a margin of 16, (16 + 1) // 8 = 2
    # positions (left 0 or 8): the box is (0, 32, 0, 32) or (0, 32, 8, 40) for every seed
    boxes = {detail_crop_box(40, 48, 32, 8, torch.Generator().manual_seed(s))
             for s in range(40)}
    assert boxes == {(0, 32, 0, 32), (0, 32, 8, 40)}
    # 39 rows: a margin of 7, (7 + 1) // 8 = 1 position; 47 columns: (15 + 1) // 8 = 2
    boxes = {detail_crop_box(39, 47, 32, 8, torch.Generator().manual_seed(s))
             for s in range(40)}
    assert boxes == {(0, 32, 0, 32), (0, 32, 8, 40)}


def test_crop_box_edge_cases_and_errors():
    assert detail_crop_box(512, 512, 512) == (0, 512, 0, 512)
    with pytest.raises(ValueError, match="larger than the context"):
        detail_crop_box(256, 512, 512)
    with pytest.raises(ValueError, match="detail crop"):
        detail_crop_box(512, 512, 0)
    with pytest.raises(ValueError, match="8-pixel grid"):
        detail_crop_box(20, 20, 16, 8)  # margin 4: (4 + 1) // 8 = 0 positions


def test_scale_box_truncates():
    assert scale_box((8, 520, 504, 1016), 16) == (0, 32, 31, 63)
    assert scale_box((8, 520, 504, 1016), 8) == (1, 65, 63, 127)


# -- (2) scale-attention fusion -----------------------------------------------------------------
def bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of bilinear resizing with half-pixel centres (align_corners=False),
    written out: source = (i + 0.5) * n_in / n_out - 0.5, clamped at 0, neighbours clamped."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def up(x, n_out_h, n_out_w):
    mh = bilinear_matrix(x.shape[-2], n_out_h)
    mw = bilinear_matrix(x.shape[-1], n_out_w)
    return torch.einsum("ih,nchw,jw->ncij", mh, x.double(), mw)


def test_fusion_matches_the_released_formula_written_out():
    torch.manual_seed(1)
    # a 64x64 context crop at full resolution: context grid 64 * 0.5 / 8 = 4, fused grid 8;
    # detail box rows 16..48, columns 24..56 (pixels): detail grid 4x4 at cells 2..6, 3..7;
    # attention mask on the context grid at box / 16 = rows 1..3, columns 1..3 (truncated)
    context = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    att = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    detail = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    box = (16, 48, 24, 56)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., 1:3, 1:3] = 1
    a = att * mask
    inserted = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    inserted[..., 2:6, 3:7] = detail
    expected = up(a, 8, 8) * inserted + up((1 - a) * context, 8, 8)
    got = fuse_scales(context, detail, att, box)
    torch.testing.assert_close(got, expected)
    # no box (inference): the detail covers the grid, the attention is not masked
    full = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fuse_scales(context, full, att),
                               up(att, 8, 8) * full + up((1 - att) * context, 8, 8))


def test_fusion_errors_name_the_grids():
    c = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="attention grid"):
        fuse_scales(c, torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2), (0, 32, 0, 32))
    with pytest.raises(ValueError, match="does not fill the box"):
        fuse_scales(c, torch.zeros(1, 3, 3, 3), c, (0, 32, 0, 32))
    with pytest.raises(ValueError, match="differs from the fused grid"):
        fuse_scales(c, torch.zeros(1, 3, 4, 4), c)


# -- (3) the two-crop forward and its losses ----------------------------------------------------
@pytest.mark.parametrize("layout", ["torchvision", "caffe"])
def test_forward_train_runs_one_network_on_both_crops(layout):
    net = tiny_network(layout)
    model = HRDA(net, detail_crop=32).train()
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_train(x, torch.Generator().manual_seed(5))
    y1, y2, x1, x2 = out["box"]
    assert (y2 - y1, x2 - x1) == (32, 32) and y1 % 8 == 0 and x1 % 8 == 0
    # independent: the context is x at half size (bilinear, half-pixel centres), the network's
    # stride-8 scores trimmed to 32 / 8 = 4 cells (the caffe layout has one more)
    small = torch.einsum("ih,nchw,jw->ncij", bilinear_matrix(64, 32).float(), x,
                         bilinear_matrix(64, 32).float())
    feats = net.backbone(small)
    torch.testing.assert_close(out["context"], net.head(feats)[..., :4, :4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["attention"],
                               torch.sigmoid(model.scale_attention(feats))[..., :4, :4],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["detail"], net.logits(x[..., y1:y2, x1:x2])[..., :4, :4])
    torch.testing.assert_close(out["context_features"], feats, atol=1e-4, rtol=1e-4)
    assert out["fused"].shape == (2, 3, 8, 8)
    # the attention head has the network head's form and a class-wise output
    assert [c.dilation for c in model.scale_attention.convs] == [(6, 6), (12, 12)]
    assert model.scale_attention.convs[0].out_channels == 3


def test_attention_zero_gives_the_context_and_one_gives_the_detail_inside_the_box():
    net = tiny_network()
    model = HRDA(net, detail_crop=32)
    x = torch.randn(1, 3, 64, 64)
    box = (16, 48, 16, 48)  # context-grid mask rows/cols 1..3, detail cells 2..6
    for conv in model.scale_attention.convs:
        torch.nn.init.zeros_(conv.weight)
    for value, check in ((-50.0, "context"), (50.0, "detail")):
        for conv in model.scale_attention.convs:
            torch.nn.init.constant_(conv.bias, value / 2)
        out = model.forward_train(x, box=box)
        if check == "context":
            torch.testing.assert_close(out["fused"], up(out["context"], 8, 8).float())
        else:
            # cells 3..5 sit at least one cell inside the box: the upsampled mask is 1 there
            torch.testing.assert_close(out["fused"][..., 3:5, 3:5], out["detail"][..., 1:3, 1:3])


def ce_by_hand(scores, labels, weight=None):
    """Upsampled (written-out bilinear) scores, -log softmax at the label, 255 -> 0, mean."""
    s = up(scores, *labels.shape[-2:])
    logp = s - torch.logsumexp(s, dim=1, keepdim=True)
    valid = labels != 255
    picked = logp.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    loss = -picked * valid
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def test_losses_weight_fused_point_nine_and_detail_point_one_on_the_cropped_labels():
    net = tiny_network()
    model = HRDA(net, detail_crop=32)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[:, :5] = 255
    weight = torch.rand(2, 64, 64)
    box = (8, 40, 24, 56)
    out = model.forward_train(x, box=box)
    losses = hrda_losses(out, labels, weight)
    assert set(losses) == {"fused", "detail"}
    torch.testing.assert_close(losses["fused"].double(),
                               0.9 * ce_by_hand(out["fused"].detach(), labels, weight),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["detail"].double(),
                               0.1 * ce_by_hand(out["detail"].detach(), labels[:, 8:40, 24:56],
                                                weight[:, 8:40, 24:56]), rtol=1e-5, atol=1e-6)
    sum(losses.values()).backward()
    assert model.scale_attention.convs[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.backbone.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="detail loss weight"):
        hrda_losses(out, labels, detail_weight=1.0)
    torch.testing.assert_close(weighted_ce(out["fused"].detach(), labels).double(),
                               ce_by_hand(out["fused"].detach(), labels), rtol=1e-5, atol=1e-6)


def test_model_errors():
    net = tiny_network()
    with pytest.raises(ValueError, match="multiple of the output stride"):
        HRDA(net, detail_crop=30)
    model = HRDA(net, detail_crop=32)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model.forward_train(torch.zeros(1, 3, 60, 64))
    with pytest.raises(RuntimeError, match="forward_train"):
        model.train()(torch.zeros(1, 3, 64, 64))


# -- (4) full-resolution sliding inference ------------------------------------------------------
def released_starts(length, crop, stride):
    """extract_slide_feat / slide_inference: grids = max(L - c + s - 1, 0) // s + 1, window at
    i * s, moved back to end at the border."""
    grids = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(grids)]


def test_detail_sliding_averages_half_overlapping_detail_windows_on_the_grid():
    net = tiny_network()
    model = HRDA(net, detail_crop=32).eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        got = model.detail_sliding(x)
        total = torch.zeros(1, 3, 6, 10)
        count = torch.zeros(1, 1, 6, 10)
        rows, cols = released_starts(48, 32, 16), released_starts(80, 32, 16)
        assert rows == [0, 16] and cols == [0, 16, 32, 48]
        for t in rows:
            for left in cols:
                total[..., t // 8:t // 8 + 4, left // 8:left // 8 + 4] += \
                    net.logits(x[..., t:t + 32, left:left + 32])[..., :4, :4]
                count[..., t // 8:t // 8 + 4, left // 8:left // 8 + 4] += 1
    torch.testing.assert_close(got, total / count)


def test_eval_forward_fuses_unmasked_and_runs_in_the_fronts_sliding_mode():
    from deeplabv2.inference.front import infer

    net = tiny_network()
    model = HRDA(net, detail_crop=32).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        context, att = model.context(x)
        detail = model.detail_sliding(x)
        expected = up(att, 8, 16) * detail.double() + up((1 - att) * context, 8, 16)
        torch.testing.assert_close(model(x, upsample=False).double(), expected,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).double(), up(expected, 64, 128),
                                   rtol=1e-5, atol=1e-5)
        # the test protocol: windows of the context-crop size (here 64, stride 32) over the
        # full image, probabilities averaged by the front
        probs = infer(model, x, mode="sliding", crop_size=64, stride=32)
        total = torch.zeros(1, 3, 64, 128)
        count = torch.zeros(1, 1, 64, 128)
        for left in released_starts(128, 64, 32):
            total[..., left:left + 64] += F.softmax(model(x[..., left:left + 64]), dim=1)
            count[..., left:left + 64] += 1
    torch.testing.assert_close(probs, total / count)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.fused_logits(torch.zeros(1, 3, 40, 64))


def test_eval_forward_at_any_size_pads_with_the_mean_pixel_and_crops_back():
    model = HRDA(tiny_network(), detail_crop=32).eval()
    assert model.input_multiple == 16 and HRDA(tiny_network(), 32, 0.75).input_multiple == 32
    x = torch.randn(2, 3, 75, 100)
    with torch.no_grad():
        # by hand: zeros to 80x112 (the next multiples of 16) at the bottom/right, the padded
        # input's fused scores (10x14 cells), resized to 80x112, the 75x100 corner kept
        padded = torch.zeros(2, 3, 80, 112)
        padded[..., :75, :100] = x
        scores = model.fused_logits(padded)
        assert scores.shape[-2:] == (10, 14)
        expected = F.interpolate(scores, size=(80, 112), mode="bilinear",
                                 align_corners=False)[..., :75, :100]
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model.predict(x), expected, rtol=0, atol=0)
        # the grid: ceil(75 / 8) x ceil(100 / 8) cells, the first of the padded input's
        assert torch.equal(model(x, upsample=False), scores[..., :10, :13])
        # a multiple of 16 is run as is
        y = padded[:1]
        assert torch.equal(model(y), F.interpolate(model.fused_logits(y), size=(80, 112),
                                                   mode="bilinear", align_corners=False))


def test_released_geometry_1024_context_512_detail():
    # experiments.py hrda1-512-0.1 on a 1024x1024 crop: context 512 px -> 64 cells, detail
    # 512 px -> 64 cells at box / 8, fused grid 128 cells; defaults are the released values
    model = HRDA(tiny_network(classes=2))
    assert (model.detail_crop, model.context_scale, model.divisible) == ((512, 512), 0.5, 8)
    with torch.no_grad():
        out = model.forward_train(torch.randn(1, 3, 1024, 1024), box=(504, 1016, 0, 512))
    assert out["context"].shape[-2:] == (64, 64) and out["attention"].shape[-2:] == (64, 64)
    assert out["detail"].shape[-2:] == (64, 64) and out["fused"].shape[-2:] == (128, 128)
    # the attention mask starts at context row int(504 / 16) = 31; upsampled x2 with half-pixel
    # centres, fused row i reads context rows around (i + 0.5) / 2 - 0.5, so rows 0..59 (<= 29.25
    # -> rows 29, 30) see no attention: there the fused scores are the upsampled context alone
    torch.testing.assert_close(out["fused"][..., :60, :].double(),
                               up(out["context"], 128, 128)[..., :60, :], rtol=1e-5, atol=1e-5)


# -- a released HRDA checkpoint ------------------------------------------------------------------
def released_hrda_inference(sd, x, blocks, detail=32):
    """lhoyer/HRDA ``HRDAEncoderDecoder.encode_decode`` (scales [0.5, 1], hr_slide_inference,
    overlapping) with ``HRDAHead.forward`` (no crop box: attention unmasked), written out from
    one member's tensors ``sd`` under the released names (``backbone.*``,
    ``decode_head.head.*``, ``decode_head.scale_attention.*``), eval-mode BN: logits at the
    input size."""
    from test_v1c import dlv2_head, mmseg_backbone
    b = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {k[len("decode_head.head."):]: v for k, v in sd.items()
            if k.startswith("decode_head.head.")}
    att_head = {k[len("decode_head.scale_attention."):]: v for k, v in sd.items()
                if k.startswith("decode_head.scale_attention.")}
    # the context: the image at 0.5 (mmseg resize, scale_factor, align_corners False)
    lr_feats = mmseg_backbone(b, F.interpolate(x, scale_factor=0.5, mode="bilinear",
                                               align_corners=False), blocks)
    lr_seg = dlv2_head(head, lr_feats)
    # extract_slide_feat + decode_hr: detail windows every half window, averaged per cell
    h_img, w_img = x.shape[-2:]
    stride = detail // 2
    h_grids = max(h_img - detail + stride - 1, 0) // stride + 1
    w_grids = max(w_img - detail + stride - 1, 0) // stride + 1
    preds = torch.zeros(x.shape[0], lr_seg.shape[1], h_img // 8, w_img // 8)
    count = torch.zeros(1, 1, h_img // 8, w_img // 8)
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * stride + detail, h_img), min(j * stride + detail, w_img)
            y1, x1 = max(y2 - detail, 0), max(x2 - detail, 0)
            crop = dlv2_head(head, mmseg_backbone(b, x[..., y1:y2, x1:x2], blocks))
            preds[..., y1 // 8:y2 // 8, x1 // 8:x2 // 8] += crop
            count[..., y1 // 8:y2 // 8, x1 // 8:x2 // 8] += 1
    hr_seg = preds / count
    att = torch.sigmoid(dlv2_head(att_head, lr_feats))
    up_lr = F.interpolate((1 - att) * lr_seg, scale_factor=2, mode="bilinear",
                          align_corners=False)
    att = F.interpolate(att, scale_factor=2, mode="bilinear", align_corners=False)
    fused = att * hr_seg + up_lr
    return F.interpolate(fused, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_released_hrda_checkpoint_loads_strictly_per_member_and_runs_the_released_forward(
        tmp_path):
    from deeplabv2.weights import WeightsError, load_weights
    from test_v1c import SMALL, dlv2_head_names, mmcv_resnet_v1c_names, randomize, v1c
    # a released HRDA DeepLab v2 latest.pth: three HRDA segmentors (dacs.py: model, ema_model,
    # imnet_model), each backbone.* and decode_head.{head, scale_attention}.aspp_modules.K.*
    names = ["backbone." + n for n in mmcv_resnet_v1c_names(SMALL)]
    names += [f"decode_head.{part}.{n}" for part in ("head", "scale_attention")
              for n in dlv2_head_names(2)]
    nets = {m: randomize(v1c(), seed=s) for m, s in (("model", 1), ("ema_model", 2),
                                                     ("imnet_model", 3))}
    shapes = {"backbone." + k[len("backbone."):]: v.shape
              for k, v in nets["model"].state_dict().items() if k.startswith("backbone.")}
    g = torch.Generator().manual_seed(7)
    state = {}
    for member in nets:
        for n in names:
            if n.startswith("backbone."):
                t = nets[member].state_dict()[n].clone()
            else:  # DLV2Head: 3x3 convs, last-stage features (256 wide here) -> 5 classes
                shape = (5, 256, 3, 3) if n.endswith("weight") else (5,)
                t = (torch.rand(shape, generator=g) - 0.5) * 0.2
            assert n.startswith("decode_head.") or t.shape == shapes[n]
            state[f"{member}.{n}"] = t
    torch.save({"meta": {"iter": 40000}, "state_dict": state, "optimizer": {}},
               tmp_path / "latest.pth")
    x = torch.randn(1, 3, 64, 96)
    for member, prefix in ((None, "model."), ("teacher", "ema_model."),
                           ("imnet", "imnet_model.")):
        model = HRDA(v1c(), detail_crop=32)
        report = load_weights(model, tmp_path / "latest.pth", head="require", member=member)
        # every key of the file accounted for, under its own name
        assert set(report.loaded) == {k for k in state if k.startswith(prefix)}
        assert set(report.dropped) == {k for k in state if not k.startswith(prefix)}
        assert report.loaded[prefix + "decode_head.head.aspp_modules.1.conv.bias"] == \
            "head.convs.1.bias"
        assert report.loaded[prefix + "decode_head.scale_attention.aspp_modules.0.conv.weight"] \
            == "scale_attention.convs.0.weight"
        assert model.alignment.name == "pytorch"
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        with torch.no_grad():
            got = model.eval()(x)
            expected = released_hrda_inference(mine, x, SMALL)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert expected.abs().max() > 0.1  # not a comparison of zeros
    # an attention head of another shape, or a foreign key under it: named
    bad = dict(state)
    bad["model.decode_head.scale_attention.aspp_modules.1.conv.bias"] = torch.zeros(4)
    torch.save({"state_dict": bad}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="shape mismatch for scale_attention.convs.1.bias"):
        load_weights(HRDA(v1c(), detail_crop=32), tmp_path / "bad.pth")
    bad = dict(state)
    bad["model.decode_head.scale_attention.conv_seg.weight"] = torch.zeros(1)
    torch.save({"state_dict": bad}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="scale_attention.conv_seg.weight' has no counterpart"):
        load_weights(HRDA(v1c(), detail_crop=32), tmp_path / "bad.pth")

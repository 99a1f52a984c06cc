"""The DeepLab v2 network: shapes, parameter count, summed ASPP, frozen BN, parameter groups."""

import pytest
import torch
from torch import nn

import deeplabv2
from deeplabv2.model import get_alignment
from deeplabv2.model import ASPP, Bottleneck, FrozenBatchNorm2d, build_model
from deeplabv2.model.preprocessing import CAFFE_BGR, TORCHVISION_RGB

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 5}


def test_resnet101_parameter_count_and_layout():
    model = deeplabv2.deeplabv2_resnet101(num_classes=19)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == (43_901_068, 43_795_724)
    assert [len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    # Caffe MSRA layout: stride on the first 1x1 conv, dilation in every block of layer3/4.
    first = model.backbone.layer2[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
    for i, d in ((3, 2), (4, 4)):
        for block in getattr(model.backbone, f"layer{i}"):
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d)
            assert block.conv1.stride == (1, 1)
    assert model.backbone.maxpool.ceil_mode and model.backbone.maxpool.padding == 1
    assert model.head.atrous_rates == (6, 12, 18, 24)
    assert model.preprocessing == CAFFE_BGR


def test_stride8_shape_512x1024_on_the_real_network():
    with torch.device("meta"):
        model = deeplabv2.deeplabv2_resnet101(num_classes=19).eval()
    x = torch.empty(2, 3, 512, 1024, device="meta")
    assert tuple(model.logits(x).shape) == (2, 19, 65, 129)
    assert tuple(model(x).shape) == (2, 19, 512, 1024)


def test_forward_returns_a_tensor_upsampled_bilinearly():
    torch.manual_seed(0)
    model = build_model(TINY)
    x = torch.randn(1, 3, 67, 45)
    for mode in (model.train, model.eval):
        mode()
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 67, 45)
    model.eval()
    with torch.no_grad():
        scores = model.logits(x)
        assert scores.shape[-2:] == (9, 6)  # ceil(67 / 8), ceil(45 / 8)
        # The paper's convention: pixel p reads cell p / 8 (cell i on pixel 8 i), the cells past
        # the last centre clamped; computed here pixel by pixel from that definition.
        out = model(x)
        for p, q in [(0, 0), (8, 16), (12, 4), (27, 30), (64, 40), (66, 44)]:
            y, xx = min(p / 8, 8), min(q / 8, 5)
            y0, x0 = int(y), int(xx)
            y1, x1 = min(y0 + 1, 8), min(x0 + 1, 5)
            fy, fx = y - y0, xx - x0
            ref = ((1 - fy) * (1 - fx) * scores[0, :, y0, x0] + (1 - fy) * fx * scores[0, :, y0, x1]
                   + fy * (1 - fx) * scores[0, :, y1, x0] + fy * fx * scores[0, :, y1, x1])
            torch.testing.assert_close(out[0, :, p, q], ref, rtol=1e-5, atol=1e-6)
        model.alignment = get_alignment("pytorch")
        expected = nn.functional.interpolate(scores, size=(67, 45), mode="bilinear",
                                             align_corners=False)
        assert torch.equal(model(x), expected)


def test_aspp_sums_all_four_branches():
    head = ASPP(16, 3)
    with torch.no_grad():
        for i, conv in enumerate(head.convs):
            conv.weight.zero_()
            conv.bias.fill_(10.0 ** i)  # 1, 10, 100, 1000: the sum shows which branches count
    out = head(torch.randn(1, 16, 9, 9))
    assert torch.allclose(out, torch.full_like(out, 1111.0))
    assert [c.dilation for c in head.convs] == [(r, r) for r in (6, 12, 18, 24)]
    assert all(c.padding == c.dilation for c in head.convs)


def _conv_sum(convs, x):
    out = convs[0](x)
    for conv in convs[1:]:
        out = out + conv(x)
    return out


@pytest.mark.parametrize("size,head_mode", [((9, 11), "aspp"), ((41, 30), "aspp"),
                                            ((41, 41), "adaptsegnet")])
def test_aspp_training_path_is_the_conv_sum_with_its_gradients(size, head_mode):
    """On the CPU with autograd the head runs as one 1x1 convolution of the 36 taps, shifted
    (summed_taps): the same scores and the same gradients for input, weights and biases as
    the four dilated convolutions, on maps smaller and larger than the rates."""
    torch.manual_seed(0)
    head = ASPP(16, 5, head_mode=head_mode)
    with torch.no_grad():
        for conv in head.convs:
            conv.bias.normal_()
    x = torch.randn(2, 16, *size).contiguous(memory_format=torch.channels_last)
    results = []
    for fn in (head, lambda t: _conv_sum(head.summed_convs(), t)):
        head.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                         for p in head.parameters()])
    for a, b in zip(*results):  # float rounding of sums in another order, no more
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert results[0][2].abs().sum() > 0  # the weights did get gradients
    with torch.no_grad():  # inference: the plain convolutions
        torch.testing.assert_close(head(x), _conv_sum(head.summed_convs(), x))


def test_aspp_initialisation():
    torch.manual_seed(0)
    head = ASPP(2048, 19)
    w = torch.cat([c.weight.flatten() for c in head.convs])
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert all(torch.count_nonzero(c.bias) == 0 for c in head.convs)


def _train_steps(model, steps=3):
    opt = torch.optim.SGD(model.param_groups(lr=0.01), lr=0.01, momentum=0.9)
    model.train()
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 33, 33) * 50
        y = torch.randint(0, model.num_classes, (2, 33, 33))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_bn_really_frozen_in_train_mode():
    model = build_model(TINY)
    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():  # non-trivial statistics so that a change would show
        for m in bns:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    after = model.state_dict()
    bn_keys = [k for k in before if ".bn" in k or "downsample.1" in k]
    assert bn_keys
    for k in bn_keys:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for m in bns for p in m.parameters())
    # ... while the convolutions did learn (so the test can fail)
    assert not torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])
    assert not torch.equal(before["head.convs.3.weight"], after["head.convs.3.weight"])


def test_frozen_bn_applied_to_the_weights_under_autograd_is_the_same_function_and_gradients():
    """With autograd, conv -> FrozenBN runs as one convolution of the scaled weight
    (resnet.conv_bn): the network's scores and every parameter's gradient equal those of the
    modules run one after the other (eval, no autograd path patched out)."""
    from deeplabv2.model import resnet
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 41, 45)
    results = []
    for fused in (True, False):
        model.zero_grad()
        if not fused:  # the plain composition
            original = resnet.conv_bn
            resnet.conv_bn = lambda conv, bn, t: bn(conv(t))
        try:
            out = model(x, upsample=False)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        finally:
            if not fused:
                resnet.conv_bn = original
        results.append([out] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert all(p.grad is None for m in model.modules() if isinstance(m, FrozenBatchNorm2d)
               for p in m.parameters())


def test_unfrozen_bn_option_trains_bn():
    model = build_model({**TINY, "frozen_bn": False})
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = model.backbone.bn1.running_mean.clone()
    _train_steps(model, steps=1)
    assert not torch.equal(before, model.backbone.bn1.running_mean)
    names = [g["name"] for g in model.param_groups(0.1)]
    assert "backbone_norm" in names


@pytest.mark.parametrize("config", [
    {"backbone": "resnet", "blocks": [3, 4, 23, 3], "num_classes": 19},
    {"backbone": "resnet", "blocks": [3, 4, 23, 3], "num_classes": 19, "frozen_bn": False},
    {"backbone": "vgg16", "num_classes": 21},
], ids=["resnet101", "resnet101-bn", "vgg16"])
def test_param_groups_each_trainable_parameter_exactly_once(config):
    model = build_model(config)
    groups = model.param_groups(lr=2.5e-4, weight_decay=5e-4)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is listed in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not frozen & set(seen)
    by_name = {g["name"]: g for g in groups}
    classifier = list(model.head.classifier_parameters())  # VGG: fc8 only; ResNet: all ASPP
    head_w = {id(p) for p in classifier if p.ndim > 1}
    head_b = {id(p) for p in classifier if p.ndim == 1}
    assert {id(p) for p in by_name["head"]["params"]} == head_w
    assert {id(p) for p in by_name["head_bias"]["params"]} == head_b
    assert by_name["backbone"]["lr_mult"] == 1 and by_name["backbone"]["weight_decay"] == 5e-4
    assert by_name["head"]["lr_mult"] == 10 and by_name["head"]["weight_decay"] == 5e-4
    assert by_name["head_bias"]["lr_mult"] == 20 and by_name["head_bias"]["weight_decay"] == 0
    for g in groups:
        assert g["lr"] == pytest.approx(2.5e-4 * g["lr_mult"])
    torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9)  # accepted by the optimizer as is


def test_vgg16_aspp_shapes_and_sum():
    model = deeplabv2.deeplabv2_vgg16(num_classes=21).eval()
    assert len(model.head.branches) == 4
    assert [b.fc6.dilation for b in model.head.branches] == [(r, r) for r in (6, 12, 18, 24)]
    assert model.head.branches[0].fc6.out_channels == 1024
    with torch.device("meta"):
        meta = deeplabv2.deeplabv2_vgg16(num_classes=21).eval()
    assert tuple(meta.logits(torch.empty(1, 3, 321, 321, device="meta")).shape) == (1, 21, 41, 41)
    x = torch.randn(1, 3, 40, 40)
    feats = model.backbone(x)
    with torch.no_grad():
        expected = sum(b(feats) for b in model.head.branches)
        assert torch.allclose(model.logits(x), expected)


def test_torchvision_layout_moves_the_stride():
    block = Bottleneck(64, 32, stride=2, downsample=nn.Conv2d(64, 128, 1, 2))
    block.set_stride_in_1x1(False)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    model = build_model(TINY)
    model.backbone.set_layout("torchvision")
    assert model.backbone.layer2[0].conv2.stride == (2, 2)
    assert not model.backbone.maxpool.ceil_mode
    with pytest.raises(ValueError, match="unknown ResNet layout 'tf'"):
        model.backbone.set_layout("tf")


def test_preprocessing_caffe_bgr_and_torchvision_rgb():
    img = torch.tensor([[[10, 20, 30]]], dtype=torch.uint8)  # one RGB pixel
    x = CAFFE_BGR(img)
    assert x.shape == (1, 3, 1, 1)
    assert torch.allclose(x.flatten(), torch.tensor([30 - 104.008, 20 - 116.669, 10 - 122.675]))
    y = TORCHVISION_RGB(img.numpy())
    expected = (torch.tensor([10, 20, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / \
        torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(y.flatten(), expected)
    assert CAFFE_BGR.mean_pixel_rgb_uint8() == (123, 117, 104)
    with pytest.raises(TypeError, match="uint8"):
        CAFFE_BGR(torch.zeros(4, 4, 3))
    with pytest.raises(ValueError, match="RGB"):
        CAFFE_BGR(torch.zeros(4, 4, 4, dtype=torch.uint8))


def test_build_model_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown model config keys \\['depth'\\]"):
        build_model({**TINY, "depth": 101})
    with pytest.raises(ValueError, match="unknown backbone 'mobilenet'"):
        build_model({**TINY, "backbone": "mobilenet"})

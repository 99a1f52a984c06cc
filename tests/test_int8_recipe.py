"""The INT8 recipe's exact FP32 step (:func:`deeplabv2.deploy.quantize.equalize_aspp_input`):
rescaling the ASPP input's channels must leave the network's function unchanged and narrow the
spread of their ranges. Pure PyTorch; what NNCF does with it is in ``test_deploy.py``."""

import torch

from deeplabv2.deploy.quantize import equalize_aspp_input
from deeplabv2.deploy.fast import fold_batchnorm
from deeplabv2.hub import deeplabv2_resnet101, deeplabv2_vgg16
from test_export import nontrivial_model


def _channel_spread(net, x):
    r = net.backbone(x).amax(dim=(0, 2, 3))
    return (r.max() / r.median()).item()


@torch.no_grad()
def _with_loud_channels(net, channels, factor):
    """Make ``channels`` of layer4's stream ``factor`` times larger without changing the
    function (the same kind of rescaling, the other way): a trained network's outliers."""
    blocks = list(net.backbone.layer4)
    for p in [b.conv3 for b in blocks] + [blocks[0].downsample[0]]:
        p.weight[channels] *= factor
        p.bias[channels] *= factor
    for c in [b.conv1 for b in blocks[1:]] + list(net.head.convs):
        c.weight[:, channels] /= factor


@torch.no_grad()
def test_equalizing_the_aspp_input_of_resnet101_keeps_its_scores():
    net = fold_batchnorm(deeplabv2_resnet101(19)).eval()
    torch.manual_seed(0)
    for conv in net.head.convs:
        conv.weight.normal_(0, 0.01)
    _with_loud_channels(net, slice(0, 40), 30.0)
    x = torch.randn(2, 3, 97, 97)
    before, spread = net.logits(x), _channel_spread(net, x)
    scales = equalize_aspp_input(net, [x[:1].numpy(), x[1:].numpy()])
    assert scales.shape == (2048,) and (scales > 0).all()
    after = net.logits(x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert _channel_spread(net, x) < spread / 4  # the loud channels were brought in


@torch.no_grad()
def test_equalizing_needs_a_folded_resnet():
    tiny = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 7}
    m = nontrivial_model(tiny)
    try:
        equalize_aspp_input(m, [torch.randn(1, 3, 33, 33).numpy()])
    except ValueError as e:
        assert "fold_batchnorm" in str(e)
    else:
        raise AssertionError("an unfolded network was equalized")
    vgg = fold_batchnorm(deeplabv2_vgg16(21)).eval()
    state = {k: v.clone() for k, v in vgg.state_dict().items()}
    assert equalize_aspp_input(vgg, [torch.randn(1, 3, 33, 33).numpy()]) is None
    assert all(torch.equal(v, vgg.state_dict()[k]) for k, v in state.items())


@torch.no_grad()
def test_median_equalization_ignores_an_input_on_which_the_network_explodes():
    """quantize --ranges median: the per-channel ranges are the median over the images of each
    image's maxima, so one exploding input (here 1000x the others) leaves them as they were."""
    import copy
    tiny = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 7}
    net = fold_batchnorm(nontrivial_model(tiny)).eval()
    x = torch.randn(1, 3, 41, 57).numpy()
    images = [x, x, x, x, 1000 * x]
    alone = equalize_aspp_input(copy.deepcopy(net), [x])
    median = equalize_aspp_input(copy.deepcopy(net), images, statistic="median")
    maximum = equalize_aspp_input(copy.deepcopy(net), images, statistic="max")
    assert torch.allclose(median, alone, rtol=1e-5)
    assert not torch.allclose(maximum, alone, rtol=0.05)


@torch.no_grad()
def test_the_int8_graphs_taps_head_is_the_aspp_at_every_size():
    """The ASPP as one 1x1 convolution of its 36 taps with constant-offset shifted sums
    (what ``quantize`` converts): the summed branches' scores at every map size, maps smaller
    than the largest rate included (their far taps read only padding), and in AdaptSegNet mode
    (two branches); VGG-16's DeepLab-ASPP-L head is left as it is."""
    from deeplabv2.deploy.quantize import ExportTapsASPP, with_taps_head
    from deeplabv2.model.aspp import ASPP
    torch.manual_seed(0)
    for mode, taps in (("aspp", 36), ("adaptsegnet", 18)):
        head = ASPP(32, 5, head_mode=mode).eval()
        for conv in head.convs:
            conv.weight.normal_(0, 0.1)
            conv.bias.normal_(0, 1)
        export = ExportTapsASPP(head.summed_convs()).eval()
        assert len(export.shifts) == taps and export.pad == (24 if mode == "aspp" else 12)
        for h, w in ((1, 1), (5, 7), (13, 30), (65, 49)):
            x = torch.randn(2, 32, h, w)
            ref = head(x)
            assert torch.allclose(export(x), ref, atol=1e-5 * ref.abs().max().item()), (mode, h, w)
    net = fold_batchnorm(deeplabv2_resnet101(19).eval())
    assert isinstance(with_taps_head(net).head, ExportTapsASPP)
    assert not isinstance(net.head, ExportTapsASPP)  # a copy: the network is left alone
    vgg = fold_batchnorm(deeplabv2_vgg16(21).eval())
    assert with_taps_head(vgg) is vgg

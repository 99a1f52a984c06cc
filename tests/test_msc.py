"""MSC training (paper Sec. 3.3): shared network at scales 1, 0.75, 0.5, max fusion, 4 losses."""

import pytest
import torch
from torch.nn import functional as F

from deeplabv2 import build_model
from deeplabv2.model.msc import MSC, msc_loss
from deeplabv2.train import segmentation_loss

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 5}


def stride8_loss(scores, labels):
    return segmentation_loss(scores, labels, "stride8")


@pytest.fixture
def msc():
    torch.manual_seed(0)
    return MSC(build_model(TINY))


def batch(h=49, w=65, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (2, h, w), generator=g)
    labels[:, :5] = 255
    return torch.randn(2, 3, h, w, generator=g) * 50, labels


def test_train_mode_returns_each_scale_then_the_max_fusion(msc):
    x, _ = batch()
    msc.train()
    outputs = msc(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 5, 7, 9), (2, 5, 5, 7), (2, 5, 4, 5),
                                                 (2, 5, 7, 9)]
    # each branch is the shared network on the resized input
    small = F.interpolate(x, size=(37, 49), mode="bilinear", align_corners=False)
    torch.testing.assert_close(outputs[1], msc.model(small, upsample=False))
    torch.testing.assert_close(outputs[0], msc.model(x, upsample=False))
    fused = outputs[-1]
    resized = [F.interpolate(o, size=(7, 9), mode="bilinear", align_corners=False)
               for o in outputs[1:3]]
    for branch in [outputs[0], *resized]:
        assert (fused >= branch).all()
    torch.testing.assert_close(fused, torch.maximum(outputs[0], torch.maximum(*resized)))


def test_loss_is_the_sum_of_four_separately_computed_terms(msc):
    x, labels = batch()
    msc.train()
    outputs = msc(x)
    terms = [stride8_loss(o, labels) for o in outputs]
    assert len(terms) == 4 and len({round(t.item(), 6) for t in terms}) == 4
    torch.testing.assert_close(msc_loss(outputs, labels, stride8_loss), sum(terms))
    # the labels a term sees are the nearest-neighbour downsampled ones, at that output's size
    seen = []
    msc_loss(outputs, labels, lambda s, y: seen.append(y) or s.sum() * 0)
    assert [tuple(y.shape) for y in seen] == [(2, 7, 9), (2, 5, 7), (2, 4, 5), (2, 7, 9)]
    assert torch.equal(seen[2], F.interpolate(labels[:, None].float(), size=(4, 5),
                                              mode="nearest")[:, 0].long())


@pytest.mark.parametrize("scale_index", [0, 1, 2])
def test_gradients_reach_the_shared_weights_from_every_scale(msc, scale_index):
    x, labels = batch()
    msc.train()
    outputs = msc(x)
    stride8_loss(outputs[scale_index], labels).backward()
    stem, head = msc.model.backbone.conv1.weight, msc.model.head.convs[0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_eval_mode_is_used_like_the_plain_model(msc):
    x, _ = batch(40, 56)
    msc.eval()
    with torch.no_grad():
        out = msc(x)
        fused = msc(x, upsample=False)
    assert out.shape == (2, 5, 40, 56) and fused.shape == (2, 5, 6, 8)
    torch.testing.assert_close(out, F.interpolate(fused, size=(40, 56), mode="bilinear",
                                                  align_corners=False))
    torch.testing.assert_close(fused, msc.logits(x))
    single = MSC(msc.model, scales=[1.0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(single(x), msc.model(x))


def test_passes_the_model_interface_through(msc):
    model = msc.model
    assert msc.num_classes == 5 and msc.config == model.config
    assert msc.preprocessing == model.preprocessing
    rgb = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8)
    assert torch.equal(msc.preprocess(rgb), model.preprocess(rgb))
    groups = msc.param_groups(0.01)
    assert [g["name"] for g in groups] == [g["name"] for g in model.param_groups(0.01)]
    assert sum(len(g["params"]) for g in groups) == sum(
        p.requires_grad for p in msc.parameters())
    with pytest.raises(ValueError, match="positive, got 0.0"):
        MSC(model, scales=[1.0, 0])

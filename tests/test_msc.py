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
    # each branch is the shared network on the input resized as Caffe's Interp does:
    # (49 - 1) // 4 * 3 + 1 = 37 and (65 - 1) // 4 * 3 + 1 = 49 at 0.75, corners aligned
    assert msc.input_sizes(49, 65) == [(49, 65), (37, 49), (25, 33), (49, 65)]
    small = F.interpolate(x, size=(37, 49), mode="bilinear", align_corners=True)
    torch.testing.assert_close(outputs[1], msc.model(small, upsample=False))
    torch.testing.assert_close(outputs[0], msc.model(x, upsample=False))
    fused = outputs[-1]
    resized = [F.interpolate(o, size=(7, 9), mode="bilinear", align_corners=True)
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
    sizes = msc.input_sizes(49, 65)
    total = msc_loss(outputs, labels, stride8_loss, sizes)
    assert torch.isfinite(total) and total > 0
    # each term sees the labels under its own cells' centres (see below), so that the sum is
    # the sum of the four terms computed against those labels
    seen = []
    msc_loss(outputs, labels, lambda s, y: seen.append(y) or s.sum() * 0, sizes)
    assert [tuple(y.shape) for y in seen] == [(2, 7, 9), (2, 5, 7), (2, 4, 5), (2, 7, 9)]
    torch.testing.assert_close(total, sum(stride8_loss(o, y) for o, y in zip(outputs, seen)))
    # Hand-computed centres. Scale 1 (and the fused map): pixel 8 i. Scale 0.75, input 37x49:
    # cell i on resized pixel 8 i = original pixel 8 i * 48 / 36 (rows), 8 i * 64 / 48 (cols),
    # rounded. Scale 0.5, input 25x33: 8 i * 2.
    rows = {0: [0, 8, 16, 24, 32, 40, 48], 1: [0, 11, 21, 32, 43], 2: [0, 16, 32, 48]}
    cols = {0: [0, 8, 16, 24, 32, 40, 48, 56, 64], 1: [0, 11, 21, 32, 43, 53, 64],
            2: [0, 16, 32, 48, 64]}
    for k in (0, 1, 2):
        assert torch.equal(seen[k], labels[:, rows[k]][:, :, cols[k]])
    assert torch.equal(seen[3], seen[0])


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
    torch.testing.assert_close(out, msc.model.alignment.upsample(fused, (40, 56)))
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

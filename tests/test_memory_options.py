"""The memory options of training (issue 26, "Memory"): activation checkpointing of the ResNet
backbone (``train.checkpoint_backbone``) gives the plain forward's outputs, gradients and BN
running statistics; bf16 autocast (``train.amp=bf16``) runs every self-training method.
Expected values come from the same tiny network run without the option, and from the BN
update rule written out here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from deeplabv2.config import ConfigError, load_config
from deeplabv2.model.deeplab import build_model
from deeplabv2.model.hrda import HRDA
from deeplabv2.model.resnet import Bottleneck, ResNet, set_backbone_checkpointing
from deeplabv2.train import train

from test_daformer import DAFORMER
from test_train import TINY
from test_uda_train import TARGET, uda_config


def tiny(bn: str, stem: str = "caffe", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(dict(num_classes=3, blocks=[2, 1, 2, 1], width=8, bn=bn, stem=stem,
                             atrous_rates=[6, 12]))
    with torch.no_grad():  # statistics and scales that are not the defaults, so that a
        g = torch.Generator().manual_seed(seed + 1)  # wrong use of them shows
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


def one_step(model, x, y):
    """Loss and backward of one training forward; returns (scores, {name: grad})."""
    model.train()
    scores = model.logits(x)
    loss = F.cross_entropy(F.interpolate(scores, size=y.shape[-2:], mode="bilinear"), y)
    loss.backward()
    return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def count_calls(model):
    calls = []
    for m in model.modules():
        if isinstance(m, Bottleneck):
            m.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
    return calls


@pytest.mark.parametrize("bn,stem", [("frozen", "caffe"), ("batch", "caffe"), ("train", "caffe"),
                                     ("train", "v1c"), ("batch", "v1c")])
def test_checkpointing_keeps_outputs_gradients_and_running_statistics(bn, stem):
    plain = tiny(bn, stem)
    ckpt = copy.deepcopy(plain)
    assert set_backbone_checkpointing(ckpt, True) == 1
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 41, 49, generator=g)
    y = torch.randint(0, 3, (2, 41, 49), generator=g)
    calls = count_calls(ckpt)
    s1, g1 = one_step(plain, x, y)
    s2, g2 = one_step(ckpt, x, y)
    blocks = sum(plain.backbone.blocks)
    assert len(calls) == 2 * blocks, "every bottleneck ran again in the backward pass"
    assert torch.allclose(s1, s2, atol=1e-6, rtol=0)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-5), n
    a, b = plain.state_dict(), ckpt.state_dict()
    for k in a:
        if "running" in k or "num_batches" in k:
            assert torch.allclose(a[k].double(), b[k].double(), atol=1e-6, rtol=0), k
    if bn != "frozen":
        # one update, not two: running = 0.9 * before + 0.1 * batch mean (written out for the
        # first BN, whose input is the first convolution of the image)
        stem_conv, stem_bn = ((ckpt.backbone.conv1, "backbone.bn1") if stem == "caffe"
                              else (ckpt.backbone.stem[0], "backbone.stem.1"))
        mean = F.conv2d(x, stem_conv.weight, None, stem_conv.stride,
                        stem_conv.padding).mean(dim=(0, 2, 3))
        expected = 0.9 * before[f"{stem_bn}.running_mean"] + 0.1 * mean
        assert torch.allclose(b[f"{stem_bn}.running_mean"], expected, atol=1e-6)
        assert int(b[f"{stem_bn}.num_batches_tracked"]) == 1
    else:
        for k in a:
            if "running" in k:
                assert torch.equal(b[k], before[k]), k


def test_without_gradient_the_forward_is_the_plain_one():
    model = tiny("train")
    set_backbone_checkpointing(model, True)
    calls = count_calls(model)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():  # an EMA teacher's or a frozen copy's forward
        out = model.train().logits(x)
    assert len(calls) == sum(model.backbone.blocks) and not out.requires_grad
    set_backbone_checkpointing(model, False)
    assert model.backbone.checkpoint_blocks is False


def test_hrda_wrapper_checkpoints_its_network_with_the_same_gradients():
    plain = HRDA(tiny("train"), detail_crop=[32, 32], context_scale=0.5)
    ckpt = copy.deepcopy(plain)
    assert set_backbone_checkpointing(ckpt, True) == 1
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    grads = []
    for net in (plain, ckpt):
        out = net.train().forward_train(x, box=(16, 48, 8, 40))
        (out["fused"].square().mean() + out["context"].abs().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    for k, v in plain.state_dict().items():
        assert torch.allclose(v.double(), ckpt.state_dict()[k].double(), atol=1e-6), k


def test_checkpoint_backbone_is_checked():
    with pytest.raises(ConfigError, match="train.checkpoint_backbone must be true or false"):
        load_config(None, [*TINY, "train.checkpoint_backbone=2"])
    with pytest.raises(ConfigError, match="ResNet backbone only.*vgg16"):
        load_config(None, [*TINY, "model.backbone=vgg16", "train.checkpoint_backbone=true"])


def _weights(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def test_daformer_run_is_the_same_with_checkpointing(tmp_path):
    """Two iterations of DAFormer (trainable BN, EMA teacher on batch statistics, the frozen
    ImageNet copy's feature distance): the same weights and BN statistics with and without."""
    more = ["train.iterations=2", "train.amp=none", *DAFORMER]
    a = train(uda_config(tmp_path / "a", "daformer", *more))
    b = train(uda_config(tmp_path / "b", "daformer", *more, "train.checkpoint_backbone=true"))
    assert isinstance(b.model.backbone, ResNet) and b.model.backbone.checkpoint_blocks
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.allclose(wa[k].double(), wb[k].double(), atol=1e-5, rtol=1e-4), k
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history],
                                                           rel=1e-5)


HRDA_TINY = ["adapt.hrda_detail_crop=[32, 32]"]
MIC = "adapt.mic={block_size: 16, mask_ratio: 0.5}"


@pytest.mark.parametrize("method,more", [
    ("dacs", ["model.bn=batch"]),
    ("daformer", DAFORMER),
    ("hrda", [*HRDA_TINY, *DAFORMER]),
    ("daformer", [*DAFORMER, MIC]),
    ("hrda", [*HRDA_TINY, *DAFORMER, MIC, "train.checkpoint_backbone=true"]),
])
def test_self_training_methods_run_under_bf16_autocast(tmp_path, method, more):
    result = train(uda_config(tmp_path, method, "train.iterations=2", "train.amp=bf16", *more))
    assert len(result.history) == 2
    assert all(math.isfinite(h["loss"]) for h in result.history)
    for k, v in result.model.state_dict().items():
        assert v.dtype != torch.bfloat16, f"{k} is stored in bf16"
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


def test_memory_estimate_counts_what_checkpointing_keeps(tmp_path):
    """The check before the first step sees checkpointing's saving: fewer activation bytes,
    but not none (each bottleneck's input is kept)."""
    from deeplabv2.memory import estimate_step
    from deeplabv2.train import _set_up
    est = []
    for on in ("false", "true"):
        cfg = uda_config(tmp_path / on, "daformer", "train.iterations=2", "train.amp=none",
                         "model.blocks=[2, 2, 3, 2]", *DAFORMER,
                         f"train.checkpoint_backbone={on}")
        run = _set_up(cfg, None, False)
        est.append(estimate_step(cfg, run.model, run.optimizer, run.method, run.make_step,
                                 run.net, run.device).activations)
    plain, ckpt = est
    assert 0 < ckpt < 0.8 * plain, est


@pytest.mark.slow
def test_torchrun_two_processes_hrda_with_checkpointing_is_the_plain_run(tmp_path):
    """HRDA (two network passes inside each DDP forward, trainable BN, EMA teacher) with MIC as
    2 gloo processes, once with the backbone checkpointed and once without: the same
    weights, BN statistics and teacher (checkpointing under DDP recomputes inside the
    backward that DDP's gradient hooks watch; a re-entrant checkpoint would break there)."""
    import json

    from deeplabv2.config import save_config
    from test_daformer import DAFORMER as DAFORMER_TINY
    from torchrun import run_torchrun
    runs = {}
    for on in ("false", "true"):
        cfg_path = tmp_path / f"{on}.yaml"
        save_config(uda_config(tmp_path / on, "hrda", *HRDA_TINY, *DAFORMER_TINY, MIC,
                               "train.iterations=2", "train.checkpoint_every=2",
                               "train.amp=none", "data.scale_range=[1, 1]",
                               f"train.checkpoint_backbone={on}"), cfg_path)
        code, _, stderr = run_torchrun(["train", "-c", cfg_path, "train.progress=false"],
                                       tmp_path)
        assert code == 0, stderr[-3000:]
        adapt = json.loads((tmp_path / on / "replicas_adapt.json").read_text())
        assert adapt["world_size"] == 2 and adapt["sha256"][0] == adapt["sha256"][1]
        runs[on] = torch.load(tmp_path / on / "last.pth", weights_only=True)
    plain, ckpt = runs["false"], runs["true"]
    assert load_config(str(tmp_path / "true" / "config.yaml")).train.checkpoint_backbone
    for part in ("model", "adapt_state"):
        flat_a, flat_b = _flat(plain[part]), _flat(ckpt[part])
        assert flat_a.keys() == flat_b.keys() and flat_a, part
        for k, v in flat_a.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.allclose(v.double(), flat_b[k].double(), atol=1e-5,
                                      rtol=1e-4), f"{part}.{k}"


def _flat(tree, prefix=""):
    """The tensors of a nested checkpoint entry, by dotted key."""
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: tree} if torch.is_tensor(tree) else {}


def test_hrda_memory_estimate_follows_its_two_passes(tmp_path):
    """HRDA's step at a 384x384 crop with a 192x192 detail crop (the released 512 of 1024):
    the estimate's saved bytes (its activations less the backward margin) are those counted
    at that size (the context at 0.5 and the detail pass), within 10%. The probes (about 97
    pixels a side) shrink the detail crop with the crop. Before, both probes were raised to
    the detail crop, the same size: the fit then read the whole step as growing with the
    crop's pixels, four times over from 192 to 384 (the released config: 29 GiB estimated for
    a step whose growth measures 7.7 GiB, refused on the 12 GB card it fits)."""
    from deeplabv2.memory import BACKWARD_MARGIN, estimate_step, measure_saved
    from deeplabv2.train import _set_up
    from test_daformer import DAFORMER as DAFORMER_TINY
    size = ["data.crop_size=[384, 384]", "data.scale_range=[1, 1]", "data.batch_size=1",
            "data.options={num_samples: 2, size: [384, 384]}",
            "adapt.target_options={num_samples: 2, size: [384, 384], style: target}",
            "adapt.hrda_detail_crop=[192, 192]", "adapt.pseudo_margins=[2, 6, 1, 0]"]
    cfg = uda_config(tmp_path, "hrda", *DAFORMER_TINY, *size, "train.iterations=2",
                     "train.amp=none", "train.check_memory=false")
    run = _set_up(cfg, None, False)
    assert run.model.detail_crop == (192, 192)
    estimate = estimate_step(cfg, run.model, run.optimizer, run.method, run.make_step,
                             run.net, run.device)
    assert run.model.detail_crop == (192, 192)  # the probes' crop given back
    counted = max(measure_saved(run.method, run.make_step, run.net, run.device, cfg, 0,
                                (384, 384), (384, 384)))
    fitted = estimate.activations / BACKWARD_MARGIN
    assert 0.9 * counted <= fitted <= 1.1 * counted, (fitted, counted)

"""The self-training core and DAFormer's training strategy (issue 26, items 1 and 2 without
rare-class sampling), each part against values computed here by hand or from the released
definition (lhoyer/DAFormer) written out with plain tensor ops."""

import json
import math

import pytest
import torch
from torch import nn

from deeplabv2.adapt.methods import DACS, DAFormer, build_method
from deeplabv2.adapt.mix import (EMATeacher, apply_colour_jitter, classmix_masks,
                                 jitter_parameters)
from deeplabv2.adapt.self_training import (FrozenBackbone, apply_margins,
                                           downscale_labels_by_majority, feature_distance,
                                           pseudo_labels, thing_mask)
from deeplabv2.config import ConfigError, load_config, save_config
from deeplabv2.train import _build_model, build_optimizer, train, warmup_poly_lr

from test_train import TINY
from test_uda_train import TARGET, crash_and_resume, uda_config
from torchrun import run_torchrun

# what the tiny runs need of DAFormer: margins that fit a 48x64 crop, thing classes of the
# 7 synthetic ones, AdamW with a warm-up, trainable BN (the teacher on batch statistics)
DAFORMER = ["adapt.pseudo_margins=[2, 6, 1, 0]", "adapt.fdist_classes=[1, 2, 3]",
            "adapt.ema_alpha=0.999", "train.optimizer=adamw", "train.param_groups=mmseg",
            "train.lr=6e-4", "train.weight_decay=0.01", "train.warmup_iters=2",
            "train.poly_power=1.0", "model.bn=train"]


# -- EMA teacher ------------------------------------------------------------------------------
def test_ema_rate_warms_up_to_alpha_0999():
    """alpha_teacher = min(1 - 1 / (iter + 1), alpha) (DAFormer dacs.py _update_ema)."""
    student = nn.Linear(3, 2)
    teacher = EMATeacher(student, alpha=0.999)
    for it, expected in ((1, 0.5), (9, 0.9), (999, 0.999), (998, 1 - 1 / 999), (5000, 0.999)):
        t_old = [p.clone() for p in teacher.model.parameters()]
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        a = teacher.update(student, it)
        assert a == pytest.approx(expected, abs=0)
        for t0, t1, s in zip(t_old, teacher.model.parameters(), student.parameters()):
            assert torch.allclose(t1, expected * t0 + (1 - expected) * s, atol=1e-7)


def test_daformer_updates_with_the_released_iteration_count():
    """Their update runs before iteration local_iter (>= 1) with the student after local_iter
    steps; ours after step it = local_iter - 1: after step 0 the rate is 1 - 1/2 = 0.5 (DACS's
    trainUDA.py: 0 after step 0)."""
    cfg = load_config(None, [*TINY, *TARGET, "adapt.method=daformer", *DAFORMER])
    model = _build_model(cfg, 7)
    method = build_method(cfg.adapt, model)
    assert isinstance(method, DAFormer) and method.teacher.alpha == 0.999
    assert method.teacher.batch_stats, "bn train: the teacher predicts on batch statistics"
    before = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    method.after_step(model, 0)
    for name, p in model.named_parameters():
        t = dict(method.teacher.model.named_parameters())[name]
        assert torch.allclose(t, 0.5 * before[name] + 0.5 * p), name
    dacs = build_method(load_config(None, [*TINY, *TARGET, "adapt.method=dacs"]).adapt, model)
    assert isinstance(dacs, DACS) and dacs.ema_offset == 0 and dacs.pseudo_margins is None


def test_dacs_pass_through_the_core_is_the_pre_core_dacs_pass():
    """DACS's mixed pass on the shared core draws and computes what DACS computed before it
    (the pass written out as it stood: softmax, confidence share, ClassMix per image, jitter 0.25
    on BGR and blur, mixed labels and weights), bit for bit."""
    from torch.nn import functional as F
    from deeplabv2.adapt.methods import Step
    from deeplabv2.adapt.mix import (confidence_weight, mix, strong_augment,
                                     weighted_cross_entropy)
    from deeplabv2.model.preprocessing import from_rgb, to_rgb
    cfg = load_config(None, [*TINY, *TARGET, "adapt.method=dacs"])
    torch.manual_seed(0)
    model = _build_model(cfg, 7).train()
    method = build_method(cfg.adapt, model)
    images, target = torch.randn(2, 3, 48, 64), torch.randn(2, 3, 48, 64)
    # other classes in each image: ClassMix per image differs from ClassMix of the batch
    labels = torch.stack([torch.randint(0, 3, (48, 64)), torch.randint(3, 7, (48, 64))])
    step = Step(net=model, model=model, images=images, labels=labels, target=target,
                iteration=0, seg_loss=None)
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        got = method.loss(step, 1)
        torch.manual_seed(seed)
        pre = model.preprocessing
        with torch.no_grad():
            probs = F.softmax(method.teacher(target).float(), dim=1)
            confidence, pseudo = probs.max(1)
            weight = confidence_weight(probs, 0.968)
            masks = classmix_masks(labels)
            mixed = strong_augment(mix(masks, to_rgb(images, pre), to_rgb(target, pre)))
            x = from_rgb(mixed, pre).to(images.dtype)
            mixed_labels = mix(masks, labels, pseudo)
            weights = mix(masks, torch.ones_like(confidence), torch.full_like(confidence, weight))
        logits = model.alignment.upsample(model(x, upsample=False), (48, 64))
        expected = weighted_cross_entropy(logits, mixed_labels, weights)
        assert torch.equal(got, expected)


# -- pseudo-labels and their margins -----------------------------------------------------------
def test_pseudo_label_weight_is_the_confident_share_with_margin_rows_zeroed():
    n, c, h, w = 2, 3, 200, 10
    logits = torch.zeros(n, c, h, w)
    # class 1 confident (softmax max ~0.9999) on the first 60 rows of image 0, elsewhere flat
    logits[0, 1, :60] = 10.0
    labels, weights, share = pseudo_labels(logits, 0.968, margins=(15, 120, 0, 0))
    assert share == pytest.approx(60 * w / (n * h * w))  # 600 of 4000 pixels
    assert torch.equal(labels[0, :60], torch.ones(60, w, dtype=torch.long))
    expected = torch.full((n, h, w), 600 / 4000)
    expected[:, :15] = 0
    expected[:, h - 120:] = 0
    assert torch.equal(weights, expected)
    # left / right columns (HRDA's margins are [30, 240, 30, 30])
    out = apply_margins(torch.ones(1, 6, 5), (1, 2, 1, 2))
    assert out.tolist() == [[[0] * 5, [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0],
                             [0] * 5, [0] * 5]]
    with pytest.raises(ValueError, match="margins must be >= 0"):
        apply_margins(torch.ones(1, 4, 4), (1, -1, 0, 0))


# -- ClassMix of the batch's classes ----------------------------------------------------------
def test_classmix_of_batch_classes_draws_from_the_union():
    """DAFormer get_class_masks: torch.unique(labels) of the batch for every image."""
    labels = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [3, 255]]])
    g = torch.Generator().manual_seed(5)
    masks = classmix_masks(labels, generator=g, classes_of_batch=True)
    g = torch.Generator().manual_seed(5)
    union = torch.tensor([0, 1, 2, 3, 255])
    for i in range(2):
        chosen = union[torch.randperm(5, generator=g)[:3]]  # ceil(5 / 2) of the batch's 5
        expected = torch.zeros(2, 2)
        for v in chosen.tolist():
            expected[labels[i] == v] = 1
        assert torch.equal(masks[i], expected)


def test_colour_jitter_in_rgb_is_the_bgr_jitter_of_flipped_channels():
    """DAFormer hands kornia RGB (mmseg to_rgb); DACS BGR: the same steps on the other order."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 5, 7) * 255
    params = jitter_parameters(2, 0.2, torch.Generator().manual_seed(1))
    rgb = apply_colour_jitter(images, params, kornia_order="rgb")
    bgr_of_flipped = apply_colour_jitter(images.flip(1), params, kornia_order="bgr").flip(1)
    assert torch.allclose(rgb, bgr_of_flipped, atol=1e-4)
    assert not torch.allclose(rgb, apply_colour_jitter(images, params), atol=1e-2)


# -- the feature distance ----------------------------------------------------------------------
def released_downscale(gt, factor, min_ratio, n_classes):
    """DAFormer mmseg/utils/utils.py downscale_label_ratio, written out per block: the most
    frequent value (255 as class n), 255 below min_ratio."""
    n, h, w = gt.shape
    out = torch.empty(n, h // factor, w // factor, dtype=torch.long)
    for b in range(n):
        for i in range(h // factor):
            for j in range(w // factor):
                block = gt[b, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor]
                block = torch.where(block == 255, torch.tensor(n_classes), block).flatten()
                counts = torch.bincount(block, minlength=n_classes + 1)
                best = int(counts.argmax())  # first maximum: the lower class
                value = 255 if best == n_classes else best
                out[b, i, j] = 255 if counts[best] / block.numel() < min_ratio else value
    return out


def test_labels_downscale_to_the_grid_by_majority_with_min_ratio():
    gt = torch.zeros(1, 16, 16, dtype=torch.long)
    gt[0, :8, :8] = 6                    # block (0, 0): all class 6
    gt[0, :2, :8] = 3                    # ... 16 of 64 pixels class 3: 6 has 0.75 -> 6
    gt[0, :8, 8:] = 7
    gt[0, :3, 8:] = 255                  # block (0, 1): 7 has 40/64 = 0.625 -> ignored
    gt[0, 8:, :8] = 255                  # block (1, 0): all ignored -> 255
    gt[0, 8:, 8:] = 2                    # block (1, 1): 2
    got = downscale_labels_by_majority(gt, 8, 0.75, num_classes=19)
    assert got.tolist() == [[[6, 255], [255, 2]]]
    assert torch.equal(got, released_downscale(gt, 8, 0.75, 19))
    torch.manual_seed(3)
    rand = torch.randint(0, 4, (2, 24, 32))
    rand[rand == 3] = 255
    rand[:, :8, :8] = 1
    assert torch.equal(downscale_labels_by_majority(rand, 8, 0.5, 3),
                       released_downscale(rand, 8, 0.5, 3))
    # our grid: a 16-pixel side on 3 cells (caffe ResNet, H // 8 + 1): the third block is
    # beyond the labels, 255 (never a thing cell)
    grid = downscale_labels_by_majority(gt, 8, 0.75, 19, size=(3, 3))
    assert grid[0, :2, :2].tolist() == [[6, 255], [255, 2]]
    assert (grid[0, 2] == 255).all() and (grid[0, :, 2] == 255).all()
    with pytest.raises(ValueError, match="outside 0..18"):
        downscale_labels_by_majority(torch.full((1, 8, 8), 19), 8, 0.75, 19)


def test_feature_distance_is_the_mean_l2_over_thing_cells():
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    imagenet = torch.zeros(1, 2, 2, 2)
    imagenet[0, :, 0, 0] = torch.tensor([3.0, 4.0])   # distance 5 at (0, 0)
    imagenet[0, :, 0, 1] = torch.tensor([1.0, 0.0])   # 1 at (0, 1)
    imagenet[0, :, 1, 1] = torch.tensor([6.0, 8.0])   # 10 at (1, 1)
    cells = torch.tensor([[[6, 255], [0, 13]]])
    mask = thing_mask(cells, (6, 7, 11, 12, 13))
    assert mask.tolist() == [[[True, False], [False, True]]]
    d = feature_distance(student, imagenet, mask)
    assert float(d.detach()) == pytest.approx((5 + 10) / 2)
    # the mask from 16x16 labels in 8-pixel blocks: block (0, 0) class 6 on 48 of its 64
    # pixels (0.75: kept), (1, 1) class 13 on 40 of 64 (0.625: ignored at min_ratio 0.75,
    # kept at 0.5), the others class 0 (no thing)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, :8, :8] = 6
    labels[0, :2, :8] = 3
    labels[0, 8:, 8:] = 13
    labels[0, 8:11, 8:] = 255
    things = (6, 7, 11, 12, 13)
    cells = downscale_labels_by_majority(labels, 8, 0.75, 19)
    assert cells.tolist() == [[[6, 0], [0, 255]]]
    d = feature_distance(student, imagenet, thing_mask(cells, things))
    assert float(d.detach()) == pytest.approx(5.0)
    cells = downscale_labels_by_majority(labels, 8, 0.5, 19)
    assert cells.tolist() == [[[6, 0], [0, 13]]]
    d = feature_distance(student, imagenet, thing_mask(cells, things))
    assert float(d.detach()) == pytest.approx(7.5)
    everywhere = feature_distance(student, imagenet).detach()
    assert float(everywhere) == pytest.approx((5 + 1 + 0 + 10) / 4)
    none = feature_distance(student, imagenet, torch.zeros(1, 2, 2, dtype=torch.bool))
    none.backward()
    assert float(none.detach()) == 0 and not student.grad.any(), "no thing cell: 0, no gradient"
    with pytest.raises(ValueError, match="does not match the feature grid"):
        feature_distance(student, imagenet, torch.ones(1, 3, 3, dtype=torch.bool))


def test_daformer_feature_distance_against_the_frozen_initial_backbone():
    """The method's term on a tiny network: the student's layer4 after a change of weights
    against the copy taken at set-up (eval mode), on the cells whose majority label (ratio
    0.75, written out above) is a thing class; lambda times it in the source pass's loss."""
    cfg = load_config(None, [*TINY, *TARGET, "adapt.method=daformer", *DAFORMER,
                             "adapt.fdist_lambda=0.5"])
    torch.manual_seed(0)
    model = _build_model(cfg, 7)
    method = build_method(cfg.adapt, model)
    initial = FrozenBackbone(model.backbone)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.mul_(1.1)
    model.train()
    images = torch.randn(2, 3, 48, 64)
    labels = torch.randint(0, 7, (2, 48, 64))
    labels[:, :24, :32] = 2  # a thing block (classes 1, 2, 3)
    labels[:, 24:, 32:] = 255
    feats = model.backbone(images)
    ref = initial(images)
    h, w = feats.shape[-2:]
    assert (h, w) == (7, 9), "48x64 on the caffe grid: H // 8 + 1 cells"
    padded = torch.full((2, 8 * h, 8 * w), 255)
    padded[:, :48, :64] = labels
    cells = released_downscale(padded, 8, 0.75, 7)
    mask = (cells == 1) | (cells == 2) | (cells == 3)
    assert mask.any() and not mask.all()
    dist = ((feats - ref) ** 2).sum(1).sqrt()
    expected = dist[mask].mean()

    from deeplabv2.adapt.methods import Step
    step = Step(net=model, model=model, images=images, labels=labels, target=images,
                iteration=0, seg_loss=lambda s, y: s.sum() * 0)
    got = method.feature_distance(step, feats)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    loss = method.loss(step, 0)
    assert float(method.logs["fdist"]) == pytest.approx(0.5 * float(got), rel=1e-4)
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0, "the distance trains the backbone"
    assert not any(p.requires_grad for p in method.imagenet.parameters())


# -- optimizer and schedule --------------------------------------------------------------------
def test_warmup_then_poly_learning_rate_values():
    """mmcv LrUpdaterHook 'linear' warm-up over PolyLrUpdaterHook (DAFormer poly10warm.py):
    lr = poly(it) * (1 - (1 - it / 1500) * (1 - 1e-6)) before 1500, then poly(it) =
    6e-5 * (1 - it / 40000). mmcv v1.3.x (runner/hooks/lr_updater.py): before_train_iter
    computes regular_lr = get_regular_lr (the poly value at runner.iter, 0-based) and, before
    warmup_iters, get_warmup_lr multiplies *that* by 1 - k, k = (1 - it / warmup_iters) *
    (1 - warmup_ratio); poly is (base - min_lr) * (1 - it / max_iters) ** power + min_lr,
    min_lr 0."""
    def lr(it):
        return warmup_poly_lr(6e-5, it, 40000, 1.0, 1500, 1e-6)
    assert lr(0) == pytest.approx(6e-5 * 1e-6, rel=1e-9)
    assert lr(750) == pytest.approx(6e-5 * (1 - 750 / 40000) * (0.5 + 0.5e-6), rel=1e-12)
    assert lr(1499) == pytest.approx(6e-5 * (1 - 1499 / 40000) * (1 - (1 / 1500) * (1 - 1e-6)),
                                     rel=1e-12)
    assert lr(1500) == pytest.approx(6e-5 * (1 - 1500 / 40000), rel=1e-12)
    assert lr(39999) == pytest.approx(6e-5 / 40000, rel=1e-9)
    assert warmup_poly_lr(2.5e-4, 10, 100, 0.9) == pytest.approx(2.5e-4 * 0.9 ** 0.9)
    # numbers: at 750 the poly value 5.8875e-5 times 0.5000005
    assert lr(750) == pytest.approx(2.94375294375e-05, rel=1e-12)


def test_adamw_groups_are_head_x10_with_decay_on_every_parameter():
    cfg = load_config(None, [*TINY, *DAFORMER])
    model = _build_model(cfg, 7)
    opt = build_optimizer(model, cfg.train)
    assert isinstance(opt, torch.optim.AdamW)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"backbone", "head"}
    named = dict(model.named_parameters())
    head = {n for n in named if "head" in n}
    assert {id(p) for p in by_name["head"]["params"]} == {id(named[n]) for n in head}
    assert {id(p) for p in by_name["backbone"]["params"]} == \
        {id(p) for n, p in named.items() if n not in head and p.requires_grad}
    assert any("bn" in n and named[n].requires_grad for n in named), "BN trains (bn: train)"
    for g, mult in ((by_name["backbone"], 1.0), (by_name["head"], 10.0)):
        assert g["lr_mult"] == mult and g["lr"] == pytest.approx(6e-4 * mult)
        assert g["weight_decay"] == 0.01 and g["betas"] == (0.9, 0.999)
    # the default stays the paper's SGD groups
    sgd = build_optimizer(model, load_config(None, TINY).train)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["name"] for g in sgd.param_groups][-2:] == ["head", "head_bias"]


def test_self_training_and_optimizer_settings_are_checked():
    base = [*TINY, *TARGET]
    with pytest.raises(ConfigError, match="train.optimizer='adam'; valid values: sgd, adamw"):
        load_config(None, [*base, "train.optimizer=adam"])
    with pytest.raises(ConfigError, match="train.param_groups='x'"):
        load_config(None, [*base, "train.param_groups=x"])
    with pytest.raises(ConfigError, match="train.warmup_iters must be 0"):
        load_config(None, [*base, "train.warmup_iters=-1"])
    with pytest.raises(ConfigError, match="train.warmup_ratio must be in"):
        load_config(None, [*base, "train.warmup_ratio=0"])
    with pytest.raises(ConfigError, match="adapt.pseudo_margins must be"):
        load_config(None, [*base, "adapt.method=daformer", "adapt.pseudo_margins=[1, 2]"])
    with pytest.raises(ConfigError, match="pseudo_margins is read by the self-training"):
        load_config(None, [*base, "adapt.method=fda", "adapt.pseudo_margins=[1, 2, 0, 0]"])
    with pytest.raises(ConfigError, match="adapt.fdist_classes must be class indices below"):
        load_config(None, [*base, "adapt.method=daformer", "model.num_classes=7",
                           "adapt.fdist_classes=[6, 7]"])
    with pytest.raises(ConfigError, match="adapt.ema_alpha must be in"):
        load_config(None, [*base, "adapt.method=daformer", "adapt.ema_alpha=1"])
    with pytest.raises(ConfigError, match="daformer takes no train.msc_scales"):
        load_config(None, [*base, "adapt.method=daformer", "train.msc_scales=[1, 0.5]"])
    with pytest.raises(ConfigError, match="target_crop_size must equal"):
        load_config(None, [*base, "adapt.method=daformer", "adapt.target_crop_size=[32, 32]"])


@pytest.mark.parametrize("name", ["gta5_to_cityscapes_daformer_dlv2",
                                  "synthia_to_cityscapes_daformer_dlv2"])
def test_packaged_daformer_configs_carry_the_released_settings(name):
    cfg = load_config(name)
    t, a, m = cfg.train, cfg.adapt, cfg.model
    assert (t.optimizer, t.param_groups, t.lr, t.weight_decay) == ("adamw", "mmseg", 6e-5, 0.01)
    assert (t.warmup_iters, t.warmup_ratio, t.poly_power, t.iterations) == (1500, 1e-6, 1.0,
                                                                             40000)
    assert cfg.data.batch_size == 2 and cfg.data.crop_size == [512, 512] and cfg.data.flip
    assert (a.method, a.ema_alpha, a.pseudo_threshold) == ("daformer", 0.999, 0.968)
    assert a.pseudo_margins == [15, 120, 0, 0] and a.fdist_lambda == 0.005
    assert a.fdist_min_ratio == 0.75 and m.bn == "train"
    assert (m.stem, m.atrous_rates, m.head_mode, m.alignment) == ("v1c", [6, 12], "aspp", "pytorch")
    assert m.weights == "resnet101_v1c-e67eebb6.pth" and cfg.eval.protocol == "mmseg"
    # a 19-class head on SYNTHIA too, as mmseg's SynthiaDataset; its 16-class number is
    # converted from the 19-class mIoU (their READMEs: mIoU16 = mIoU19 * 19 / 16)
    assert m.num_classes == 19 and cfg.data.options.get("num_classes", 19) == 19
    assert a.fdist_classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    assert a.target_val_options.get("synthia_miou") == ("mmseg" if "synthia" in name else None)


# -- end to end --------------------------------------------------------------------------------
def test_daformer_trains_and_resumes_exactly(tmp_path):
    more = ["train.iterations=4", "train.checkpoint_every=2", *DAFORMER]
    logs = []
    full = train(uda_config(tmp_path / "full", "daformer", *more),
                 on_iteration=lambda it, entry: logs.append(entry))
    assert all(math.isfinite(h["loss"]) for h in full.history)
    # lr 6e-4, power 1 over 4 iterations, linear warm-up over 2 from ratio 1e-6, by hand:
    # it 0: 6e-4 * 1e-6; it 1: the poly value 4.5e-4 times 1 - 0.5 * (1 - 1e-6) (mmcv warms up
    # the poly value, not the base: 3.000003e-4 otherwise); then the poly value alone
    assert [h["lr"] for h in full.history] == pytest.approx(
        [6e-10, 2.25000225e-4, 3e-4, 1.5e-4], rel=1e-12)
    assert len(logs) == 4 and all(math.isfinite(e["adapt/fdist"]) and e["adapt/mix"] > 0
                                  for e in logs)
    assert any(e["adapt/fdist"] > 0 for e in logs[1:]), "the backbone moved from its copy"
    raw = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    modules = raw["adapt_state"]["modules"]
    assert any(k.startswith("teacher.") for k in modules)
    assert any(k.startswith("imagenet.") for k in modules), "the ImageNet copy is checkpointed"
    assert raw["optimizer_state"]["state"], "AdamW's moments saved for an exact resume"

    cfg = uda_config(tmp_path / "cut", "daformer", *more)
    crash_and_resume(cfg, full)
    # the ImageNet copy is the network as initialised (set-up: seed, datasets, network),
    # untouched by training
    from deeplabv2.train import _datasets
    torch.manual_seed(cfg.train.seed)
    _datasets(cfg)
    fresh = _build_model(cfg, 7)
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(modules[f"imagenet.backbone.{k}"], v), k
    assert not torch.equal(modules["imagenet.backbone.conv1.weight"],
                           full.model.backbone.conv1.weight), "the student moved away from it"


@pytest.mark.slow
def test_torchrun_two_processes_daformer(tmp_path):
    """DAFormer as 2 gloo processes: the replicas agree, and so do the teachers."""
    cfg_path = tmp_path / "uda.yaml"
    save_config(uda_config(tmp_path / "run", "daformer", "train.iterations=2",
                           "train.checkpoint_every=2", "data.scale_range=[1, 1]", *DAFORMER),
                cfg_path)
    code, _, stderr = run_torchrun(["train", "-c", cfg_path], tmp_path)
    assert code == 0, stderr[-3000:]
    assert '"world_size": 2' in (tmp_path / "run" / "replicas.json").read_text()
    adapt = json.loads((tmp_path / "run" / "replicas_adapt.json").read_text())
    assert adapt["world_size"] == 2 and adapt["sha256"][0] == adapt["sha256"][1]
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["adapt_state"]
    assert any(k.startswith("imagenet.") for k in state["modules"])

"""HRDA as a training method (adapt.method hrda, issue 26 item 3): the wrapper built by the loop,
its passes and losses against hand computations, its parameter groups, checkpoints that rebuild
the wrapper, exact resume, config errors. The released values (lhoyer/HRDA experiments.py id
41, mmseg/models/uda/dacs.py, segmentors/hrda_encoder_decoder.py) are written out here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from deeplabv2.adapt.methods import HRDA as HRDAMethod, build_method
from deeplabv2.config import ConfigError, load_config, save_config
from deeplabv2.evaluation.evaluate import evaluate
from deeplabv2.memory import _probe_detail, _probe_sizes
from deeplabv2.model.deeplab import build_model
from deeplabv2.model.hrda import HRDA, detail_crop_box
from deeplabv2.train import _build_model, build_optimizer, train
from deeplabv2.weights import WeightsError, load_model, load_weights, save_weights

from test_daformer import DAFORMER, released_downscale
from test_uda_train import crash_and_resume, uda_config
from torchrun import run_torchrun

# the tiny runs: 48x64 crops (multiples of 16: the context grid at scale 0.5), a 32x32 detail crop
HRDA_TINY = ["adapt.hrda_detail_crop=[32, 32]", *DAFORMER]


def hrda_config(out, *more):
    return uda_config(out, "hrda", *HRDA_TINY, *more)


# -- the configs -------------------------------------------------------------------------------
def test_released_values_fill_in_and_the_packaged_configs_carry_them():
    # null -> the released value ('hrda1-512-0.1', scales [1, 0.5]), written back
    a = uda_config("/tmp/unused", "hrda", *DAFORMER, "data.crop_size=[512, 512]",
                   "data.options={num_samples: 12, size: [512, 512]}").adapt
    assert (a.hrda_detail_crop, a.hrda_detail_weight, a.hrda_context_scale) == \
        ([512, 512], 0.1, 0.5)
    for name, mode, mic in (("gta5_to_cityscapes_hrda_dlv2", "whole", None),
                            ("gta5_to_cityscapes_mic_hrda_dlv2", "sliding", 64),
                            ("synthia_to_cityscapes_hrda_dlv2", "sliding", None),
                            ("synthia_to_cityscapes_mic_hrda_dlv2", "sliding", 64)):
        cfg = load_config(name)
        a, d, e = cfg.adapt, cfg.data, cfg.eval
        assert a.method == "hrda"
        assert (a.hrda_detail_crop, a.hrda_detail_weight, a.hrda_context_scale) == \
            ([512, 512], 0.1, 0.5)
        assert d.crop_size == [1024, 1024] and a.target_crop_size == [1024, 1024]
        assert d.rare_class_sampling["min_crop_ratio"] == 2.0  # 0.5 * 2 ** 2
        assert d.rare_class_sampling["temperature"] == 0.01 and d.cat_max_ratio == 0.75
        if d.dataset == "gta5":
            assert d.resize == [1407, 2560]  # 1914x1052 into 2560x1440 keeping the ratio
            assert int(1052 * min(2560 / 1914, 1440 / 1052) + 0.5) == 1407  # mmcv rescale_size
            assert cfg.model.num_classes == 19
        else:  # synthiaHR: 1280x760 into (2560, 1520) keeping the ratio: exactly twice
            assert d.dataset == "synthia" and d.resize == [1520, 2560]
            assert int(760 * min(2560 / 1280, 1520 / 760) + 0.5) == 1520
            # a 19-class head on SYNTHIA as mmseg's SynthiaDataset; mIoU16 = mIoU19 * 19 / 16
            assert cfg.model.num_classes == 19 and d.options["num_classes"] == 19
            assert a.target_val_options == {"synthia_miou": "mmseg"}
        # DAFormer's thing classes, Cityscapes train ids, on both sources
        assert a.fdist_classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
        assert a.ema_alpha == 0.999 and a.fdist_lambda == 0.005
        # plcrop v2: of the 2048x1024 image before the crop (cityscapes.py crop_pseudo_margins)
        assert a.pseudo_margins == [30, 240, 30, 30] and a.pseudo_margins_frame == "image"
        assert cfg.train.lr == 6e-5 and cfg.train.param_groups == "mmseg"
        assert cfg.train.iterations == 40000 and cfg.data.batch_size == 2
        assert cfg.model.stem == "v1c" and cfg.model.atrous_rates == [6, 12]
        assert e.mode == mode and e.protocol == "none" and a.target_resize is None
        if mode == "sliding":  # test_cfg 'slide': crop = the training crop, stride half of it,
            # the windows' logits averaged (mmseg slide_inference), then one softmax
            assert e.crop_size == [1024, 1024] and e.stride == [512, 512]
            assert e.window_fuse == "logits"
        assert (a.mic or {}).get("block_size") == mic
        if mic:  # MIC's released module settings (id 80 and 81 alike): ratio 0.7, lambda 1,
            # the target colour-augmented ('separatetrgaug')
            assert a.mic == {"mask_ratio": 0.7, "block_size": 64, "lambda": 1.0,
                             "augment": True}
    # the SYNTHIA MIC config is the SYNTHIA HRDA one plus MIC, nothing else
    plain = load_config("synthia_to_cityscapes_hrda_dlv2").to_dict()
    mic = load_config("synthia_to_cityscapes_mic_hrda_dlv2").to_dict()
    assert mic["adapt"].pop("mic") and plain["adapt"].pop("mic") is None
    assert mic["train"].pop("out_dir") != plain["train"].pop("out_dir")
    assert mic == plain


def test_hrda_settings_are_checked():
    with pytest.raises(ConfigError, match="hrda_detail_crop .* larger than data.crop_size"):
        uda_config("/tmp/unused", "hrda", *DAFORMER)  # 512 default on a 48x64 crop
    with pytest.raises(ConfigError, match="hrda_detail_crop must be"):
        hrda_config("/tmp/unused", "adapt.hrda_detail_crop=[30, 32]")
    with pytest.raises(ConfigError, match="hrda_detail_weight must be in"):
        hrda_config("/tmp/unused", "adapt.hrda_detail_weight=1.0")
    with pytest.raises(ConfigError, match="hrda_context_scale must be in"):
        hrda_config("/tmp/unused", "adapt.hrda_context_scale=0")
    with pytest.raises(ConfigError, match="crop_size height 40"):
        hrda_config("/tmp/unused", "data.crop_size=[40, 64]")  # 20 at scale 0.5: off the grid
    with pytest.raises(ConfigError, match="adapt.hrda_detail_weight is read by adapt.method=hrda"):
        uda_config("/tmp/unused", "daformer", *DAFORMER, "adapt.hrda_detail_weight=0.2")
    with pytest.raises(ConfigError, match="needs the ResNet backbone"):
        hrda_config("/tmp/unused", "model.backbone=vgg16")
    with pytest.raises(ConfigError, match="takes no train.msc_scales"):
        hrda_config("/tmp/unused", "adapt.multi_level=true")
    with pytest.raises(ConfigError, match="must equal data.crop_size"):
        hrda_config("/tmp/unused", "adapt.target_crop_size=[32, 32]")
    ok = hrda_config("/tmp/unused", "adapt.mic={block_size: 16}")  # MIC is an option of hrda
    assert ok.adapt.mic["block_size"] == 16 and ok.adapt.hrda_detail_weight == 0.1
    with pytest.raises(ValueError, match="wrapped in"):
        build_method(ok.adapt, build_model(dict(num_classes=7, blocks=[1, 1, 1, 1], width=8)))


# -- the model the loop builds ------------------------------------------------------------------
def test_loop_builds_the_wrapper_and_its_param_groups_hold_the_attention_head(tmp_path):
    cfg = hrda_config(tmp_path)
    model = _build_model(cfg, 7)
    assert isinstance(model, HRDA) and model.detail_crop == (32, 32)
    assert model.context_scale == 0.5
    assert model.config["hrda"] == {"detail_crop": [32, 32], "context_scale": 0.5,
                                    "divisible": 8}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    attention = {id(p) for p in model.scale_attention.parameters()}
    assert attention and attention <= trainable
    # mmseg (the configs'): names holding "head" at 10x, as decode_head.scale_attention.* is
    groups = model.param_groups(6e-5, 0.01, style="mmseg")
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable), "every trainable parameter exactly once"
    head = next(g for g in groups if g["name"] == "head")
    assert attention <= {id(p) for p in head["params"]}
    assert head["lr"] == pytest.approx(6e-4) and head["weight_decay"] == 0.01
    # deeplab style: its weights with the classifier's (10x, decayed), biases 20x undecayed
    groups = model.param_groups(1e-3, 5e-4, style="deeplab")
    by_name = {g["name"]: g for g in groups}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable)
    for p in model.scale_attention.parameters():
        g = by_name["head" if p.ndim > 1 else "head_bias"]
        assert id(p) in {id(q) for q in g["params"]}
    assert by_name["head_bias"]["lr_mult"] == 20.0 and by_name["head_bias"]["weight_decay"] == 0
    # the optimizer the loop builds steps the attention head
    opt = build_optimizer(model, cfg.train)
    assert attention <= {id(p) for g in opt.param_groups for p in g["params"]}


def test_a_detail_crop_filling_one_side_has_offset_zero_there_and_still_two_draws():
    # a 32x48 crop with a 32x32 detail crop: the rows have the one position 0 (numpy's
    # randint(0, (0 + 1) // 8) would fail), the columns (48 - 32 + 1) // 8 = 2 positions
    g = torch.Generator().manual_seed(3)
    box = detail_crop_box(32, 48, 32, 8, g)
    g2 = torch.Generator().manual_seed(3)
    assert int(torch.randint(0, 1, (1,), generator=g2)) == 0
    left = 8 * int(torch.randint(0, 2, (1,), generator=g2))
    assert box == (0, 32, left, left + 32)
    assert torch.equal(g.get_state(), g2.get_state()), "one draw per side"


def test_memory_probes_run_on_the_hrda_grid(tmp_path):
    model = _build_model(hrda_config(tmp_path), 7)
    for h, w in _probe_sizes((48, 64), model):
        assert h % 16 == 0 and w % 16 == 0 and h >= 32 and w >= 32 and h <= 48 and w <= 64
    # the released 1024 crop: two distinct small probes on the 16-pixel grid (97 pixels a side
    # rounded up: 112; 0.6 of it, 58: 64), each with the detail crop at half its side, as 512
    # of 1024 (two equal probes would leave the fit nothing to tell the passes apart by)
    probes = _probe_sizes((1024, 1024), HRDA(model.network, detail_crop=512))
    assert probes == [(64, 64), (112, 112)]
    assert [_probe_detail((512, 512), (1024, 1024), p) for p in probes] == [(32, 32), (56, 56)]
    assert _probe_detail((512, 256), (1024, 1024), (64, 112)) == (32, 32)  # 28 onto the grid


# -- the passes against hand computations -------------------------------------------------------
def _ce(scores, labels, weight=None):
    """mmseg's decode-head loss written out: bilinear (half-pixel) resize to the labels,
    per-pixel cross-entropy, 255 ignored (zero), times the weight, mean over all pixels."""
    up = F.interpolate(scores, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    logp = up.double().log_softmax(1)
    valid = labels != 255
    picked = logp.gather(1, labels.clamp(0, up.shape[1] - 1)[:, None])[:, 0]
    loss = torch.where(valid, -picked, torch.zeros_like(picked))
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def test_source_pass_is_the_fused_and_detail_losses_plus_the_context_feature_distance(tmp_path):
    cfg = hrda_config(tmp_path, "adapt.hrda_detail_weight=0.25")
    torch.manual_seed(0)
    model = _build_model(cfg, 7)
    method = build_method(cfg.adapt, model)
    assert isinstance(method, HRDAMethod)
    with torch.no_grad():  # the student away from the frozen copy: a non-zero distance
        for p in model.network.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 48, 64)
    labels = torch.randint(0, 7, (2, 48, 64))
    labels[:, :8] = 255
    labels[0, 16:48, 0:32] = 3  # a thing class (fdist_classes [1, 2, 3]) over whole blocks
    from deeplabv2.adapt.methods import Step
    step = Step(net=model, model=model, images=images, labels=labels, target=images,
                iteration=0, seg_loss=None)
    torch.manual_seed(7)
    loss = method.loss(step, 0)
    # the box the pass drew: the global generator's next two draws, rows first
    torch.manual_seed(7)
    box = detail_crop_box(48, 64, 32, 8)
    y1, y2, x1, x2 = box
    with torch.no_grad():
        out = model.forward_train(images, box=box)
        seg = 0.75 * _ce(out["fused"], labels) + 0.25 * _ce(out["detail"],
                                                            labels[:, y1:y2, x1:x2])
        # feature distance (dacs.py calc_feat_dist, feature_scale 0.5): the student's context
        # features against the frozen backbone on the half-size image, labels by majority in
        # 16-pixel blocks (1024 // 64 released), thing cells only
        small = F.interpolate(images, size=(24, 32), mode="bilinear", align_corners=False)
        student = model.network.backbone(small)
        frozen = method.imagenet.backbone(small)
        cells = released_downscale(labels, 16, 0.75, 7)  # (2, 3, 4)
        grid = torch.full(student.shape[:1] + student.shape[-2:], 255, dtype=torch.long)
        grid[:, :cells.shape[1], :cells.shape[2]] = cells  # caffe layout: one more cell
        mask = torch.isin(grid, torch.tensor([1, 2, 3]))
        assert mask.any()
        dist = (student - frozen).double().pow(2).sum(1).sqrt()[mask].mean()
    expected = seg + 0.005 * dist
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(method.logs["fdist"]) == pytest.approx(0.005 * float(dist), rel=1e-5)


def test_mixed_pass_trains_through_hrda_against_the_teachers_inference_pseudo_labels(tmp_path):
    cfg = hrda_config(tmp_path, "adapt.pseudo_margins=[0, 0, 0, 0]", "adapt.fdist_lambda=0")
    torch.manual_seed(0)
    model = _build_model(cfg, 7)
    method = build_method(cfg.adapt, model)
    seen = []
    teacher = method.teacher.model
    real = teacher.predict
    teacher.predict = lambda x, **kw: seen.append(x.shape) or real(x, **kw)
    calls = []
    hook = model.register_forward_hook(lambda m, i, kw, o: calls.append(kw), with_kwargs=True)
    from deeplabv2.adapt.methods import Step
    step = Step(net=model, model=model, images=torch.randn(2, 3, 48, 64),
                labels=torch.randint(0, 7, (2, 48, 64)), target=torch.randn(2, 3, 48, 64),
                iteration=0, seg_loss=None)
    model.train()
    loss = method.loss(step, 1)
    hook.remove()
    assert seen == [torch.Size([2, 3, 48, 64])], "pseudo-labels from the inference forward"
    assert calls == [{"hrda_train": True}], "the student pass is the two-crop forward"
    assert math.isfinite(float(loss)) and float(loss) > 0
    # the teacher is an EMA of the whole wrapper, attention head included
    assert any(n.startswith("scale_attention.") for n, _ in teacher.named_parameters())
    with torch.no_grad():
        for p in model.scale_attention.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.scale_attention.parameters()]
    method.after_step(model, 5)
    rate = min(1 - 1 / (5 + 1 + 1), 0.999)  # DAFormer's offset: iteration it + 1
    for b, t, s in zip(before, teacher.scale_attention.parameters(),
                       model.scale_attention.parameters()):
        torch.testing.assert_close(t, rate * b + (1 - rate) * s)


# -- checkpoints ---------------------------------------------------------------------------------
def test_saved_wrapper_reloads_as_the_wrapper_and_evaluates(tmp_path):
    cfg = hrda_config(tmp_path)
    torch.manual_seed(0)
    model = _build_model(cfg, 7)
    with torch.no_grad():
        for p in model.scale_attention.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "model.pth"
    save_weights(model, path, [f"c{i}" for i in range(7)])
    loaded = load_model(path)
    assert isinstance(loaded, HRDA) and loaded.detail_crop == (32, 32)
    assert loaded.alignment.name == model.alignment.name
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    from deeplabv2.data import build_dataset
    ds = build_dataset("synthetic", None, "val", num_samples=2, size=[48, 64], style="target")
    metrics = evaluate(loaded, ds)
    assert 0 <= metrics["miou"] <= 1
    # any image size (no multiple of 16): padded inside the wrapper
    odd = build_dataset("synthetic", None, "val", num_samples=2, size=[45, 70], style="target")
    assert 0 <= evaluate(loaded, odd)["miou"] <= 1
    # MIC's HRDA protocol shape: the front's sliding windows around the HRDA forward
    from deeplabv2.inference.front import InferenceConfig
    sliding = InferenceConfig.from_dict({"mode": "sliding", "crop_size": [48, 48],
                                         "stride": [16, 16]})
    assert 0 <= evaluate(loaded, ds, inference=sliding)["miou"] <= 1
    # .safetensors too
    save_weights(model, tmp_path / "model.safetensors")
    assert isinstance(load_model(tmp_path / "model.safetensors"), HRDA)
    # a file of the plain network is no HRDA file: said, with where it goes
    save_weights(model.network, tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="load it into model.network"):
        load_weights(loaded, tmp_path / "plain.pth")
    load_weights(loaded.network, tmp_path / "plain.pth")
    # a wrapper file whose attention head is missing or of another shape
    raw = torch.load(path, weights_only=True)
    raw["model"] = {k: v for k, v in raw["model"].items()
                    if not k.startswith("scale_attention.")}
    raw.pop("sha256", None)
    for k in [k for k in raw if "digest" in k]:
        raw.pop(k)
    torch.save(raw, tmp_path / "noatt.pth")
    with pytest.raises(WeightsError, match="scale_attention"):
        load_model(tmp_path / "noatt.pth")


# -- end to end ----------------------------------------------------------------------------------
def test_hrda_trains_and_resumes_exactly(tmp_path):
    more = ["train.iterations=4", "train.checkpoint_every=2"]
    logs = []
    full = train(hrda_config(tmp_path / "full", *more),
                 on_iteration=lambda it, entry: logs.append(entry))
    assert isinstance(full.model, HRDA)
    assert all(math.isfinite(h["loss"]) for h in full.history)
    assert len(logs) == 4 and all(e["adapt/seg"] > 0 and e["adapt/mix"] > 0
                                  and math.isfinite(e["adapt/fdist"]) for e in logs)
    assert "val_miou" in logs[-1]
    raw = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    assert raw["model_config"]["hrda"]["detail_crop"] == [32, 32]
    modules = raw["adapt_state"]["modules"]
    assert any(k.startswith("teacher.model.scale_attention.") for k in modules)
    assert any(k.startswith("imagenet.") for k in modules)
    assert isinstance(load_model(tmp_path / "full" / "model.pth"), HRDA)

    cfg = hrda_config(tmp_path / "cut", *more)
    crash_and_resume(cfg, full)


def test_hrda_with_mic_trains(tmp_path, monkeypatch):
    # with the image-frame margins of the released configs: the loop hands the target crops'
    # boxes to the pseudo-labels (every target image here is 48x64, the crop 48x64: the box is
    # the whole image, unflipped or flipped)
    import deeplabv2.adapt.methods as methods
    seen = []
    real = methods.pseudo_labels
    monkeypatch.setattr(methods, "pseudo_labels", lambda *a, **kw: seen.append(
        (kw["crop_boxes"], real(*a, **kw)[1])) or real(*a, **kw))
    logs = []
    train(hrda_config(tmp_path, "train.iterations=1", "adapt.mic={block_size: 16}",
                      "adapt.pseudo_threshold=0",  # every pixel confident: weight 1
                      "adapt.pseudo_margins=[2, 5, 3, 1]", "adapt.pseudo_margins_frame=image"),
          on_iteration=lambda it, entry: logs.append(entry))
    assert logs[0]["adapt/mic"] > 0 and 0 < logs[0]["adapt/mic_kept"] < 1
    (boxes, weights), = [s for s in seen if len(s[0]) == 2]  # not the memory probes' batch of 1
    assert boxes[:, :4].tolist() == [[0, 0, 48, 64]] * 2
    for box, w in zip(boxes.tolist(), weights):
        left, right = (1, 3) if box[4] else (3, 1)  # a flipped image has its margins swapped
        expected = torch.zeros(48, 64)
        expected[2:48 - 5, left:64 - right] = 1
        assert torch.equal(w, expected)


@pytest.mark.slow
def test_torchrun_two_processes_hrda(tmp_path):
    """HRDA as 2 gloo processes (two network passes inside each DDP forward): the replicas
    agree, and so do the teachers."""
    cfg_path = tmp_path / "uda.yaml"
    save_config(hrda_config(tmp_path / "run", "train.iterations=2", "train.checkpoint_every=2",
                            "data.scale_range=[1, 1]"), cfg_path)
    code, _, stderr = run_torchrun(["train", "-c", cfg_path], tmp_path)
    assert code == 0, stderr[-3000:]
    assert '"world_size": 2' in (tmp_path / "run" / "replicas.json").read_text()
    adapt = json.loads((tmp_path / "run" / "replicas_adapt.json").read_text())
    assert adapt["world_size"] == 2 and adapt["sha256"][0] == adapt["sha256"][1]


# -- pseudo-label margins of the image (plcrop v2) -----------------------------------------------
def test_image_margins_zero_the_crop_where_it_covers_the_images_margins_by_hand():
    from deeplabv2.adapt.self_training import apply_image_margins
    # a 10x20 image, margins top 1, bottom 2, left 3, right 4, a 6x8 crop
    # crop at row 3, column 0, unflipped: image rows 3..8 (row 8 is in the bottom margin: crop
    # row 5), columns 0..7 (0, 1, 2 in the left margin)
    out = apply_image_margins(torch.ones(2, 6, 8), (1, 2, 3, 4),
                              torch.tensor([[3, 0, 10, 20, 0], [0, 12, 10, 20, 1]]))
    assert out[0].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]] * 5 + [[0] * 8]
    # crop at row 0, column 12 of the flipped image: its columns 12..19; flipped, the image's
    # left margin (3) is its last 3 columns 17..19 = crop columns 5..7; row 0 is the top margin
    assert out[1].tolist() == [[0] * 8] + [[1, 1, 1, 1, 1, 0, 0, 0]] * 5
    # a window past the image (padding) lies beyond its last row / column
    pad = apply_image_margins(torch.ones(1, 3, 3), (0, 1, 0, 0), torch.tensor([[1, 0, 2, 2, 0]]))
    assert pad[0].tolist() == [[0, 0, 0]] * 3
    with pytest.raises(ValueError, match="crop boxes must be \\(N, 5\\) for 2 crops"):
        apply_image_margins(torch.ones(2, 4, 4), (1, 1, 1, 1), torch.zeros(1, 5))


def test_image_margins_match_a_mask_of_the_image_cropped_and_flipped_with_it():
    """The release's way, independently: a mask of the whole image (0 in the margins) goes
    through the same transform as the image (here: as its label), and must be 0 exactly where
    the crop's box zeroes the weights."""
    import numpy as np
    from deeplabv2.adapt.self_training import apply_image_margins
    from deeplabv2.data.transforms import TrainTransform
    h, w, margins = 60, 90, (5, 12, 7, 3)
    mask = np.zeros((h, w), np.uint8)
    mask[5:h - 12, 7:w - 3] = 1
    image = np.zeros((h, w, 3), np.uint8)
    t = TrainTransform((32, 40), scale_range=(1.0, 1.0), flip=True, crop_box=True)
    flips = set()
    for seed in range(12):
        out = t(image, mask, np.random.default_rng(seed))
        box = out["crop_box"]
        flips.add(int(box[4]))
        assert box[2:4].tolist() == [h, w]
        got = apply_image_margins(torch.ones(1, 32, 40), margins, box[None])
        assert torch.equal(got[0], out["label"].float()), seed
    assert flips == {0, 1}
    # without crop_box the sample is as before: image and label only
    assert set(TrainTransform((32, 40))(image, mask, np.random.default_rng(0))) == \
        {"image", "label"}


def test_image_margins_frame_is_checked():
    with pytest.raises(ConfigError, match="pseudo_margins_frame must be crop or image"):
        hrda_config("/tmp/unused", "adapt.pseudo_margins_frame=whole")
    with pytest.raises(ConfigError, match="pseudo_margins_frame is read by the self-training"):
        uda_config("/tmp/unused", "fda", "adapt.pseudo_margins_frame=image")

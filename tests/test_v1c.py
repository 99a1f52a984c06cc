"""The DeepLab v2 of DAFormer/HRDA/MIC: ResNet-101 V1c, the "dlv2red" head, mmcv/mmseg files.

Every expectation here is written from the released definitions, not from our modules:

* key names and shapes from mmseg's ``ResNet`` (``deep_stem=True``: ``stem.0`` ... ``stem.8``),
  ``Bottleneck`` (``conv1/bn1``, ``conv2/bn2``, ``conv3/bn3``), ``ResLayer`` (``downsample.0``
  conv, ``downsample.1`` BN), ``DLV2Head`` / ``ASPPModule`` / mmcv ``ConvModule``
  (``decode_head.aspp_modules.K.conv.{weight,bias}``), and the UDA module's members
  (``model``, ``ema_model``, ``imnet_model``) of lhoyer/DAFormer (identical in HRDA and MIC);
* the forward pass as a chain of ``F.conv2d`` / ``F.batch_norm`` / ``F.max_pool2d`` on the
  file's own tensors, looked up by those names (``mmseg_forward`` below), with the settings of
  ``configs/_base_/models/deeplabv2_r50-d8.py`` (strides 1/2/1/1, dilations 1/1/2/4,
  ``contract_dilation=True``, ``style='pytorch'``) and ``deeplabv2red_r50-d8.py`` (dilations
  6 and 12), logits resized with ``align_corners=False`` as ``EncoderDecoder.encode_decode``.

The ResNets are narrow (width 8) so that the files stay small; a full-depth 3/4/23/3 one gives
the real file's key names.
"""

import pytest
import torch
import torch.nn.functional as F

import deeplabv2
from deeplabv2 import MMSEG_RGB, WeightsError, build_model, load_model, load_weights, save_weights
from deeplabv2.config import ConfigError, load_config

R101 = (3, 4, 23, 3)
SMALL = (1, 2, 2, 2)
STRIDES, DILATIONS = (1, 2, 1, 1), (1, 1, 2, 4)  # deeplabv2_r50-d8.py
RED_RATES = (6, 12)  # deeplabv2red_r50-d8.py
BN_STATS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def v1c(blocks=SMALL, num_classes=5, width=8, **kw):
    cfg = {"backbone": "resnet", "blocks": list(blocks), "width": width, "stem": "v1c",
           "bn": "train", "atrous_rates": list(RED_RATES), "num_classes": num_classes, **kw}
    return build_model(cfg)


def randomize(model, seed=0):
    """Distinct values everywhere (BN statistics included) so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("num_batches_tracked"):
                v.fill_(1000 + seed)
                continue
            r = torch.rand(v.shape, generator=g)
            if v.ndim > 1:
                v.copy_((r - 0.5) * (12.0 / v[0].numel()) ** 0.5)
            elif k.endswith(("running_var", "weight")):
                v.copy_(0.5 + r)
            else:
                v.copy_((r - 0.5) * 0.2)
    return model


# -- the released names, written out ------------------------------------------------------------
def mmcv_resnet_v1c_names(blocks) -> list[str]:
    """The state-dict keys of mmseg's ``ResNetV1c`` (what ``resnet101_v1c`` files hold, without
    their ``fc``): ``_make_stem_layer`` with ``deep_stem``, then ``ResLayer`` x 4."""
    names = [f"stem.{i}.weight" for i in (0, 3, 6)]
    names += [f"stem.{i}.{s}" for i in (1, 4, 7) for s in BN_STATS]
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            p = f"layer{stage}.{b}."
            names += [p + f"conv{i}.weight" for i in (1, 2, 3)]
            names += [p + f"bn{i}.{s}" for i in (1, 2, 3) for s in BN_STATS]
        names += [f"layer{stage}.0.downsample.0.weight"]
        names += [f"layer{stage}.0.downsample.1.{s}" for s in BN_STATS]
    return names


def dlv2_head_names(branches) -> list[str]:
    """``DLV2Head``: ``aspp_modules`` (an ``ASPPModule`` of mmcv ``ConvModule``s, attribute
    ``conv``, bias because ``norm_cfg=None``); ``conv_seg`` is deleted in its ``__init__``."""
    return [f"aspp_modules.{k}.conv.{p}" for k in range(branches) for p in ("weight", "bias")]


def as_mmseg(model) -> dict[str, torch.Tensor]:
    """Our model's tensors under a segmentor's names (``backbone.*``, ``decode_head.*``)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("head.convs."):
            _, _, i, p = k.split(".")
            out[f"decode_head.aspp_modules.{i}.conv.{p}"] = v.clone()
        else:
            out[k] = v.clone()
    return out


# -- the released forward, written out ---------------------------------------------------------
def _bn(x, sd, p, training):
    return F.batch_norm(x, sd[p + "running_mean"].clone(), sd[p + "running_var"].clone(),
                        sd[p + "weight"], sd[p + "bias"], training=training, momentum=0.1,
                        eps=1e-5)


def mmseg_forward(sd, x, blocks, rates=RED_RATES, training=False, contract=True):
    """``EncoderDecoder.encode_decode`` of their DeepLab v2 from a segmentor state dict ``sd``
    (keys ``backbone.*``, ``decode_head.*``): logits at the input size."""
    b = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    h = {k[len("decode_head."):]: v for k, v in sd.items() if k.startswith("decode_head.")}
    logits = dlv2_head(h, mmseg_backbone(b, x, blocks, training, contract), rates)
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def mmseg_backbone(b, x, blocks, training=False, contract=True):
    """Their ``ResNetV1c`` (``deeplabv2_r50-d8.py`` settings) from its tensors ``b`` (keys
    after ``backbone.``): the last stage's features."""
    y = x
    for conv, bn, stride in ((0, 1, 2), (3, 4, 1), (6, 7, 1)):  # 3x3 convs, padding 1
        y = F.relu(_bn(F.conv2d(y, b[f"stem.{conv}.weight"], stride=stride, padding=1), b,
                       f"stem.{bn}.", training))
    y = F.max_pool2d(y, 3, stride=2, padding=1)  # ceil_mode False
    for stage, n in enumerate(blocks, start=1):
        stride, dilation = STRIDES[stage - 1], DILATIONS[stage - 1]
        for j in range(n):
            p = f"layer{stage}.{j}."
            d = dilation // 2 if (j == 0 and contract and dilation > 1) else dilation
            s = stride if j == 0 else 1
            out = F.relu(_bn(F.conv2d(y, b[p + "conv1.weight"]), b, p + "bn1.", training))
            out = F.relu(_bn(F.conv2d(out, b[p + "conv2.weight"], stride=s, padding=d,
                                      dilation=d), b, p + "bn2.", training))  # style pytorch
            out = _bn(F.conv2d(out, b[p + "conv3.weight"]), b, p + "bn3.", training)
            if j == 0:
                identity = _bn(F.conv2d(y, b[p + "downsample.0.weight"], stride=s), b,
                               p + "downsample.1.", training)
            else:
                identity = y
            y = F.relu(out + identity)
    return y


def dlv2_head(h, y, rates=RED_RATES):
    """``DLV2Head.forward`` from its tensors ``h`` (keys ``aspp_modules.K.conv.*``):
    ``aspp_outs[0] + aspp_outs[1] + ...`` on the features ``y``."""
    logits = 0
    for k, r in enumerate(rates):
        logits = logits + F.conv2d(y, h[f"aspp_modules.{k}.conv.weight"],
                                   h[f"aspp_modules.{k}.conv.bias"], padding=r, dilation=r)
    return logits


# -- the architecture -----------------------------------------------------------------------------
def test_v1c_resnet101_has_the_key_names_and_shapes_of_mmseg_resnetv1c():
    model = v1c(R101, num_classes=19, width=64)
    sd = model.state_dict()
    backbone = sorted(k[len("backbone."):] for k in sd if k.startswith("backbone."))
    assert backbone == sorted(mmcv_resnet_v1c_names(R101))
    assert sorted(k for k in sd if not k.startswith("backbone.")) == \
        ["head.convs.0.bias", "head.convs.0.weight", "head.convs.1.bias", "head.convs.1.weight"]
    # stem_channels 64: 3 -> 32 -> 32 -> 64
    assert sd["backbone.stem.0.weight"].shape == (32, 3, 3, 3)
    assert sd["backbone.stem.3.weight"].shape == (32, 32, 3, 3)
    assert sd["backbone.stem.6.weight"].shape == (64, 32, 3, 3)
    assert sd["backbone.layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["head.convs.1.weight"].shape == (19, 2048, 3, 3)
    bb = model.backbone
    # the dilations of contract_dilation and the stride on the 3x3 (style='pytorch')
    assert [blk.conv2.dilation[0] for blk in bb.layer3] == [1] + [2] * 22
    assert [blk.conv2.dilation[0] for blk in bb.layer4] == [2, 4, 4]
    assert bb.layer2[0].conv2.stride == (2, 2) and bb.layer2[0].conv1.stride == (1, 1)
    assert bb.maxpool.ceil_mode is False and model.layout == "torchvision"
    # trainable BN (norm_cfg requires_grad=True, norm_eval=False): in the optimizer, no decay here
    groups = {g["name"]: g for g in model.param_groups(lr=1.0)}
    assert any(p is bb.stem[1].weight for p in groups["backbone_norm"]["params"])
    # the DLV2Head init: Normal(std=0.01) on aspp_modules, bias 0
    w = model.head.convs[0].weight
    assert abs(w.std().item() - 0.01) < 0.001 and torch.all(model.head.convs[0].bias == 0)


@pytest.mark.parametrize("training", [False, True])
def test_v1c_dlv2red_forward_equals_the_released_chain(training):
    torch.manual_seed(0)
    model = randomize(v1c())
    model.alignment = deeplabv2.model.get_alignment("pytorch")
    x = torch.randn(2, 3, 72, 88)
    sd = as_mmseg(model)
    expected = mmseg_forward(sd, x, SMALL, training=training)
    model.train(training)
    with torch.no_grad():
        got = model(x)
    assert got.shape == (2, 5, 72, 88)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # and contract_dilation is part of that function: without it the chain differs
    other = mmseg_forward(sd, x, SMALL, training=training, contract=False)
    assert not torch.allclose(other, expected, atol=1e-3)


def test_v1c_with_frozen_bn_is_the_chain_with_running_statistics():
    """bn=frozen: the running statistics in training too (the stem's conv+BN pairs run as one
    convolution under autograd: the same function), gradients reaching the stem's convs."""
    model = randomize(v1c(bn="frozen"), seed=9)
    model.alignment = deeplabv2.model.get_alignment("pytorch")
    x = torch.randn(2, 3, 56, 64)
    sd = {k: v.detach() for k, v in as_mmseg(model).items()}
    for k in [k for k in sd if "num_batches_tracked" in k]:
        del sd[k]
    expected = mmseg_forward(sd, x, SMALL, training=False)
    got = model.train()(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    got.square().mean().backward()
    assert model.backbone.stem[0].weight.grad is not None
    assert model.backbone.stem[1].weight.grad is None  # frozen scale


def test_contract_dilation_can_be_turned_off_and_old_configs_are_unchanged():
    m = v1c(contract_dilation=False)
    assert [blk.conv2.dilation[0] for blk in m.backbone.layer4] == [4, 4]
    assert m.config["contract_dilation"] is False and m.config["stem"] == "v1c"
    old = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                       "num_classes": 3})
    assert old.config == {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                          "num_classes": 3, "atrous_rates": [6, 12, 18, 24],
                          "frozen_bn": True}
    assert hasattr(old.backbone, "conv1") and not hasattr(old.backbone, "stem")
    assert [blk.conv2.dilation[0] for blk in old.backbone.layer3] == [2]  # caffe: every block
    with pytest.raises(ValueError, match="stem='v1b'"):
        build_model({"backbone": "resnet", "num_classes": 3, "stem": "v1b"})
    with pytest.raises(ValueError, match="'stem' does not apply to the vgg16"):
        build_model({"backbone": "vgg16", "num_classes": 3, "stem": "v1c"})


def test_config_keys_model_stem_and_contract_dilation():
    cfg = load_config("demo", ["model.stem=v1c", "model.atrous_rates=[6,12]"])
    assert cfg.model.stem == "v1c" and cfg.model.contract_dilation is None
    with pytest.raises(ConfigError, match="model.stem='deep'; valid values: caffe, v1c"):
        load_config("demo", ["model.stem=deep"])
    with pytest.raises(ConfigError, match="model.contract_dilation"):
        load_config("demo", ["model.contract_dilation=maybe"])


def test_v1c_checkpoint_round_trip_and_inference_path(tmp_path):
    from deeplabv2.deploy.fast import optimize_for_inference
    model = randomize(v1c())
    model.preprocessing, model.alignment = MMSEG_RGB, deeplabv2.model.get_alignment("pytorch")
    model.eval()
    path = tmp_path / "v1c.pth"
    save_weights(model, path)
    back = load_model(path).eval()
    assert back.config == model.config and back.layout == "torchvision"
    assert back.preprocessing == MMSEG_RGB and back.alignment.name == "pytorch"
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(back(x), ref)
        fast = optimize_for_inference(back)(x)  # BN folded into the stem's Sequential too
    assert torch.allclose(fast, ref, atol=1e-4 * ref.abs().max().item())


# -- mmcv's ImageNet resnet101_v1c file ---------------------------------------------------------
def _imagenet_file(src, blocks):
    """An ``open-mmlab://resnet101_v1c``-style file: ResNetV1c names plus the ImageNet fc."""
    sd = src.backbone.state_dict()
    state = {name: sd[name].clone() for name in mmcv_resnet_v1c_names(blocks)}
    state["fc.weight"] = torch.randn(1000, src.backbone.out_channels)
    state["fc.bias"] = torch.randn(1000)
    return state


@pytest.mark.parametrize("wrapped", [False, True])
def test_mmcv_resnet101_v1c_imagenet_file_loads_strictly(tmp_path, wrapped):
    src = randomize(v1c(R101, num_classes=19))
    state = _imagenet_file(src, R101)
    path = tmp_path / "resnet101_v1c-e67eebb6.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    model = v1c(R101, num_classes=19)
    head = model.head.convs[0].weight.clone()
    report = load_weights(model, path)
    assert report.layout == "mmcv_v1c"
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert torch.equal(model.head.convs[0].weight, head) and not report.head_loaded
    assert set(report.dropped) == {"fc.weight", "fc.bias"}
    assert len(report.loaded) == len(state) - 2
    assert all(report.loaded[k] == "backbone." + k for k in report.loaded)
    assert sorted(report.not_in_file) == sorted(k for k in model.state_dict()
                                                if k.startswith("head."))
    assert model.preprocessing == MMSEG_RGB and model.layout == "torchvision"
    # into the DeepLab (caffe-stem) network: refused, saying what to build
    with pytest.raises(WeightsError, match=r"'stem\.0\.weight'.*stem='v1c'"):
        load_weights(build_model({"backbone": "resnet", "blocks": list(R101), "width": 8,
                                  "num_classes": 19}), path)


def test_mmcv_file_missing_or_unexpected_key_is_named(tmp_path):
    src = randomize(v1c())
    state = _imagenet_file(src, SMALL)
    path = tmp_path / "good.pth"
    torch.save(state, path)
    frozen = v1c(bn="frozen")  # FrozenBatchNorm2d has no step counter: those are dropped
    report = load_weights(frozen, path)
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    assert set(report.dropped) == counters | {"fc.weight", "fc.bias"}
    assert all("step counter" in report.dropped[k] for k in counters)
    assert torch.equal(frozen.backbone.stem[7].running_var, src.backbone.stem[7].running_var)
    del state["layer3.1.bn2.running_var"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError,
                       match=r"missing backbone key 'backbone\.layer3\.1\.bn2\.running_var'"):
        load_weights(v1c(), path)
    state = _imagenet_file(src, SMALL)
    state["layer4.0.se.fc1.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"key 'layer4\.0\.se\.fc1\.weight' has no counterpart"):
        load_weights(v1c(), path)


# -- their released checkpoints ------------------------------------------------------------------
def _uda_checkpoint(members: dict, blocks=SMALL):
    """A DAFormer/HRDA/MIC ``latest.pth``: mmcv's ``save_checkpoint`` (``meta``,
    ``state_dict``, ``optimizer``) of the UDA module, each member a segmentor."""
    state = {}
    for member, model in members.items():
        seg = as_mmseg(model)
        names = ["backbone." + n for n in mmcv_resnet_v1c_names(blocks)] + \
            ["decode_head." + n for n in dlv2_head_names(2)]
        assert sorted(seg) == sorted(names)  # our tensors under exactly the released names
        state.update({f"{member}.{k}": v for k, v in seg.items()})
    meta = {"mmcv_version": "1.3.7", "time": "Mon Jan 10 10:00:00 2022",
            "CLASSES": tuple(f"c{i}" for i in range(5)), "PALETTE": [[i, i, i] for i in range(5)],
            "config": "model = dict(type='EncoderDecoder', ...)", "iter": 40000, "epoch": 1}
    optimizer = {"state": {}, "param_groups": [{"lr": 6e-5, "betas": (0.9, 0.999),
                                                "weight_decay": 0.01, "params": [0, 1]}]}
    return {"meta": meta, "state_dict": state, "optimizer": optimizer}, state


def test_released_uda_checkpoint_student_teacher_and_imagenet_copy(tmp_path):
    student, teacher, imnet = (randomize(v1c(), seed=s) for s in (1, 2, 3))
    ckpt, state = _uda_checkpoint({"model": student, "ema_model": teacher,
                                   "imnet_model": imnet})
    path = tmp_path / "latest.pth"
    torch.save(ckpt, path)
    x = torch.randn(1, 3, 64, 96)
    for member, src, prefix in ((None, student, "model."), ("teacher", teacher, "ema_model."),
                                ("imnet", imnet, "imnet_model.")):
        model = v1c()
        report = load_weights(model, path, head="require", member=member)
        assert report.layout == "mmseg" and report.head_loaded
        assert model.alignment.name == "pytorch" and model.preprocessing == MMSEG_RGB
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (member, k)
        # every key accounted for: the member's loaded, the others dropped, naming their member
        assert set(report.loaded) == {k for k in state if k.startswith(prefix)}
        assert set(report.dropped) == {k for k in state if not k.startswith(prefix)}
        assert len(report.loaded) + len(report.dropped) == len(state)
        assert report.loaded[prefix + "decode_head.aspp_modules.1.conv.bias"] == \
            "head.convs.1.bias"
        assert report.loaded[prefix + "backbone.stem.7.running_var"] == \
            "backbone.stem.7.running_var"
        if member is None:
            assert "EMA teacher" in report.dropped["ema_model.backbone.stem.0.weight"]
            imnet_key = "imnet_model.decode_head.aspp_modules.0.conv.weight"
            assert "ImageNet" in report.dropped[imnet_key]
        # their output, from the file's own tensors under their own names
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        with torch.no_grad():
            got = model.eval()(x)
        expected = mmseg_forward(mine, x, SMALL)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # the class names and colours of mmcv's meta come with the head
    assert model.classes == [f"c{i}" for i in range(5)] and model.palette[3] == [3, 3, 3]
    out = tmp_path / "converted.pth"
    save_weights(model, out, classes=model.classes, palette=model.palette)
    assert load_model(out).classes == model.classes
    with pytest.raises(WeightsError,
                       match=r"member='ema'.*model\.\*, ema_model\.\*, imnet_model\.\*"):
        load_weights(v1c(), path, member="ema")


def test_plain_segmentor_and_mic_teacher_prefix(tmp_path):
    src = randomize(v1c(), seed=4)
    path = tmp_path / "segmentor.pth"
    torch.save({"state_dict": as_mmseg(src), "meta": {}}, path)
    model = v1c()
    report = load_weights(model, path, head="require")
    assert not report.dropped and len(report.loaded) == len(src.state_dict())
    with pytest.raises(WeightsError, match="member='teacher'.*without a UDA teacher"):
        load_weights(v1c(), path, member="teacher")
    # MIC with its own teacher (mask_alpha != 'same'): mic.teacher.ema_model.*
    ckpt, state = _uda_checkpoint({"model": src, "mic.teacher.ema_model": randomize(v1c(), 5)})
    torch.save(ckpt, path)
    report = load_weights(model, path, member="mic.teacher.ema_model")
    assert len(report.loaded) == len(report.dropped) == len(state) // 2
    assert "the student" in report.dropped["model.backbone.stem.0.weight"]
    assert report.loaded["mic.teacher.ema_model.backbone.layer1.0.bn1.bias"] == \
        "backbone.layer1.0.bn1.bias"


def test_released_checkpoint_errors_name_the_key(tmp_path):
    src = randomize(v1c())
    path = tmp_path / "bad.pth"
    # missing
    ckpt, state = _uda_checkpoint({"model": src})
    del state["model.backbone.layer2.1.conv2.weight"]
    torch.save(ckpt, path)
    with pytest.raises(WeightsError,
                       match=r"missing backbone key 'backbone\.layer2\.1\.conv2\.weight'"):
        load_weights(v1c(), path)
    # unexpected in the backbone, and an HRDA-style head key
    for extra in ("model.backbone.layer1.0.conv4.weight",
                  "model.decode_head.scale_attention.conv.weight"):
        ckpt, state = _uda_checkpoint({"model": src})
        state[extra] = torch.zeros(1)
        torch.save(ckpt, path)
        with pytest.raises(WeightsError, match=rf"key '{extra}' has no counterpart"):
            load_weights(v1c(), path)
    # the dlv2red file into the four-branch ASPP: says which head to build
    ckpt, _ = _uda_checkpoint({"model": src})
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"2 ASPP branches.*atrous_rates=\[6, 12\]"):
        load_weights(v1c(atrous_rates=[6, 12, 18, 24]), path)
    # another number of classes: head left initialised (auto), an error when required
    r = load_weights(v1c(num_classes=7), path)
    assert not r.head_loaded and "head of another shape" in \
        r.dropped["model.decode_head.aspp_modules.0.conv.weight"]
    with pytest.raises(WeightsError, match="head of another shape"):
        load_weights(v1c(num_classes=7), path, head="require")
    # member= on a file that is not mmseg's
    torch.save(_imagenet_file(src, SMALL), path)
    with pytest.raises(WeightsError, match="member='teacher' applies to mmseg"):
        load_weights(v1c(), path, member="teacher")


def test_hub_builder_is_their_deeplab_v2(tmp_path):
    """A released checkpoint at the real size (ResNet-101 V1c, 19 classes)."""
    src = randomize(v1c(R101, num_classes=19, width=64), seed=6)
    ckpt, state = _uda_checkpoint({"ema_model": src}, blocks=R101)
    state["model.decode_head.aspp_modules.0.conv.bias"] = torch.zeros(19)  # a student key
    path = tmp_path / "gta2cs_dlv2red.pth"
    torch.save(ckpt, path)
    model = deeplabv2.deeplabv2_resnet101_v1c(19, weights=path, member="teacher", head="require")
    assert model.config["stem"] == "v1c" and model.config["atrous_rates"] == [6, 12]
    assert model.config["contract_dilation"] is True and model.config["frozen_bn"] is False
    assert model.alignment.name == "pytorch" and model.preprocessing == MMSEG_RGB
    assert "loaded ema_model.*" in model.load_report.summary()
    assert torch.equal(model.backbone.layer3[22].bn3.running_var,
                       src.backbone.layer3[22].bn3.running_var)
    bare = deeplabv2.deeplabv2_resnet101_v1c(19)
    assert bare.config == model.config and bare.alignment.name == "pytorch"


def test_info_command_counts_their_network(capsys):
    """ResNet-101 without fc: 42,500,160 parameters (torchvision's 44,549,160 less the
    2,049,000 of fc); the deep stem (864 + 9,216 + 18,432 conv, 64 + 64 + 128 BN) instead of
    the 7x7 conv1 (9,408) and bn1 (128): +19,232; the dlv2red head: 2 x (2048 x 19 x 9 + 19) =
    700,454. All trainable (BN included). 512 -> 256 (stem) -> 128 (pool) -> 64 (layer2)."""
    from deeplabv2.cli import main
    assert main(["info", "--model", "resnet101_v1c", "--height", "512", "--width", "1024"]) == 0
    out = capsys.readouterr().out
    total = 42_500_160 + 19_232 + 700_454
    assert f"{total:,} total, {total:,} trainable" in out
    assert "(1, 19, 64, 128)" in out and "backbone layout torchvision, RGB input" in out


def test_the_training_loop_runs_their_network_from_the_mmcv_init_file(tmp_path):
    """model.stem=v1c with the ImageNet V1c file as model.weights: the backbone starts from the
    file, trains (BN included), and the run's model.pth records the architecture."""
    from deeplabv2.train import train
    blocks = (1, 1, 1, 1)
    init = randomize(v1c(blocks, num_classes=7), seed=8)
    path = tmp_path / "resnet_v1c.pth"
    torch.save(_imagenet_file(init, blocks), path)
    cfg = load_config(None, [
        "model.blocks=[1, 1, 1, 1]", "model.width=8", "model.stem=v1c", "model.bn=train",
        "model.atrous_rates=[6, 12]", "model.alignment=pytorch", f"model.weights={path}",
        "data.dataset=synthetic", "data.crop_size=[48, 64]", "data.batch_size=2",
        "data.num_workers=0", "data.options={num_samples: 8, size: [48, 64]}",
        "train.iterations=2", "train.lr=0.01", "train.tensorboard=false",
        "train.progress=false", "train.val_limit=2", "train.threads=1",
        f"train.out_dir={tmp_path / 'run'}"])
    result = train(cfg)
    assert result.model.load_report.layout == "mmcv_v1c"
    saved = load_model(tmp_path / "run" / "model.pth")
    assert saved.config["stem"] == "v1c" and saved.config["contract_dilation"] is True
    assert saved.layout == "torchvision" and saved.preprocessing == MMSEG_RGB
    assert saved.alignment.name == "pytorch"
    start, end = init.state_dict(), saved.state_dict()
    assert not torch.equal(start["backbone.stem.1.weight"], end["backbone.stem.1.weight"])
    assert not torch.equal(start["backbone.stem.1.running_mean"],
                           end["backbone.stem.1.running_mean"])


def test_mmseg_param_groups_follow_mmcv_custom_keys():
    """mmcv's DefaultOptimizerConstructor with custom_keys {'head': lr_mult 10}, written out:
    a parameter whose mmseg name contains 'head' gets 10x lr, every parameter weight decay
    0.01 (no bias/norm multipliers)."""
    model = v1c()
    groups = model.param_groups(6e-5, 0.01, style="mmseg")
    got = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(got)  # each parameter once
    params = dict(model.named_parameters())
    for name, p in params.items():
        mm_name = name.replace("head.convs.", "decode_head.aspp_modules.")
        lr = 6e-5 * (10.0 if "head" in mm_name else 1.0)
        assert got[id(p)] == pytest.approx((lr, 0.01)), name
    assert len(got) == len(params)  # bn=train: BN scale/shift included, with decay

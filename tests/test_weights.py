"""Strict weight loading: every layout round-trips, every bad file fails with a clear error.

The fixtures are state dicts generated here with the exact key names of the real files. The
tensors of a narrow ResNet-101 (width 8 instead of 64, same 3/4/23/3 blocks, so the same keys)
keep the files small; one test loads a DeepLab init file of the full ResNet-101 size.
"""

import pickle
import re
import subprocess
import sys

import pytest
import torch

import deeplabv2
from deeplabv2 import WeightsError, build_model, load_model, load_weights, save_weights
from deeplabv2.model.preprocessing import CAFFE_BGR, TORCHVISION_RGB

NARROW = {"backbone": "resnet", "blocks": [3, 4, 23, 3], "width": 8}
_HEAD_KEY = re.compile(r"^head\.convs\.(\d)\.(weight|bias)$")


def narrow(num_classes=19, **kw):
    return build_model({**NARROW, "num_classes": num_classes, **kw})


def randomized(model, seed=0):
    """Fill every tensor with distinct values so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            r = torch.rand(v.shape, generator=g)
            if v.ndim > 1:  # He-like scale keeps 101 layers finite
                v.copy_((r - 0.5) * (12.0 / v[0].numel()) ** 0.5)
            elif k.endswith(("running_var", "weight")):  # BN variance and scale
                v.copy_(0.5 + r)
            else:
                v.copy_((r - 0.5) * 0.2)
    return model


def caffe_keys(model, head_prefix="layer5"):
    """Our state dict under DeepLab init file names: ``Scale.layer3.7.conv2.weight`` ..."""
    out = {}
    for k, v in model.state_dict().items():
        m = _HEAD_KEY.match(k)
        if m:
            out[f"Scale.{head_prefix}.conv2d_list.{m[1]}.{m[2]}"] = v.clone()
        else:
            out["Scale." + k[len("backbone."):]] = v.clone()
    return out


def torchvision_keys(model):
    """Our backbone under torchvision ResNet names, with BN step counters and the fc layer."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            out[k[len("backbone."):]] = v.clone()
            if k.endswith("running_var"):
                out[k[len("backbone."):-len("running_var")] + "num_batches_tracked"] = \
                    torch.tensor(1000)
    out["fc.weight"] = torch.randn(1000, model.backbone.out_channels)
    out["fc.bias"] = torch.randn(1000)
    return out


def advent_keys(model):
    """An AdaptSegNet/ADVENT multi-level checkpoint: head ``layer6``, auxiliary ``layer5``."""
    out = {k[len("Scale."):]: v for k, v in caffe_keys(model, "layer6").items()}
    c = model.num_classes
    for i in range(4):
        out[f"layer5.conv2d_list.{i}.weight"] = torch.randn(c, model.backbone.out_channels // 2, 3, 3)
        out[f"layer5.conv2d_list.{i}.bias"] = torch.randn(c)
    return out


def assert_same_weights(a, b, head=True):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if head or not k.startswith("head."):
            assert torch.equal(sa[k], sb[k]), k


def test_deeplab_init_file_full_resnet101(tmp_path):
    """MS_DeepLab_resnet_pretrained_COCO_init.pth at the real size: 21-class head."""
    src = randomized(deeplabv2.deeplabv2_resnet101(num_classes=21))
    state = caffe_keys(src)
    assert "Scale.layer3.7.conv2.weight" in state and "Scale.bn1.running_mean" in state
    assert "Scale.layer5.conv2d_list.3.weight" in state
    path = tmp_path / "MS_DeepLab_resnet_pretrained_COCO_init.pth"
    torch.save(state, path)

    model = deeplabv2.deeplabv2_resnet101(num_classes=21, weights=path)
    assert_same_weights(model, src)
    report = model.load_report
    assert report.layout == "deeplab_caffe" and report.head_loaded
    assert len(report.loaded) == len(state) and not report.dropped
    assert model.preprocessing == CAFFE_BGR and model.layout == "caffe"

    # 19 classes: the 21-class head does not fit; it is dropped and said so, backbone loaded.
    model19 = deeplabv2.deeplabv2_resnet101(num_classes=19, weights=path)
    assert_same_weights(model19, src, head=False)
    r = model19.load_report
    assert not r.head_loaded and len(r.dropped) == 8
    assert all("head of another shape" in why for why in r.dropped.values())
    assert "head.convs.0.weight" in r.not_in_file
    assert len(r.loaded) + len(r.dropped) == len(state)
    with pytest.raises(WeightsError, match="head of another shape"):
        load_weights(deeplabv2.deeplabv2_resnet101(19), path, head="require")


def test_imagenet_init_file_drops_fc_and_keeps_head_initialised(tmp_path):
    src = randomized(narrow())
    state = {k: v for k, v in caffe_keys(src).items() if "layer5" not in k}
    state["Scale.fc.weight"] = torch.randn(1000, src.backbone.out_channels)
    state["Scale.fc.bias"] = torch.randn(1000)
    path = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(state, path)
    model = narrow()
    head_before = model.head.convs[2].weight.clone()
    report = load_weights(model, path)
    assert_same_weights(model, src, head=False)
    assert torch.equal(model.head.convs[2].weight, head_before)
    assert set(report.dropped) == {"Scale.fc.weight", "Scale.fc.bias"}
    assert "ImageNet classifier" in report.dropped["Scale.fc.weight"]
    assert len(report.not_in_file) == 8 and "dropped 2" in report.summary()


def test_torchvision_resnet_follows_its_layout_and_preprocessing(tmp_path):
    src = randomized(narrow())
    state = torchvision_keys(src)
    path = tmp_path / "resnet101-cd907fc2.pth"
    torch.save(state, path)
    model = narrow()
    report = load_weights(model, path)
    assert report.layout == "torchvision_resnet"
    assert_same_weights(model, src, head=False)
    assert model.layout == "torchvision" and model.preprocessing == TORCHVISION_RGB
    assert model.backbone.layer2[0].conv2.stride == (2, 2)
    assert model.backbone.layer2[0].conv1.stride == (1, 1)
    n_counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert len(report.dropped) == n_counters + 2
    # the other layout really computes something else: the stride moved
    x = torch.randn(1, 3, 66, 66) * 50  # same pooled size in both ceil modes
    src.eval(), model.eval()
    with torch.no_grad():
        assert not torch.allclose(src.backbone(x), model.backbone(x))


def test_timm_style_resnet50_into_resnet50(tmp_path):
    src = randomized(build_model({**NARROW, "blocks": [3, 4, 6, 3], "num_classes": 19}))
    path = tmp_path / "resnet50_a1_0-14fe96d1.pth"
    torch.save({k: v for k, v in torchvision_keys(src).items()
                if not k.endswith("num_batches_tracked")}, path)
    model = build_model({**NARROW, "blocks": [3, 4, 6, 3], "num_classes": 19})
    load_weights(model, path)
    assert_same_weights(model, src, head=False)


def test_advent_checkpoint_with_layer6_head(tmp_path):
    src = randomized(narrow())
    state = {"module." + k: v for k, v in advent_keys(src).items()}  # saved from DataParallel
    path = tmp_path / "GTA2Cityscapes_multi.pth"
    torch.save(state, path)
    model = narrow()
    report = load_weights(model, path, head="require")
    assert report.layout == "deeplab_pytorch" and report.head_loaded
    assert_same_weights(model, src)
    assert len(report.dropped) == 8
    assert all("auxiliary" in why for why in report.dropped.values())
    assert model.preprocessing == CAFFE_BGR


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_own_checkpoint_round_trip(tmp_path, suffix):
    src = randomized(narrow(num_classes=7))
    src.backbone.set_layout("torchvision")
    src.preprocessing = TORCHVISION_RGB
    path = tmp_path / f"model{suffix}"
    save_weights(src, path, classes=[f"c{i}" for i in range(7)])
    model = load_model(path)
    assert_same_weights(model, src)
    assert model.layout == "torchvision" and model.preprocessing == TORCHVISION_RGB
    assert model.config == src.config
    x = torch.randn(1, 3, 40, 40)
    src.eval()
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_same_weights_give_the_same_bytes(tmp_path, suffix):
    """A file's digest identifies its weights: the same contents saved under other names, and
    in another process, give the same bytes. torch.save used to store the random temporary
    name as the archive's root folder, and safetensors writes its metadata in the order of a
    hash map seeded per process."""
    src = randomized(narrow(num_classes=7))
    classes = [f"c{i}" for i in range(7)]
    a, b, c = tmp_path / f"a{suffix}", tmp_path / "sub" / f"b{suffix}", tmp_path / f"c{suffix}"
    save_weights(src, a, classes=classes)
    save_weights(src, b, classes=classes)
    subprocess.run([sys.executable, "-c", "import sys; from deeplabv2 import load_model, "
                    "save_weights; m = load_model(sys.argv[1]); "
                    "save_weights(m, sys.argv[2], classes=m.classes)", str(a), str(c)],
                   check=True, timeout=300)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert_same_weights(load_model(c), src)


def test_vgg16_torchvision_weights(tmp_path):
    src = randomized(deeplabv2.deeplabv2_vgg16(num_classes=21))
    state = {k[len("backbone."):]: v for k, v in src.state_dict().items()
             if k.startswith("backbone.")}
    assert "features.28.weight" in state and "features.0.bias" in state
    # The ImageNet classifier. fc6/fc7 have 1024 outputs here instead of 4096 to keep the file
    # at 100 MB (the decimation of the real 4096-wide layers: test_vgg_decimation_*).
    g = torch.Generator().manual_seed(5)
    state["classifier.0.weight"] = torch.randn(1024, 25088, generator=g)
    state["classifier.0.bias"] = torch.randn(1024, generator=g)
    state["classifier.3.weight"] = torch.randn(1024, 1024, generator=g)
    state["classifier.3.bias"] = torch.randn(1024, generator=g)
    state["classifier.6.weight"] = torch.randn(1000, 1024, generator=g)
    state["classifier.6.bias"] = torch.randn(1000, generator=g)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    model = deeplabv2.deeplabv2_vgg16(num_classes=21, weights=path)
    assert_same_weights(model, src, head=False)
    report = model.load_report
    assert len(report.dropped) == 2 and model.preprocessing == TORCHVISION_RGB  # fc8 only
    assert len(report.loaded) + len(report.dropped) == len(state)
    fc6 = state["classifier.0.weight"].reshape(1024, 512, 7, 7)[:, :, ::3, ::3]
    for branch in model.head.branches:  # every branch starts from the same decimated fc6/fc7
        assert torch.equal(branch.fc6.weight, fc6)
        assert torch.equal(branch.fc7.weight[:, :, 0, 0], state["classifier.3.weight"])
        assert torch.equal(branch.fc7.bias, state["classifier.3.bias"])
    assert not report.head_loaded  # fc8, the classifier proper, is new
    with pytest.raises(WeightsError, match="torchvision_vgg weights, but the model's backbone is resnet"):
        load_weights(narrow(), path)


def test_vgg_decimation_of_the_real_imagenet_fc6_fc7():
    from deeplabv2.weights import decimate_vgg_classifier
    g = torch.Generator().manual_seed(0)
    fc6_w, fc6_b = torch.randn(4096, 25088, generator=g), torch.randn(4096, generator=g)
    fc7_w, fc7_b = torch.randn(4096, 4096, generator=g), torch.randn(4096, generator=g)
    out = decimate_vgg_classifier(fc6_w, fc6_b, fc7_w, fc7_b)
    assert out["fc6.weight"].shape == (1024, 512, 3, 3)
    assert out["fc7.weight"].shape == (1024, 1024, 1, 1)
    # filter o' of DeepLab's fc6 is ImageNet filter 4 o'; tap (i, j) is tap (3 i, 3 j) of 7x7,
    # input channel c at flat index c * 49 + 7 * ky + kx (torchvision flattens (512, 7, 7))
    for o, c, i, j in [(0, 0, 0, 0), (1, 3, 1, 2), (255, 511, 2, 2), (1023, 100, 2, 0)]:
        assert out["fc6.weight"][o, c, i, j] == fc6_w[4 * o, c * 49 + 7 * 3 * i + 3 * j]
    assert torch.equal(out["fc6.bias"], fc6_b[::4])
    assert out["fc7.weight"][5, 7, 0, 0] == fc7_w[20, 28]
    assert torch.equal(out["fc7.bias"], fc7_b[::4])
    with pytest.raises(ValueError, match="expected VGG-16 fc6"):
        decimate_vgg_classifier(fc7_w, fc7_b, fc7_w, fc7_b)


def test_vgg_param_groups_fc6_fc7_like_the_backbone_fc8_like_a_classifier():
    model = deeplabv2.deeplabv2_vgg16(num_classes=21)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.param_groups(1e-3)}
    b = model.head.branches[2]
    assert id(b.fc6.weight) in groups["backbone"] and id(b.fc7.bias) in groups["backbone_bias"]
    assert id(b.fc8.weight) in groups["head"] and id(b.fc8.bias) in groups["head_bias"]
    assert isinstance(b.drop, torch.nn.Dropout)  # element-wise, as Caffe's
    x = torch.ones(1, 1024, 6, 6)
    b.train()
    torch.manual_seed(0)
    dropped = b.drop(x)
    assert 0 < (dropped[0, :, 0, 0] == 0).float().mean() < 1  # not whole channels
    assert not ((dropped == 0).all(-1).all(-1)).all()
    largefov = deeplabv2.deeplabv2_vgg16_largefov(num_classes=21)
    assert len(largefov.head.branches) == 1 and largefov.head.branches[0].fc6.dilation == (12, 12)


# -- bad files -----------------------------------------------------------------------------------
def test_missing_file():
    with pytest.raises(WeightsError, match="nothere.pth: no such weights file"):
        load_weights(narrow(), "nothere.pth")


def test_truncated_file_is_one_clear_line(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(caffe_keys(narrow()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.pth: truncated or corrupt") as e:
        load_weights(narrow(), path)
    assert "\n" not in str(e.value)
    st = tmp_path / "cut.safetensors"
    save_weights(narrow(), st)
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cut.safetensors: truncated or corrupt"):
        load_weights(narrow(), st)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Payload()}, f)
    torch.save({"conv1.weight": _Payload()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(WeightsError, match="evil2?.pth: ") as e:
            load_weights(narrow(), p)
        assert "\n" not in str(e.value)
    assert "this would run code" not in capsys.readouterr().out
    with pytest.raises(WeightsError, match="refused: the file holds pickled code"):
        load_weights(narrow(), tmp_path / "evil2.pth")


def test_weights_of_another_architecture(tmp_path):
    r50 = build_model({**NARROW, "blocks": [3, 4, 6, 3], "num_classes": 19})
    path = tmp_path / "resnet50.pth"
    torch.save(caffe_keys(r50), path)
    with pytest.raises(WeightsError, match=r"missing backbone key 'backbone\.layer3\.6\.conv1\.weight'"):
        load_weights(narrow(), path)
    wide = tmp_path / "wide.pth"
    torch.save(caffe_keys(build_model({**NARROW, "width": 16, "num_classes": 19})), wide)
    with pytest.raises(WeightsError, match=r"shape mismatch for 'Scale\.conv1\.weight'"):
        load_weights(narrow(), wide)


def test_unknown_key_is_named(tmp_path):
    state = caffe_keys(narrow())
    state["Scale.layer4.2.se.fc1.weight"] = torch.zeros(1)
    path = tmp_path / "se.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"key 'Scale\.layer4\.2\.se\.fc1\.weight' has no counterpart"):
        load_weights(narrow(), path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="list.pth: expected a state dict, found list"):
        load_weights(narrow(), path)
    path = tmp_path / "odd.pth"
    torch.save({"foo.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="odd.pth: unrecognised weights layout"):
        load_weights(narrow(), path)


def test_load_model_needs_our_checkpoint(tmp_path):
    path = tmp_path / "init.pth"
    torch.save(caffe_keys(narrow()), path)
    with pytest.raises(WeightsError, match="not a deeplabv2 checkpoint"):
        load_model(path)


def test_info_command(capsys):
    from deeplabv2.cli import main
    assert main(["info", "--model", "resnet101", "--height", "512", "--width", "1024"]) == 0
    out = capsys.readouterr().out
    assert "43,901,068 total, 43,795,724 trainable" in out
    assert "(1, 19, 65, 129)" in out and "output stride    8" in out
    gflops = float(re.search(r"([\d,.]+) GFLOPs", out)[1].replace(",", ""))
    assert 700 < gflops < 780  # about 368 GMACs per 512x1024 frame

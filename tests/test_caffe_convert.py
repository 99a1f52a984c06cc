"""``deeplabv2 convert FILE.caffemodel``: caffemodels written by an independent encoder
(``tests/caffe_encoder.py``) with the released nets' layer names, converted, and run against a
functional forward written here from the prototxts' definitions."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

import caffe_encoder as E
from deeplabv2.caffe import convert_caffemodel, read_caffemodel
from deeplabv2.cli import main
from deeplabv2.weights import WeightsError, load_model, read_file


# -- the functional forward of the Caffe nets ------------------------------------------------------
def caffe_pool(x, k=3, s=2, p=1):
    """Caffe's max pooling (pooling_layer.cpp): ``ceil((H + 2p - k) / s) + 1`` outputs, one
    fewer when the last window would start in the padding; padding never wins a max."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = math.ceil((size + 2 * p - k) / s) + 1
        if (out - 1) * s >= size + p:
            out -= 1
        extra = max(0, (out - 1) * s + k - (size + 2 * p))
        pads += [p, p + extra]
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), k, s)


def caffe_bn(x, blobs, scale, eps):
    mean, var, factor = blobs
    f = 0.0 if float(factor[0]) == 0 else 1.0 / float(factor[0])
    w, b = scale
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return (x - v(mean * f)) / torch.sqrt(v(var * f) + eps) * v(w) + v(b)


def resnet_forward(layers, x, eps=1e-5):
    """DeepLab v2 ResNet-101 as its prototxt defines it, from the Caffe blobs."""
    blobs = {name: b for name, _, b, _ in layers}
    geo = {name: g for name, _, _, g in layers}

    def conv(name, x):
        k, s, p, d, bias = geo[name]
        return F.conv2d(x, blobs[name][0], blobs[name][1] if bias else None, s, p, d)

    def conv_bn(sfx, x):
        return caffe_bn(conv("res" + sfx, x), blobs["bn" + sfx], blobs["scale" + sfx], eps)

    x = F.relu(caffe_bn(conv("conv1", x), blobs["bn_conv1"], blobs["scale_conv1"], eps))
    x = caffe_pool(x)
    blocks = [name[3:-len("_branch2a")] for name in blobs
              if name.startswith("res") and name.endswith("_branch2a")]
    for block in blocks:
        short = conv_bn(f"{block}_branch1", x) if f"res{block}_branch1" in blobs else x
        y = F.relu(conv_bn(f"{block}_branch2a", x))
        y = F.relu(conv_bn(f"{block}_branch2b", y))
        x = F.relu(conv_bn(f"{block}_branch2c", y) + short)
    heads = [name for name in blobs if name.startswith("fc1_")]
    return sum(conv(name, x) for name in heads)


def vgg_forward(layers, x):
    """DeepLab-LargeFOV / ASPP-L over VGG-16: pool1-3 3x3/2, pool4-5 3x3/1 (pad 1, Caffe's
    rounding), conv5 at dilation 2; fc6 -> ReLU -> fc7 -> ReLU -> fc8 per branch, summed."""
    blobs = {name: b for name, _, b, _ in layers}
    geo = {name: g for name, _, _, g in layers}

    def conv(name, x):
        k, s, p, d, _ = geo[name]
        return F.conv2d(x, blobs[name][0], blobs[name][1], s, p, d)

    for stage, n in enumerate((2, 2, 3, 3, 3), start=1):
        for i in range(1, n + 1):
            x = F.relu(conv(f"conv{stage}_{i}", x))
        x = caffe_pool(x, 3, 2 if stage <= 3 else 1, 1)
    out = 0
    for fc8 in [name for name in blobs if name.startswith("fc8")]:
        sfx = fc8[len("fc8_voc12"):]
        y = F.relu(conv("fc7" + sfx, F.relu(conv("fc6" + sfx, x))))
        out = out + conv(fc8, y)
    return out


def logits(model, x):
    """The converted model's stride-8 scores, in float64 (as the references below): what is
    compared is the function, not float32's summation order over 100 layers."""
    with torch.no_grad():
        return model.double().eval().logits(x.double())


def close(actual, expected):
    """Equal to 1e-5 (relative and absolute)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def ref(forward, layers, x, **kwargs):
    """``forward`` (:func:`resnet_forward`, :func:`vgg_forward`) in float64."""
    return forward([(n, t, [b.double() for b in blobs], g) for n, t, blobs, g in layers],
                   x.double(), **kwargs)


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(WeightsError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message, message
    return message


X = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(1)) * 50


# -- ResNet-101 --------------------------------------------------------------------------------
def test_resnet101_msc_voc_file_runs_as_the_caffe_net(tmp_path):
    """The VOC 2012 MSC file (train_iter_20000.caffemodel): real depth and names, the scaled
    branches' copies checked and dropped, the Caffe BN statistics divided by their count."""
    layers = E.resnet_layers(width=4)
    path = write(tmp_path, "train_iter_20000.caffemodel", E.encode(layers, msc=True))
    model, report, out = convert_caffemodel(path)
    assert out == tmp_path / "train_iter_20000.pth"
    close(logits(model, X), ref(resnet_forward, layers, X))
    n_blobs = sum(len(b) for _, _, b, _ in layers)
    n_bn = sum(t == "BatchNorm" for _, t, _, _ in layers)
    assert len(report.loaded) == n_blobs - n_bn
    reasons = list(report.dropped.values())
    assert reasons.count("BatchNorm scale factor (divided out)") == n_bn
    assert sum("MSC branch copy" in r for r in reasons) == 2 * n_blobs
    # the written checkpoint: rebuilt from its own metadata, the same function
    reloaded = load_model(out)
    close(logits(reloaded, X), ref(resnet_forward, layers, X))
    _, meta = read_file(out)
    assert meta["model_config"]["blocks"] == [3, 4, 23, 3]
    assert meta["model_config"]["atrous_rates"] == [6, 12, 18, 24]
    assert meta["classes"][:2] == ["background", "aeroplane"] and len(meta["classes"]) == 21
    assert meta["preprocessing"]["channel_order"] == "BGR" and meta["alignment"] == "caffe"
    assert meta["provenance"]["source"] == "train_iter_20000.caffemodel"
    assert meta["provenance"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # the real ResNet-101 (width 64): a 170 MB caffemodel
def test_real_size_resnet101_file_runs_as_the_caffe_net(tmp_path):
    layers = E.resnet_layers(width=64, seed=10)
    path = write(tmp_path, "train_iter_20000.caffemodel", E.encode(layers))
    model, report, _ = convert_caffemodel(path, tmp_path / "voc12.safetensors")
    assert model.config["width"] == 64 and len(report.loaded) == 528
    x = X[..., :17, :17]
    close(logits(model, x), ref(resnet_forward, layers, x))


def test_bn_eps_recorded_in_the_file_is_folded_into_the_variance(tmp_path):
    layers = E.resnet_layers(width=2, blocks=(1, 2, 2, 1), seed=3)
    path = write(tmp_path, "m.caffemodel", E.encode(layers, bn_eps=1e-3))
    model, _, _ = convert_caffemodel(path, tmp_path / "m.safetensors")
    expected = ref(resnet_forward, layers, X, eps=1e-3)
    close(logits(model, X), expected)
    with pytest.raises(AssertionError):  # the eps matters at this tolerance
        close(ref(resnet_forward, layers, X), expected)


def test_batchnorm_scale_factor_zero_gives_zero_statistics_as_caffe(tmp_path):
    layers = E.resnet_layers(width=2, blocks=(1, 1, 1, 1), seed=4)
    for name, _, blobs, _ in layers:
        if name == "bn_conv1":
            blobs[2].zero_()  # mean 0, variance 0: x / sqrt(eps), 316x
        if name == "scale_conv1":
            blobs[0].mul_(1e-2)  # keeps the logits near 1 (the tolerance is absolute too)
    model, _, _ = convert_caffemodel(write(tmp_path, "m.caffemodel", E.encode(layers)))
    assert torch.equal(model.backbone.bn1.running_mean, torch.zeros(2))
    close(logits(model, X), ref(resnet_forward, layers, X))


def test_imagenet_init_file_gives_a_backbone_only_checkpoint(tmp_path):
    """``fc1000`` (InnerProduct) of an ImageNet init is dropped; the checkpoint trains (loaded
    with head='auto' into a model of any class count) but does not evaluate."""
    from deeplabv2.model import build_model
    from deeplabv2.weights import load_weights
    layers = E.resnet_layers(width=2, blocks=(1, 2, 2, 1), head=None, seed=5)
    layers.append(("fc1000", "InnerProduct", [torch.randn(1000, 64), torch.randn(1000)], None))
    path = write(tmp_path, "init.caffemodel", E.encode(layers))
    model, report, out = convert_caffemodel(path)
    assert [r for k, r in report.dropped.items() if k.startswith("fc1000")] == \
        ["classifier of the pretraining task ('fc1000', InnerProduct (1000, 64)), not DeepLab "
         "v2's ASPP head"] * 2
    state, meta = read_file(out)
    assert meta["backbone_only"] and not any(k.startswith("head.") for k in state)
    assert "backbone-only" in one_line_error(load_model, out)
    student = build_model({**meta["model_config"], "num_classes": 19})
    load_weights(student, out)
    torch.testing.assert_close(student.backbone.state_dict()["layer3.1.conv2.weight"],
                               dict((n, b) for n, _, b, _ in layers)["res4b1_branch2b"][0])


def test_v1_layers_with_legacy_blob_shapes_convert_the_same(tmp_path):
    """The legacy ``layers`` field (V1LayerParameter, type enum) with num/channels/height/width
    blobs gives the same weights as the current encoding."""
    layers = E.resnet_layers(width=2, blocks=(1, 2, 2, 1), seed=6)
    current, _, _ = convert_caffemodel(write(tmp_path, "a.caffemodel", E.encode(layers)))
    v1 = write(tmp_path, "b.caffemodel", E.encode(layers, v1=True, legacy=True))
    assert {l.type for l in read_caffemodel(v1) if l.blobs} == {"Convolution", "ReLU"}
    legacy, _, _ = convert_caffemodel(v1)
    for (k, a), b in zip(current.state_dict().items(), legacy.state_dict().values()):
        assert torch.equal(a, b), k


def test_unpacked_and_double_blob_data_are_read():
    data = torch.tensor([[1.5, -2.0], [3.25, 0.0]])
    raw = E.net([E.layer("a", "Convolution", []) + E.ld(7, E.blob(data, unpacked=True)),
                 E.layer("b", "Convolution", []) + E.ld(7, E.blob(data, double=True))])
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.caffemodel"
        path.write_bytes(raw)
        layers = read_caffemodel(path)
    assert [l.name for l in layers] == ["a", "b"]
    assert all(torch.equal(l.blobs[0], data) for l in layers)


# -- VGG-16 ---------------------------------------------------------------------------------------
@pytest.mark.slow  # the real VGG-16 (35M parameters for ASPP-L): a few seconds
@pytest.mark.parametrize("largefov", [True, False], ids=["largefov", "aspp_l"])
def test_vgg16_files_run_as_the_caffe_net(tmp_path, largefov):
    rates = (12,) if largefov else (6, 12, 18, 24)
    layers = E.vgg_layers(rates, largefov=largefov, seed=7)
    path = write(tmp_path, "vgg.caffemodel", E.encode(layers))
    arch = "vgg16_largefov" if largefov else "vgg16"
    model, report, out = convert_caffemodel(path, arch=arch, prototxt=write(
        tmp_path, "train.prototxt", E.prototxt(layers).encode()))
    assert model.config["atrous_rates"] == list(rates)
    assert len(report.loaded) == sum(len(b) for _, _, b, _ in layers) and not report.dropped
    x = X[..., :25, :25]
    close(logits(model, x), ref(vgg_forward, layers, x))
    other = "vgg16" if largefov else "vgg16_largefov"
    assert "--arch" in one_line_error(convert_caffemodel, path, arch=other)


# -- refusals -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_resnet():
    layers = E.resnet_layers(width=4, seed=2)
    return layers, E.encode(layers)


def test_truncated_file_names_the_layer_and_blob(tmp_path, small_resnet):
    _, data = small_resnet
    at = data.index(b"res4b22_branch2c") + 200  # inside its weight blob (64 x 16 floats)
    path = write(tmp_path, "cut.caffemodel", data[:at])
    message = one_line_error(read_caffemodel, path)
    assert message.startswith(f"{path}: truncated at byte {at} inside layer "
                              "'res4b22_branch2c' blob 0"), message


def test_foreign_and_non_protobuf_files_are_refused_in_one_line(tmp_path):
    onnx_like = (E.vint(1, 8) + E.ld(2, b"pytorch") + E.ld(3, b"2.5")
                 + E.ld(7, E.ld(1, E.ld(1, b"x") + E.ld(2, b"y"))))
    message = one_line_error(read_caffemodel, write(tmp_path, "model.onnx", onnx_like))
    assert "not a Caffe .caffemodel" in message and "model.onnx" in message
    deploy = E.net([E.layer("conv1", "Convolution"), E.layer("relu", "ReLU")])
    assert "none with weights" in one_line_error(
        read_caffemodel, write(tmp_path, "deploy.bin", deploy))
    text = E.prototxt(E.resnet_layers(width=2, blocks=(1, 1, 1, 1))).encode()
    assert "deploy.prototxt" in one_line_error(
        read_caffemodel, write(tmp_path, "deploy.prototxt", text))
    assert "empty" in one_line_error(read_caffemodel, write(tmp_path, "e.caffemodel", b""))
    assert "no such" in one_line_error(read_caffemodel, tmp_path / "none.caffemodel")


def test_a_real_onnx_model_is_refused(tmp_path):
    from extras import require
    require("onnx", "an ONNX model to refuse (pip install onnx)")
    conv = torch.nn.Conv2d(3, 2, 1)
    path = tmp_path / "m.onnx"
    try:
        torch.onnx.export(conv, torch.zeros(1, 3, 4, 4), str(path), dynamo=False)
    except Exception as e:  # an exporter that needs more than this torch has
        pytest.skip(f"torch.onnx.export failed: {e}")
    assert "not a" in one_line_error(read_caffemodel, path)


def test_shape_mismatch_and_missing_layer_are_named(tmp_path):
    layers = E.resnet_layers(width=4, seed=8)
    bad = [(n, t, [b[0][:, :, :1, :1]] if n == "res3b2_branch2b" else b, g)
           for n, t, b, g in layers]
    message = one_line_error(convert_caffemodel,
                             write(tmp_path, "a.caffemodel", E.encode(bad)))
    assert "layer 'res3b2_branch2b' blob 0: file (8, 8, 1, 1), model (8, 8, 3, 3)" in message
    missing = [entry for entry in layers if entry[0] != "res4b7_branch2a"]
    message = one_line_error(convert_caffemodel,
                             write(tmp_path, "b.caffemodel", E.encode(missing)))
    assert "missing layer 'res4b7_branch2a'" in message
    assert "--num-classes says 19" in one_line_error(
        convert_caffemodel, write(tmp_path, "c.caffemodel", E.encode(layers)), num_classes=19)


def test_msc_copy_that_differs_from_its_original_is_refused(tmp_path):
    layers = E.resnet_layers(width=2, blocks=(1, 1, 1, 1), seed=9)
    data = E.encode(layers, msc=True)
    blob = layers[0][2][0]  # conv1's weight, written three times: change the last copy
    old = blob.numpy().tobytes()
    at = data.rindex(old)
    data = data[:at] + struct.pack("<f", 7.0) + data[at + 4:]
    message = one_line_error(convert_caffemodel, write(tmp_path, "m.caffemodel", data))
    assert "'conv1_res05' differs from 'conv1'" in message


def test_prototxt_check_reports_each_disagreement(tmp_path, small_resnet, capsys):
    layers, data = small_resnet
    path = write(tmp_path, "m.caffemodel", data)
    good = write(tmp_path, "good.prototxt", E.prototxt(layers).encode())
    assert main(["convert", str(path), "-o", str(tmp_path / "m.pth"), "--prototxt",
                 str(good)]) == 0
    renamed = E.prototxt(layers).replace('"res4b7_branch2a"', '"res4b7_branch2x"')
    renamed = renamed.replace("kernel_size: 3 pad: 6 stride: 1 dilation: 6",
                              "kernel_size: 3 pad: 6 stride: 1 dilation: 3")
    renamed += ('layer { name: "pool5a" type: "Pooling" '
                'pooling_param { pool: AVE kernel_size: 3 } }\n')
    bad = write(tmp_path, "bad.prototxt", renamed.encode())
    capsys.readouterr()
    assert main(["convert", str(path), "-o", str(tmp_path / "n.pth"), "--prototxt",
                 str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "  layer 'res4b7_branch2a' of the caffemodel is not in the prototxt" in err
    assert "  layer 'res4b7_branch2x' (Convolution) of the prototxt has no weights in the " \
           "caffemodel" in err
    assert "  layer 'fc1_voc12_c0': dilation 3 in Caffe, 6 in the model (head.convs.0)" in err
    assert "  layer 'pool5a': AVE pooling, which the model does not have (its pools are max " \
           "pools)" in err
    assert err[-1].startswith(f"deeplabv2 convert: error: {bad}: 4 disagreement(s)")
    assert not (tmp_path / "n.pth").exists()


# -- end to end -----------------------------------------------------------------------------------
def test_convert_then_evaluate_on_a_voc_tree(tmp_path, small_resnet, capsys):
    from test_datasets import voc_tree
    _, data = small_resnet
    path = write(tmp_path, "train_iter_20000.caffemodel", data)
    out = tmp_path / "voc12.safetensors"
    assert main(["convert", str(path), "-o", str(out), "--num-classes", "21"]) == 0
    printed = capsys.readouterr().out
    assert "layout caffemodel" in printed and f"wrote {out}" in printed
    _, meta = read_file(out)
    assert meta["provenance"] == {"source": path.name, "sha256": hashlib.sha256(data).hexdigest(),
                                  "converter": "deeplabv2 convert", "arch": "resnet"}
    root = voc_tree(tmp_path / "data") / "VOCdevkit/VOC2012"
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", str(out), "-c", "voc12_aug", f"data.root={root}",
                 "train.device=cpu", "data.num_workers=0", "--out", str(metrics)]) == 0
    miou = json.loads(metrics.read_text())["miou"]
    assert math.isfinite(miou) and 0 <= miou <= 1

"""OpenVINO runtime (FP32 parity with PyTorch within 1e-4, the IR cached beside the checkpoint)
and INT8 quantization (NNCF): skipped when the optional extra 'openvino' is not installed, failed
under ``DEEPLABV2_REQUIRE_EXTRAS=1`` (``make test``; see ``tests/extras.py``)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from deeplabv2.cli import main
from deeplabv2.config import load_config, save_config
from deeplabv2.data import build_dataset
from deeplabv2.weights import load_model, save_weights
from test_export import nontrivial_model
from extras import require
from file_size_limit import refused, run_python

ov = require("openvino", "OpenVINO not installed (extra 'openvino')")
from deeplabv2.deploy.openvino_runtime import (OpenVINOModel, artefact_dir,  # noqa: E402
                                               load_openvino)

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 7}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    m = nontrivial_model(TINY)  # non-trivial BN, so that the folding is checked too
    path = tmp_path_factory.mktemp("deploy") / "model.pth"
    save_weights(m, path)
    return path


def _close(a, b, rtol):
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


def test_openvino_fp32_matches_pytorch_and_caches_the_ir(checkpoint):
    model = load_model(checkpoint).eval()
    net = load_openvino(model, checkpoint, "fp32", threads=1)
    xml = artefact_dir(checkpoint) / "fp32.xml"
    assert xml.is_file() and json.loads(xml.with_suffix(".json").read_text())["checkpoint_sha256"]
    with torch.no_grad():
        for shape in ((1, 3, 64, 96), (2, 3, 45, 77)):  # two sizes, one not a multiple of 8
            x = torch.randn(*shape)
            ref = model(x)
            out = net(x)
            assert out.shape == ref.shape and out.dtype == torch.float32
            assert _close(out, ref, 1e-4)
            assert _close(net(x, upsample=False), model.logits(x), 1e-4)
    assert len(net._compiled) == 2  # compiled at each size it ran
    stamp = xml.stat().st_mtime_ns
    load_openvino(model, checkpoint, "fp32")
    assert xml.stat().st_mtime_ns == stamp  # reused, not converted again
    bf16 = load_openvino(model, checkpoint, "bf16", threads=1)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert _close(bf16(x), model(x), 5e-2)


def test_the_ir_follows_the_checkpoint(tmp_path, checkpoint):
    path = tmp_path / "model.pth"
    path.write_bytes(checkpoint.read_bytes())
    model = load_model(path).eval()
    load_openvino(model, path, "fp32")
    with torch.no_grad():  # a new version of the checkpoint: the IR is converted again
        model.head.convs[0].bias.add_(1.0)
    save_weights(model, path)
    net = load_openvino(model, path, "fp32")
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        assert _close(net(x), model(x), 1e-4)


IR_WRITE = """
import sys
from pathlib import Path
from deeplabv2.deploy.openvino_runtime import fp32_ir
from deeplabv2.weights import load_model
checkpoint = Path(sys.argv[1])
model = load_model(checkpoint).eval()
limit_file_size(1000)
try:
    fp32_ir(model, checkpoint)
    print("written")
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_an_ir_that_does_not_fit_is_one_line_and_leaves_nothing(tmp_path, checkpoint):
    """OpenVINO says only "basic_ios::clear: iostream error" when a write fails; the IR's
    temporary .xml/.bin were left behind. Now: the one-line error naming fp32.xml and the free
    space, nothing left (the save_ir that quantize writes int8.xml with too)."""
    copy = tmp_path / "model.pth"
    copy.write_bytes(checkpoint.read_bytes())
    code, out, err = run_python(IR_WRITE, copy, timeout=300)  # a process of its own: the limit
    assert code == 0, err[-3000:]
    line = out.strip().splitlines()[-1]
    assert re.fullmatch("WriteError: " + refused(artefact_dir(copy) / "fp32.xml", "1000 bytes"),
                        line), line
    assert not [p for p in artefact_dir(copy).rglob("*") if p.is_file()]


def test_int8_needs_a_quantized_model(tmp_path, checkpoint):
    path = tmp_path / "model.pth"
    path.write_bytes(checkpoint.read_bytes())
    with pytest.raises(FileNotFoundError, match="deeplabv2 quantize"):
        load_openvino(load_model(path), path, "int8")


def _checkpoint_and_tiny_config(tmp_path, checkpoint):
    """A copy of ``checkpoint`` (its artefacts land beside it in ``tmp_path``) and a config
    whose training set is six 48x64 synthetic scenes, for ``quantize``."""
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(checkpoint.read_bytes())
    cfg_path = tmp_path / "tiny.yaml"
    save_config(load_config(None, ["model.blocks=[1, 1, 1, 1]", "model.width=8",
                                   "data.dataset=synthetic", "data.crop_size=[48, 64]",
                                   "data.options={num_samples: 6, size: [48, 64]}",
                                   "data.num_workers=0"]), cfg_path)
    return ckpt, cfg_path


def test_quantize_then_evaluate_and_predict_int8(tmp_path, checkpoint, capsys):
    require("nncf", "NNCF not installed (extra 'openvino')")
    ckpt, cfg_path = _checkpoint_and_tiny_config(tmp_path, checkpoint)
    assert main(["quantize", str(ckpt), "-c", str(cfg_path), "--samples", "8"]) == 0
    xml = artefact_dir(ckpt) / "int8.xml"
    info = json.loads(xml.with_suffix(".json").read_text())
    assert info["samples"] == 8 and "per output channel" in info["weights"]
    assert 0 <= info["label_change_measured"] <= 0.05 and info["check_samples"] == 50
    assert info["checked_as"] == "int8-f32"  # the suite pins auto to fp32: bf16 does not pay
    assert "check crops' scores" in capsys.readouterr().out
    # the IR holds quantized weights: int8 constants
    ir = ov.Core().read_model(str(xml))
    types = {op.get_output_element_type(0).get_type_name()
             for op in ir.get_ops() if op.get_type_name() == "Constant"}
    assert "i8" in types
    # the ASPP as 36 taps: its 35 shifted sums and layer4's residual sum take FP32 inputs,
    # the other residual sums INT8 ones (FakeQuantize)
    assert info["bias_correction"] == "full" and info["aspp_input_equalized"] is True
    assert info["ranges"] == "minmax" and info["aspp_as_taps"] is True
    sums = info["sums_in_fp32"]
    assert len(sums) == 36 and sum(".head/" in n for n in sums) == 35
    fed = {op.get_friendly_name(): {i.get_source_output().get_node().get_type_name()
                                    for i in op.inputs()}
           for op in ir.get_ops() if op.get_type_name() == "Add"}
    assert all("FakeQuantize" not in fed[n] for n in sums)
    assert all("FakeQuantize" in v for n, v in fed.items() if n.endswith("layer3.0/aten::add"))
    model = load_model(ckpt).eval()
    int8 = load_openvino(model, ckpt, "int8", threads=1)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref, out = model(x), int8(x)
    assert out.shape == ref.shape and _close(out, ref, 0.5)  # quantized, but the same function
    assert int8.precision == "int8-f32"
    # where bf16 pays, INT8's floating-point operations run in bf16: the same function still
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPLABV2_AUTO_PRECISION", "bf16")
        int8_bf16 = load_openvino(model, ckpt, "int8", threads=1)
    assert int8_bf16.precision == "int8-bf16"
    assert int8_bf16.compiled(tuple(x.shape)) is not None
    with torch.no_grad():
        assert _close(int8_bf16(x), ref, 0.5)
    with pytest.raises(ValueError, match="int8, fp32, bf16, int8-f32, int8-bf16"):
        OpenVINOModel(ir, model, precision="fp16")
    assert main(["evaluate", str(ckpt), "-c", str(cfg_path), "--precision", "int8",
                 "--limit", "2"]) == 0
    assert "int8" in capsys.readouterr().out
    images = tmp_path / "images"
    images.mkdir()
    ds = build_dataset("synthetic", None, "val", num_samples=2, size=[48, 64])
    for i in range(len(ds)):
        Image.fromarray(ds.load(i)[0]).save(images / f"{i}.png")
    assert main(["predict", str(ckpt), str(images), "-o", str(tmp_path / "pred"),
                 "--precision", "int8"]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) >= 2
    # an INT8 model from before quantize measured its result still runs, with a warning
    del info["label_change_measured"]
    xml.with_suffix(".json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="accuracy is unchecked"):
        load_openvino(model, ckpt, "int8", threads=1)


def test_the_sums_left_in_fp32_on_resnet101_and_vgg16():
    """The names NNCF is told to leave alone are found on the real networks: ResNet-101's
    three layer4 residual sums and three ASPP sums, VGG-16's three branch sums."""
    from deeplabv2.deploy.openvino_runtime import convert
    from deeplabv2.deploy.quantize import fp32_sums
    from deeplabv2.hub import deeplabv2_resnet101, deeplabv2_vgg16
    r101 = deeplabv2_resnet101(19).eval()
    names = fp32_sums(convert(r101, example_size=(65, 65)), r101)
    assert len(names) == 6 and sum(".layer4." in n for n in names) == 3
    vgg = deeplabv2_vgg16(21).eval()
    assert len(fp32_sums(convert(vgg, example_size=(65, 65)), vgg)) == 3


def test_the_int8_graph_of_resnet101_has_its_aspp_as_taps():
    """What ``quantize`` converts: ResNet-101 with its ASPP as one 1x1 convolution of 36 taps
    and 35 shifted sums (left in floating point with layer4's three), one graph that gives the
    network's scores at every input size."""
    from deeplabv2.deploy.openvino_runtime import convert
    from deeplabv2.deploy.quantize import fp32_sums, with_taps_head
    from deeplabv2.deploy.fast import fold_batchnorm
    from deeplabv2.hub import deeplabv2_resnet101
    torch.manual_seed(0)
    r101 = deeplabv2_resnet101(19).eval()
    with torch.no_grad():
        for conv in r101.head.convs:
            conv.bias.normal_(0, 1)
    net = with_taps_head(fold_batchnorm(r101).eval())
    ir = convert(net, example_size=(65, 65))
    names = fp32_sums(ir, net)
    assert len(names) == 38 and sum(".layer4." in n for n in names) == 3
    compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for h, w in ((65, 65), (41, 97), (161, 129)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            ref = r101.logits(x)
        out = torch.from_numpy(compiled(x.numpy())[0])
        assert out.shape == ref.shape and _close(out, ref, 1e-5), (h, w)


def test_quantize_with_a_bound_on_the_changed_labels(tmp_path, checkpoint, capsys):
    """--max-label-change 0: NNCF's accuracy control returns operations to floating point until
    no stride-8 score of the check crops changes class; the sidecar says what it did."""
    require("nncf", "NNCF not installed (extra 'openvino')")
    ckpt, cfg_path = _checkpoint_and_tiny_config(tmp_path, checkpoint)
    assert main(["quantize", str(ckpt), "-c", str(cfg_path), "--samples", "6",
                 "--max-label-change", "0", "--check-samples", "4",
                 "--bias-correction", "fast"]) == 0
    info = json.loads((artefact_dir(ckpt) / "int8.json").read_text())
    assert info["max_label_change"] == 0 and info["check_samples"] == 4
    assert info["bias_correction"] == "fast" and len(info["sums_in_fp32"]) == 36
    assert info["label_change_measured"] == 0
    assert 0 <= info["operations_in_fp32"] <= 21  # the tiny network's convolutions
    assert "kept in floating point" in capsys.readouterr().out
    assert main(["quantize", str(ckpt), "-c", str(cfg_path), "--max-label-change", "1.5"]) == 2
    assert "max_label_change is a fraction" in capsys.readouterr().err


def test_quantize_refuses_an_int8_model_that_changes_too_many_classes(tmp_path, checkpoint,
                                                                     capsys, monkeypatch):
    """A broken INT8 model (here: one whose measured agreement with FP32 is forced to 40%) is
    refused with the measured share and the file in the message, and nothing is written."""
    require("nncf", "NNCF not installed (extra 'openvino')")
    from deeplabv2.deploy import quantize as q
    ckpt, cfg_path = _checkpoint_and_tiny_config(tmp_path, checkpoint)
    real = q._agreement
    calls = []

    def agreement(compiled, data, expected):
        calls.append(1)
        value, per = real(compiled, data, expected)
        return 0.4, per

    monkeypatch.setattr(q, "_agreement", agreement)
    assert main(["quantize", str(ckpt), "-c", str(cfg_path), "--samples", "4",
                 "--check-samples", "3"]) == 2
    err = capsys.readouterr().err
    assert "60.00%" in err and str(ckpt) in err and "nothing written" in err and calls
    assert "--ranges median" in err
    assert not (artefact_dir(ckpt) / "int8.xml").exists()
    # a higher bound keeps it, and says what it measured
    assert main(["quantize", str(ckpt), "-c", str(cfg_path), "--samples", "4",
                 "--check-samples", "3", "--refuse-above", "0.7", "--ranges", "median"]) == 0
    info = json.loads((artefact_dir(ckpt) / "int8.json").read_text())
    assert info["label_change_measured"] == 0.6 and info["check_samples"] == 3
    assert info["ranges"] == "median" and "median" in info["activations"]
    assert main(["quantize", str(ckpt), "-c", str(cfg_path), "--refuse-above", "2"]) == 2
    assert "refuse_above is a fraction" in capsys.readouterr().err


def test_runtime_openvino_on_the_command_line(tmp_path, checkpoint):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(checkpoint.read_bytes())
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)) \
        .save(images / "a.png")
    for runtime in ("torch", "openvino"):
        assert main(["predict", str(ckpt), str(images), "-o", str(tmp_path / runtime),
                     "--runtime", runtime, "--precision", "fp32", "--probs"]) == 0
    a, b = (np.load(next((tmp_path / r).glob("*.npy"))) for r in ("torch", "openvino"))
    assert np.abs(a.astype(np.float32) - b).max() < 1e-3  # probabilities saved as float16
    assert main(["predict", str(ckpt), str(images), "-o", str(tmp_path / "x"), "--runtime",
                 "openvino", "--eager"]) == 2

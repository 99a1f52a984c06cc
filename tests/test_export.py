"""ONNX and TorchScript exports reproduce the PyTorch logits, at more than one input size."""

import warnings

import pytest
import torch

from deeplabv2.deploy.export import export_onnx, export_torchscript
from deeplabv2.model import FrozenBatchNorm2d, build_model
from extras import require

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 5}
SIZES = [(64, 96), (45, 77)]  # the second is not the traced size and not a multiple of 8


def nontrivial_model(config: dict):
    """An eval-mode model of ``config`` with non-trivial frozen BN and head weights (seed 0),
    so that BN folding and the head are really checked by a comparison."""
    torch.manual_seed(0)
    m = build_model(config).eval()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, FrozenBatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
        for conv in m.head.convs:
            conv.weight.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def model():
    return nontrivial_model(TINY)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


def test_onnxruntime_reproduces_the_logits_at_two_sizes(model, tmp_path):
    ort = require("onnxruntime", "onnxruntime not installed (extra 'export')")
    path = export_onnx(model, tmp_path / "tiny.onnx", height=64, width=96)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for height, width in SIZES:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            ref = model(x)
        (out,) = session.run(["logits"], {"image": x.numpy()})
        assert out.shape == (2, 5, height, width)
        assert _close(torch.from_numpy(out), ref)


def test_torchscript_reproduces_the_logits_at_two_sizes(model, tmp_path):
    path = export_torchscript(model, tmp_path / "tiny.pt", height=64, width=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.load(str(path))
    names = {m.original_name for m in traced.modules()}
    assert "Conv2d" in names and "FrozenBatchNorm2d" not in names  # folded
    for height, width in SIZES:
        x = torch.randn(1, 3, height, width)
        with torch.no_grad():
            ref, out = model(x), traced(x)
        assert out.shape == (1, 5, height, width)
        assert _close(out, ref)


def test_export_subcommand_writes_both_files(model, tmp_path):
    import argparse

    from deeplabv2.deploy.bench import register
    from deeplabv2.weights import save_weights
    require("onnx", "onnx not installed (extra 'export')")
    checkpoint = tmp_path / "tiny.pth"
    save_weights(model, checkpoint)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"),
                              "--torchscript", str(tmp_path / "m.pt"), "--height", "40",
                              "--width", "56"])
    assert args.func(args) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0 and (tmp_path / "m.pt").stat().st_size > 0
    # each export carries a sha256sum-format digest of itself, and no temporary file is left
    for name in ("m.onnx", "m.pt"):
        import hashlib
        digest, listed = (tmp_path / f"{name}.sha256").read_text().split()
        assert listed == name
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*.tmp"))


# -- HRDA: exported at its traced size only ----------------------------------------------------
@pytest.fixture(scope="module")
def hrda_model():
    from deeplabv2.model.hrda import HRDA
    torch.manual_seed(1)
    net = build_model({**TINY, "atrous_rates": [6, 12], "bn": "train"})
    model = HRDA(net, detail_crop=64)  # 6 detail windows on 80x112: a small unrolled graph
    with torch.no_grad():
        for p in model.scale_attention.parameters():
            p.normal_(0, 0.1)
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_hrda_exports_at_one_size_not_a_multiple_of_16_and_refuses_others(hrda_model, tmp_path):
    ort = require("onnxruntime", "onnxruntime not installed (extra 'export')")
    x = torch.randn(2, 3, 75, 100)  # padded to 80x112 inside, as the PyTorch model does
    with torch.no_grad():
        ref = hrda_model(x)
    assert ref.shape == (2, 5, 75, 100)
    session = ort.InferenceSession(str(export_onnx(hrda_model, tmp_path / "h.onnx", 75, 100)),
                                   providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[1:] == [3, 75, 100] and isinstance(shape[0], str)  # batch dynamic only
    (out,) = session.run(["logits"], {"image": x.numpy()})
    assert _close(torch.from_numpy(out), ref)
    with pytest.raises(Exception, match="[Ii]nvalid dimensions"):
        session.run(["logits"], {"image": torch.randn(1, 3, 48, 64).numpy()})

    path = export_torchscript(hrda_model, tmp_path / "h.pt", height=75, width=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.load(str(path))
    with torch.no_grad():
        assert _close(traced(x), ref)
        with pytest.raises(Exception, match="runs at 75x100 only"):
            traced(torch.randn(1, 3, 48, 64))

"""The softmax-averaging ensemble (FDA-MBT) and `evaluate/predict --ensemble`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deeplabv2 import build_model, save_weights
from deeplabv2.cli import main
from deeplabv2.config import load_config, save_config
from deeplabv2.data import SyntheticDataset, build_dataset
from deeplabv2.inference.ensemble import Ensemble
from deeplabv2.evaluation.evaluate import evaluate
from deeplabv2.inference.front import InferenceConfig
from deeplabv2.evaluation.metrics import ConfusionMatrix
from deeplabv2.model.preprocessing import Preprocessing

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 7}


def _member(seed: int):
    torch.manual_seed(seed)
    m = build_model(TINY).eval()
    with torch.no_grad():
        for conv in m.head.convs:
            conv.weight.normal_(0, 0.2)   # distinct, confident members
    return m


def test_output_is_the_log_of_the_averaged_softmax():
    members = [_member(s) for s in (0, 1, 2)]
    x = torch.randn(2, 3, 41, 57)
    with torch.no_grad():
        expected = sum(F.softmax(m(x), 1) for m in members) / 3
        out = Ensemble(members)(x)
        stride8 = Ensemble(members)(x, upsample=False)
        expected8 = sum(F.softmax(m(x, upsample=False), 1) for m in members) / 3
    assert out.shape == (2, 7, 41, 57)
    torch.testing.assert_close(F.softmax(out, 1), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stride8.exp(), expected8, rtol=1e-5, atol=1e-6)
    # not a member's answer: the members disagree somewhere and the average is its own
    labels = [m(x).argmax(1) for m in members]
    assert any((a != b).any() for a in labels for b in labels)
    # one member: its own probabilities
    with torch.no_grad():
        torch.testing.assert_close(F.softmax(Ensemble(members[:1])(x), 1),
                                   F.softmax(members[0](x), 1), rtol=1e-5, atol=1e-6)


def test_evaluate_of_the_ensemble_counts_the_argmax_of_the_average():
    members = [_member(s) for s in (3, 4)]
    ds = build_dataset("synthetic", None, "val", num_samples=3, size=[48, 64])
    inference = InferenceConfig(avg_scales=(1.0, 0.75), flip=True)
    got = evaluate(Ensemble(members), ds, inference=inference)
    cm = ConfusionMatrix(7)
    with torch.no_grad():
        for i in range(len(ds)):
            image, label = ds.load(i)
            x = members[0].preprocess(torch.from_numpy(image)[None])
            # every member's own test-time passes' mean is not what the ensemble computes;
            # the ensemble is one network under the passes: average the members in each pass
            total = 0
            for scale in (1.0, 0.75):
                xs = members[0].alignment.rescale(x, scale)
                for flip in (False, True):
                    xi = xs.flip(-1) if flip else xs
                    p = sum(F.softmax(m(xi), 1) for m in members) / 2
                    p = p.flip(-1) if flip else p
                    total = total + members[0].alignment.resize(p, tuple(x.shape[-2:]))
            cm.update(total.argmax(1), torch.from_numpy(label.astype(np.int64))[None])
    assert got["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-9)


def test_members_that_do_not_agree_are_refused_by_name():
    a = _member(0)
    other_classes = build_model({**TINY, "num_classes": 5}).eval()
    with pytest.raises(ValueError, match="b.pth has 5 classes, a.pth has 7"):
        Ensemble([a, other_classes], names=["a.pth", "b.pth"])
    other_input = _member(1)
    other_input.preprocessing = Preprocessing.from_dict(
        {**a.preprocessing.to_dict(), "mean": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match="c.pth expects other preprocessing"):
        Ensemble([a, other_input], names=["a.pth", "c.pth"])
    from deeplabv2.model import get_alignment
    other_align = _member(2)
    other_align.alignment = get_alignment("pytorch" if a.alignment.name == "caffe" else "caffe")
    with pytest.raises(ValueError, match="d.pth uses the"):
        Ensemble([a, other_align], names=["a.pth", "d.pth"])
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


def test_evaluate_and_predict_commands_take_ensemble(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    save_config(load_config("demo", ["data.options={num_samples: 3, size: [48, 64]}",
                                     "data.num_workers=0"]), cfg)
    paths = []
    for seed in (5, 6, 7):
        paths.append(tmp_path / f"m{seed}.pth")
        save_weights(_member(seed), paths[-1], classes=SyntheticDataset.classes,
                     palette=SyntheticDataset.palette)
    out = tmp_path / "ens.json"
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble", str(paths[1]),
                 str(paths[2]), "--out", str(out)]) == 0
    assert "ensemble with" in capsys.readouterr().out
    ds = build_dataset("synthetic", None, "val", num_samples=3, size=[48, 64])
    from deeplabv2.deploy.fast import optimize_for_inference
    from deeplabv2.weights import load_model
    direct = evaluate(Ensemble([optimize_for_inference(load_model(p)) for p in paths]), ds)
    assert json.loads(out.read_text())["miou"] == pytest.approx(direct["miou"], abs=1e-9)

    image = tmp_path / "in.png"
    Image.fromarray(ds.load(0)[0]).save(image)
    assert main(["predict", str(paths[0]), str(image), "-o", str(tmp_path / "p"),
                 "--precision", "fp32", "--ensemble", *map(str, paths[1:])]) == 0
    assert (tmp_path / "p" / "in.png").is_file()

    wrong = tmp_path / "wrong.pth"
    save_weights(build_model({**TINY, "num_classes": 5}), wrong)
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble", str(wrong)]) == 2
    assert "wrong.pth has 5 classes" in capsys.readouterr().err
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble", str(paths[1]),
                 "--runtime", "openvino"]) == 2
    assert "--ensemble runs on the PyTorch runtime" in capsys.readouterr().err

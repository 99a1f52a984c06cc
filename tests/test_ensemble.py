"""The softmax-averaging ensemble (FDA-MBT), the logit-summing one (ADVENT's AdvEnt+MinEnt)
and `evaluate/predict --ensemble`."""

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


def test_logits_fusion_is_advents_weighted_sum_of_upsampled_scores():
    """eval_UDA.py eval_single: output = sum_i MODEL_WEIGHT[i] * interp(model_i(image)[1]),
    no softmax, argmax; advent+minent_pretrained.yml: weights 0.5, 0.5."""
    members = [_member(s) for s in (0, 1)]
    x = torch.randn(2, 3, 41, 57)
    with torch.no_grad():
        logits = [m(x) for m in members]
        out = Ensemble(members, fuse="logits", weights=[0.5, 0.5])(x)
        default = Ensemble(members, fuse="logits")(x)  # equal: 1 / n each
        skew = Ensemble(members, fuse="logits", weights=[0.8, 0.3])(x)
        eight = Ensemble(members, fuse="logits")(x, upsample=False)
        probs = Ensemble(members)(x)
    torch.testing.assert_close(out, 0.5 * logits[0] + 0.5 * logits[1])
    torch.testing.assert_close(default, out)
    torch.testing.assert_close(skew, 0.8 * logits[0] + 0.3 * logits[1])
    torch.testing.assert_close(eight, sum(0.5 * m(x, upsample=False) for m in members))
    # the label-size upsampling: summing before or after the (linear) resize is the same
    big = (97, 131)
    torch.testing.assert_close(
        F.interpolate(out, big, mode="bilinear", align_corners=True),
        sum(0.5 * F.interpolate(lg, big, mode="bilinear", align_corners=True) for lg in logits),
        rtol=1e-5, atol=1e-5)
    # not the probabilities' average: members of different confidence disagree with it somewhere
    with torch.no_grad():
        loud = _member(2)
        for conv in loud.head.convs:
            conv.weight.mul_(6)
        pair = [members[0], loud]
        by_logits = Ensemble(pair, fuse="logits")(x).argmax(1)
        by_probs = Ensemble(pair)(x).argmax(1)
    assert (by_logits != by_probs).any()
    # weighted probabilities: the average normalised by the weights' sum
    with torch.no_grad():
        wp = Ensemble(members, weights=[3.0, 1.0])(x)
    torch.testing.assert_close(wp.exp(), 0.75 * F.softmax(logits[0], 1)
                               + 0.25 * F.softmax(logits[1], 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1 weights for 2 members"):
        Ensemble(members, weights=[1.0])
    with pytest.raises(ValueError, match="weight of b must be a positive number, got -1"):
        Ensemble(members, names=["a", "b"], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="fuse='mean'; valid: probs, logits"):
        Ensemble(members, fuse="mean")
    assert "sum of logits of 0.5 x a, 0.5 x b" in repr(Ensemble(members, names=["a", "b"],
                                                                 fuse="logits"))


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

    # ADVENT's AdvEnt+MinEnt: --ensemble-fuse logits --ensemble-weights 0.5 0.5
    out2 = tmp_path / "ens2.json"
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble", str(paths[1]),
                 "--ensemble-fuse", "logits", "--ensemble-weights", "0.5", "0.5",
                 "--out", str(out2)]) == 0
    assert "sum of logits of 0.5 x" in capsys.readouterr().out
    direct = evaluate(Ensemble([optimize_for_inference(load_model(p)) for p in paths[:2]],
                               fuse="logits", weights=[0.5, 0.5]), ds)
    assert json.loads(out2.read_text())["miou"] == pytest.approx(direct["miou"], abs=1e-9)
    assert main(["predict", str(paths[0]), str(image), "-o", str(tmp_path / "q"),
                 "--precision", "fp32", "--ensemble", str(paths[1]), "--ensemble-fuse",
                 "logits"]) == 0
    assert (tmp_path / "q" / "in.png").is_file()
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble", str(paths[1]),
                 "--ensemble-weights", "0.5"]) == 2
    assert "--ensemble-weights: 1 weights for 2 checkpoints" in capsys.readouterr().err
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble-fuse", "logits"]) == 2
    assert "need --ensemble" in capsys.readouterr().err

    wrong = tmp_path / "wrong.pth"
    save_weights(build_model({**TINY, "num_classes": 5}), wrong)
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble", str(wrong)]) == 2
    assert "wrong.pth has 5 classes" in capsys.readouterr().err
    assert main(["evaluate", str(paths[0]), "-c", str(cfg), "--ensemble", str(paths[1]),
                 "--runtime", "openvino"]) == 2
    assert "--ensemble runs on the PyTorch runtime" in capsys.readouterr().err

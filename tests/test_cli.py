"""The command line end to end on synthetic data: train -> evaluate -> predict -> score."""

import json

import numpy as np
import pytest
from PIL import Image

from deeplabv2.cli import main
from deeplabv2.config import load_config, save_config
from deeplabv2.data import build_dataset

from test_train import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg_path = root / "tiny.yaml"
    save_config(load_config(None, [*TINY, "train.iterations=4", f"train.out_dir={root / 'run'}",
                                   "data.options={num_samples: 6, size: [48, 64]}"]), cfg_path)
    assert main(["train", "-c", str(cfg_path)]) == 0
    return root, cfg_path


def test_evaluate_predict_score_agree(trained, capsys):
    root, cfg_path = trained
    ckpt = root / "run" / "model.pth"
    assert main(["evaluate", str(ckpt), "-c", str(cfg_path), "--out", str(root / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "road" in out
    evaluated = json.loads((root / "m.json").read_text())

    # predict the validation images from files, then score the written PNGs against the split
    ds = build_dataset("synthetic", None, "val", num_samples=6, size=[48, 64])
    images = root / "val_images"
    images.mkdir()
    for i in range(len(ds)):
        Image.fromarray(ds.load(i)[0]).save(images / f"{ds.name(i)}.png")
    assert main(["predict", str(ckpt), str(images), "-o", str(root / "pred"), "--probs"]) == 0
    label = np.asarray(Image.open(root / "pred" / f"{ds.name(0)}.png"))
    assert label.shape == (48, 64) and label.max() < ds.num_classes
    probs = np.load(root / "pred" / f"{ds.name(0)}.npy")
    assert probs.shape == (ds.num_classes, 48, 64)
    assert (root / "pred" / f"{ds.name(0)}_overlay.jpg").is_file()
    assert main(["score", str(root / "pred"), "-c", str(cfg_path), "--out",
                 str(root / "s.json")]) == 0
    scored = json.loads((root / "s.json").read_text())
    assert scored["miou"] == pytest.approx(evaluated["miou"], abs=1e-9)


def test_evaluate_fast_default_matches_eager_and_bf16_is_close(trained, tmp_path, capsys):
    """The default path (BN folded, channels-last) gives the eager model's metrics; bf16 runs."""
    root, cfg_path = trained
    ckpt = str(root / "run" / "model.pth")
    runs = {}
    for name, extra in [("fast", []), ("eager", ["--eager"]), ("bf16", ["--precision", "bf16"]),
                        ("eager_bf16", ["--eager", "--precision", "bf16"])]:
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", ckpt, "-c", str(cfg_path), "--out", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    log = capsys.readouterr().out
    assert "fp32 eager" in log and "bf16" in log
    assert runs["fast"]["miou"] == pytest.approx(runs["eager"]["miou"], abs=1e-6)
    for name in ("bf16", "eager_bf16"):
        assert runs[name]["miou"] == pytest.approx(runs["eager"]["miou"], abs=0.05)
    assert main(["evaluate", ckpt, "-c", str(cfg_path), "--precision", "fp16"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert main(["predict", ckpt, str(tmp_path), "-o", str(tmp_path / "p"), "--eager",
                 "--compile"]) == 2
    assert "--compile works on the optimized network" in capsys.readouterr().err


def test_predict_keeps_going_past_a_corrupt_file(trained, tmp_path, capsys):
    root, _ = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "c"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code = main(["predict", str(root / "run" / "model.pth"), str(folder), "-o",
                 str(tmp_path / "out"), "--flip", "--scales", "0.75", "1"])
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "c.png", "legend.png"]
    err = capsys.readouterr().err
    assert "b.png" in err and "unreadable image" in err


def test_sliding_evaluation_runs(trained, capsys):
    root, cfg_path = trained
    assert main(["evaluate", str(root / "run" / "model.pth"), "-c", str(cfg_path),
                 "--sliding", "32", "--limit", "2"]) == 0
    assert "sliding" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    root, cfg_path = trained
    assert main(["evaluate", str(tmp_path / "none.pth"), "-c", str(cfg_path)]) == 2
    assert "none.pth: no such weights file" in capsys.readouterr().err
    assert main(["train", "-c", str(cfg_path), "data.dataset=cityscapes", "data.options={}",
                 f"data.root={tmp_path / 'missing'}", f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["train", "-c", str(cfg_path), "train.lr_typo=1"]) == 2
    assert "unknown key train.lr_typo" in capsys.readouterr().err


def test_crf_in_evaluate_predict_and_search(trained, tmp_path, capsys):
    root, cfg_path = trained
    ckpt = str(root / "run" / "model.pth")
    assert main(["evaluate", ckpt, "-c", str(cfg_path), "--crf", "--limit", "2"]) == 0
    assert "dense CRF" in capsys.readouterr().out
    assert main(["crf-search", ckpt, "-c", str(cfg_path), "--limit", "2", "--bi-w", "3", "4",
                 "--bi-xy-std", "20", "--bi-rgb-std", "5", "--out", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "no CRF" in out and "best:" in out
    grid = json.loads((tmp_path / "g.json").read_text())["results"]
    assert [r["crf"] and r["crf"]["bi_w"] for r in grid] == [None, 3, 4]
    assert main(["evaluate", ckpt, "-c", str(cfg_path), "eval.crf=true",
                 "eval.crf_params={bi_w: -1}"]) == 2
    assert "bi_w must be a finite number >= 0" in capsys.readouterr().err


def test_predict_batches_cityscapes_ids_and_legend(tmp_path):
    from deeplabv2 import build_model, save_weights
    from deeplabv2.data import CityscapesDataset
    from deeplabv2.data.cityscapes_labels import TRAIN_TO_LABEL
    model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                         "num_classes": 19})
    ckpt = tmp_path / "city.pth"
    save_weights(model, ckpt, classes=CityscapesDataset.classes, palette=CityscapesDataset.palette)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i, size in enumerate([(40, 56), (40, 56), (40, 56), (32, 48)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            photos / f"frankfurt_000000_00{i}_leftImg8bit.png")
    outs = {}
    for bs in (1, 3):
        out = tmp_path / f"out{bs}"
        assert main(["predict", str(ckpt), str(photos), "-o", str(out), "--batch-size", str(bs),
                     "--cityscapes-ids"]) == 0
        outs[bs] = out
    for p in sorted(photos.iterdir()):
        a = np.asarray(Image.open(outs[1] / f"{p.stem}.png"))
        b = np.asarray(Image.open(outs[3] / f"{p.stem}.png"))
        assert np.array_equal(a, b)  # batching does not change the result
        ids = np.asarray(Image.open(outs[3] / f"{p.stem}_labelIds.png"))
        assert np.array_equal(ids, np.asarray(TRAIN_TO_LABEL, dtype=np.uint8)[a])
    assert (outs[3] / "legend.png").stat().st_size > 0


def test_evaluate_msc_is_the_paper_max_fusion_and_crf_search_takes_it(trained, tmp_path, capsys):
    """``--msc`` evaluates the scores of scales 1, 0.75, 0.5 fused by max (MSC in eval mode),
    ``--avg-scales`` averages probabilities: each equal to the library's computation."""
    import torch
    from deeplabv2.evaluation.evaluate import evaluate
    from deeplabv2.inference.front import InferenceConfig
    from deeplabv2.weights import load_model
    root, cfg_path = trained
    ckpt = str(root / "run" / "model.pth")
    ds = build_dataset("synthetic", None, "val", num_samples=6, size=[48, 64])
    model = load_model(ckpt)
    for name, extra, inference in [
            ("msc", ["--msc"], InferenceConfig(msc_scales=(1, 0.75, 0.5))),
            ("avg", ["--avg-scales", "1", "0.75", "0.5"],
             InferenceConfig(avg_scales=(1, 0.75, 0.5)))]:
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", ckpt, "-c", str(cfg_path), "--eager", "--out", str(out),
                     *extra]) == 0
        expected = evaluate(model, ds, inference=inference)
        assert json.loads(out.read_text())["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert "MSC max-fused 1,0.75,0.5" in capsys.readouterr().out
    # --alignment pytorch runs the other convention on the same checkpoint
    assert main(["evaluate", ckpt, "-c", str(cfg_path), "--eager", "--alignment", "pytorch",
                 "--out", str(tmp_path / "pt.json")]) == 0
    model.alignment = __import__("deeplabv2.model", fromlist=["x"]).get_alignment("pytorch")
    with torch.no_grad():
        pt = evaluate(model, ds)
    assert json.loads((tmp_path / "pt.json").read_text())["miou"] == pytest.approx(pt["miou"])
    # crf-search: the network under --msc, two grid points
    assert main(["crf-search", ckpt, "-c", str(cfg_path), "--limit", "2", "--msc",
                 "--bi-w", "3", "--bi-xy-std", "30", "40", "--bi-rgb-std", "3",
                 "--out", str(tmp_path / "crf.json")]) == 0
    results = json.loads((tmp_path / "crf.json").read_text())["results"]
    assert len(results) == 3 and results[0]["crf"] is None
    assert results[1]["crf"]["prob_clip"] == 1e-5 and results[1]["crf"]["pos_xy_std"] == 1.0


@pytest.mark.parametrize("speedup, chosen, why", [
    (1.7, "bf16", "--precision auto: bf16 (AVX512-BF16 CPU, bf16 inference probe 1.7x FP32)"),
    (0.9, "fp32", "--precision auto: fp32 (AVX512-BF16 CPU, but the bf16 inference probe "
                  "measured only 0.90x FP32 now")])
def test_precision_auto_says_once_what_it_chose_and_why(trained, tmp_path, capsys, monkeypatch,
                                                        speedup, chosen, why):
    """evaluate and predict with ``--precision auto`` on a CPU with native bf16 but no AMX
    (flags and inference probe faked): the probe decides, once per process, and each command
    prints its choice and the measurement once (an ensemble's members follow it silently)."""
    from deeplabv2 import precision
    root, cfg_path = trained
    ckpt = str(root / "run" / "model.pth")
    monkeypatch.delenv(precision.PIN_ENV, raising=False)  # conftest pins fp32
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    calls = []

    def probe():
        calls.append(speedup)
        return speedup
    probe.label = "inference"
    monkeypatch.setattr(precision, "bf16_inference_speedup", probe)
    ds = build_dataset("synthetic", None, "val", num_samples=6, size=[48, 64])
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(ds.load(0)[0]).save(images / "a.png")
    precision._cpu_bf16_pays.cache_clear()
    try:
        assert main(["evaluate", ckpt, "-c", str(cfg_path), "--precision", "auto",
                     "--limit", "2"]) == 0
        evaluated = capsys.readouterr().out
        assert main(["predict", ckpt, str(images), "-o", str(tmp_path / "p"),
                     "--ensemble", ckpt]) == 0
        predicted = capsys.readouterr().out
    finally:
        precision._cpu_bf16_pays.cache_clear()
    for out in (evaluated, predicted):
        assert out.count("--precision auto:") == 1 and why in out
    assert f", {chosen}\n" in evaluated  # and it ran in what it said
    assert calls == [speedup]


def _subcommands():
    import argparse
    from deeplabv2.cli import build_parser
    parser = build_parser()
    return next(a for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)).choices


def test_every_subcommand_describes_itself_and_its_positional_arguments(capsys):
    """``deeplabv2 X --help`` opens with a description, and every positional argument has help
    text: walks every sub-command, so a new one without them fails here."""
    commands = _subcommands()
    assert {"train", "evaluate", "predict", "quantize", "serve", "bench", "export",
            "demo"} <= set(commands)
    for name, sp in commands.items():
        assert sp.description and len(sp.description.split()) >= 8, name
        positionals = [a for a in sp._actions if not a.option_strings]
        for action in positionals:
            assert action.help and action.help.strip(), f"{name} {action.dest}: no help"
        with pytest.raises(SystemExit):
            main([name, "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert " ".join(sp.description.split()) in shown, name
        for action in positionals:
            assert " ".join(action.help.split()[:4]) in shown, f"{name} {action.dest}"

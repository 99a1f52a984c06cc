"""The demo pipeline writes its whole report (a few iterations here; `make demo` trains fully)."""

import json

import pytest

from deeplabv2.demo.supervised import run_demo


def test_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    summary = run_demo(out, ["train.iterations=3", "train.progress=false",
                             "train.tensorboard=false", "data.num_workers=0",
                             "data.options={num_samples: 8}"])
    for name in ("summary.json", "metrics.json", "iou_table.txt", "training_curve.png",
                 "confusion.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "predictions").glob("synthetic_*.png"))) == 6
    assert (out / "predictions" / "legend.png").is_file()
    assert len(list((out / "predictions").glob("*_overlay.jpg"))) == 6
    written = json.loads((out / "summary.json").read_text())
    assert written["val_miou"] == summary["val_miou"]
    assert 0 <= written["colour_baseline_miou"] <= 1
    assert json.loads((out / "metrics.json").read_text())["classes"]["pole"]
    assert f"report: {out.resolve()}" in capsys.readouterr().out
    # the HTML report covers every validation image, with its thumbnails
    per_image = json.loads((out / "per_image.json").read_text())
    assert len(per_image["images"]) == 8 and (out / "index.html").stat().st_size > 0
    assert all((out / e["thumbs"]["error"]).is_file() for e in per_image["images"])


def test_demo_says_where_its_checkpoint_is_and_the_next_commands_work(tmp_path, capsys,
                                                                      monkeypatch):
    """The demo ends with its checkpoint's real path and the commands that use it; the
    evaluate and predict ones run as printed (from the folder the demo ran in) and give the
    demo's own mIoU, and the serve and quantize ones parse and name files that exist."""
    import shlex

    from deeplabv2.cli import build_parser, main
    monkeypatch.chdir(tmp_path)
    summary = run_demo("report", ["train.iterations=2", "train.progress=false",
                                  "train.tensorboard=false", "data.num_workers=0",
                                  "data.options={num_samples: 8}"])
    out = capsys.readouterr().out
    assert "checkpoint: report/run/model.pth (trained with report/run/config.yaml)" in out
    commands = [line.split("   (")[0].split() for line in out.splitlines()
                if line.startswith("  deeplabv2 ")]
    verbs = [c[1] for c in commands]
    assert verbs == ["evaluate", "predict", "serve", "quantize", "predict"]
    for command in commands:
        args = build_parser().parse_args(shlex.split(" ".join(command[1:])))
        assert (tmp_path / args.checkpoint).is_file()
        if getattr(args, "config", None):
            assert (tmp_path / args.config).is_file()
    assert main([*commands[0][1:], "--out", "m.json"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == summary["val_miou"]
    assert main(commands[1][1:]) == 0
    assert len(list((tmp_path / "report" / "my_predictions").glob("synthetic_*.png"))) == 6
    assert commands[4][-2:] == ["--precision", "int8"]


def test_adapt_demo_says_where_the_best_checkpoint_is_and_evaluates_it_on_the_target(
        tmp_path, capsys, monkeypatch):
    """``demo --adapt`` ends with its checkpoints and the commands for the best method's; the
    printed evaluate runs as printed and gives that method's target-val mIoU of the table."""
    import shlex

    from deeplabv2.cli import main
    from deeplabv2.demo import adapt as demo
    for name in ("SOURCE", "TARGET", "TARGET_VAL", "SOURCE_VAL"):
        monkeypatch.setattr(demo, name, {**getattr(demo, name), "num_samples": 4})
    monkeypatch.chdir(tmp_path)
    summary = demo.run_adapt_demo(
        "adapt", methods=("fda",), source_iterations=2, method_iterations=1,
        overrides=["model.width=8", "data.batch_size=2", "data.num_workers=0", "train.threads=1",
                   "train.progress=false", "train.tensorboard=false"])
    out = capsys.readouterr().out
    assert "checkpoints: adapt/RUN/model.pth, RUN one of warm_up, source_only, fda, " \
           "target_supervised" in out
    commands = {line.split()[1]: shlex.split(line.split("   (")[0])[1:]
                for line in out.splitlines() if line.startswith("  deeplabv2 ")}
    assert set(commands) == {"evaluate", "predict", "serve"}
    assert commands["serve"] == ["serve", "adapt/fda/model.pth"]
    assert main([*commands["evaluate"], "--out", "m.json"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == pytest.approx(
        summary["runs"]["fda"]["target_val_miou"], abs=1e-9)

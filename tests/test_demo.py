"""The demo pipeline writes its whole report (a few iterations here; `make demo` trains fully)."""

import json

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

"""The HTML evaluation report: its parts, its numbers against metrics.json, per-image numbers,
baseline comparison, `compare`, `score --report` and the size of its thumbnails."""

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from deeplabv2 import build_model
from deeplabv2.app.report import ReportCollector, ReportError, compare_report, read_metrics
from deeplabv2.cli import main
from deeplabv2.inference.crf import DenseCRF
from deeplabv2.data import build_dataset
from deeplabv2.evaluation.evaluate import evaluate
from deeplabv2.evaluation.metrics import ConfusionMatrix

TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 7}


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def _report_data(page: str) -> dict:
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny random model evaluated with the CRF on 8 synthetic images, report written; the
    arrays each image gave are kept to check the per-image numbers independently."""
    out = tmp_path_factory.mktemp("report")
    ds = build_dataset("synthetic", None, "val", num_samples=8, size=[48, 64])
    model = build_model(TINY).eval()
    report = ReportCollector(out, ds.classes, ds.palette, names=ds.name)
    seen = []

    def on_image(i, image, label, pred, before):
        seen.append((i, label.copy(), pred.copy(), before.copy()))
        report(i, image, label, pred, before)

    metrics = evaluate(model, ds, crf=DenseCRF(iterations=2), on_image=on_image)
    page = report.write(metrics, title="tiny <test>", settings={"split": "val"})
    return out, page, metrics, seen, ds


def test_report_has_its_parts_and_the_numbers_of_metrics_json(evaluated):
    out, page, metrics, seen, ds = evaluated
    html = page.read_text()
    for part in ('id="metrics-table"', 'id="iou-chart"', 'id="class-table"', 'id="confusion"',
                 'id="class-filter"', 'id="image-chart"', 'id="worst"', 'id="best"'):
        assert part in html, part
    assert "<title>tiny &lt;test&gt;</title>" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    written = json.loads((out / "metrics.json").read_text())
    for key in ("miou", "fw_iou", "pixel_accuracy", "mean_class_accuracy"):
        cell = re.search(rf'data-key="{key}">([^<]*)<', html).group(1)
        assert cell == _pct(written[key]), key
    assert re.search(r'data-key="pixels">(\d+)<', html).group(1) == str(written["pixels"])
    rows = re.findall(r'<tr data-class="([^"]+)">.*?class="num iou">([^<]*)<.*?class="num acc">'
                      r'([^<]*)<', html)
    assert [r[0] for r in rows] == list(ds.classes)
    for name, iou, acc in rows:
        assert iou == _pct(written["classes"][name]["iou"])
        assert acc == _pct(written["classes"][name]["accuracy"])
    # the confusion heat map is row-normalised: each ground-truth row of cells sums to 1
    conf = np.asarray(written["confusion"], dtype=float)
    cells = [float(v) for v in re.findall(r'data-value="([0-9.]+)"', html)]
    grid = np.asarray(cells).reshape(len(ds.classes), len(ds.classes))
    for g in range(len(ds.classes)):
        if conf[g].sum():
            assert grid[g].sum() == pytest.approx(1.0, abs=1e-3)
            assert grid[g] == pytest.approx(conf[g] / conf[g].sum(), abs=1e-5)
    # the worst class named at the top is the one with the lowest IoU
    worst = min((v["iou"], c, n) for c, (n, v) in enumerate(written["classes"].items())
                if v["iou"] is not None)
    assert f"Worst classes: <b>{worst[2]}</b>" in html


def test_per_image_numbers_and_thumbnails(evaluated):
    out, page, metrics, seen, ds = evaluated
    data = _report_data(page.read_text())
    per_image = json.loads((out / "per_image.json").read_text())
    assert data["images"] == per_image["images"] and data["crf"] is True
    assert [e["name"] for e in data["images"]] == [ds.name(i) for i, *_ in seen]
    assert len(seen) == len(ds)
    for entry, (i, label, pred, before) in zip(data["images"], seen):
        cm = ConfusionMatrix(len(ds.classes))
        cm.update(pred.astype(np.int64), label.astype(np.int64))
        r = cm.compute()
        assert entry["miou"] == pytest.approx(r["miou"], abs=1e-5)
        assert entry["pixel_accuracy"] == pytest.approx(r["pixel_accuracy"], abs=1e-5)
        for got, want in zip(entry["iou"], r["iou"]):
            assert (got is None) == math.isnan(want) and (got is None or
                                                        got == pytest.approx(want, abs=1e-5))
        before_cm = ConfusionMatrix(len(ds.classes))
        before_cm.update(before.astype(np.int64), label.astype(np.int64))
        assert entry["miou_before_crf"] == pytest.approx(before_cm.compute()["miou"], abs=1e-5)
        for key in ("image", "gt", "pred", "error", "before_crf"):
            assert (out / entry["thumbs"][key]).is_file(), key
        # thumbnails show the labels: the prediction PNG holds the predicted classes
        assert np.array_equal(np.asarray(Image.open(out / entry["thumbs"]["pred"])), pred)
        # error map: red exactly where the prediction is wrong on a labelled pixel
        err = np.asarray(Image.open(out / entry["thumbs"]["error"]).convert("RGB"))
        red = np.all(err == (230, 32, 32), axis=2)
        assert np.array_equal(red, (pred != label) & (label != 255))


def test_thumbnails_stay_small_for_cityscapes_sized_images(tmp_path):
    """A 1024x2048 scene costs under 200 kB of thumbnails: 500 images stay under 100 MB."""
    ds = build_dataset("synthetic", None, "val", num_samples=1, size=[1024, 2048])
    image, label = ds.load(0)
    pred = np.where(np.arange(2048)[None, :] < 1000, label, (label + 1) % 7)
    report = ReportCollector(tmp_path, ds.classes, ds.palette)
    report.add("big", image, label, pred, pred_before_crf=label)
    files = list((tmp_path / "thumbs").iterdir())
    assert len(files) == 5
    for f in files:
        assert Image.open(f).size == (320, 160)
    assert sum(f.stat().st_size for f in files) < 200_000


def test_baseline_differences_are_sorted(evaluated, tmp_path):
    out, page, metrics, seen, ds = evaluated
    base = dict(metrics)
    base["iou"] = [0.5 if math.isnan(v) else min(1.0, v + 0.1 * (c - 3))
                   for c, v in enumerate(metrics["iou"])]
    from deeplabv2.evaluation.metrics import save_json
    save_json(base, ds.classes, tmp_path / "base.json")
    page, diffs = compare_report(tmp_path / "cmp", out, tmp_path / "base.json")
    html = page.read_text()
    assert 'id="diff-chart"' in html and 'id="iou-chart"' in html
    values = [d for _, d in diffs if not math.isnan(d)]
    assert values == sorted(values)
    chart = html[html.index('id="diff-chart"'):]
    chart = chart[:chart.index("</svg>")]
    order = re.findall(r'data-class="([^"]+)"', chart)
    assert order == [n for n, _ in diffs]


def test_compare_command_and_its_errors(evaluated, tmp_path, capsys):
    out, page, metrics, seen, ds = evaluated
    assert main(["compare", str(out), str(out / "metrics.json"), "--report",
                 str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "+0.00" in printed and (tmp_path / "c" / "index.html").is_file()
    other = json.loads((out / "metrics.json").read_text())
    other["classes"]["lamp post"] = other["classes"].pop("pole")
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["compare", str(out), str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "other.json" in err and "pole" in err and "lamp post" in err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["compare", str(out), str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not a metrics JSON file" in capsys.readouterr().err
    with pytest.raises(ReportError, match="no such metrics file"):
        read_metrics(tmp_path / "missing.json")


def test_score_report_from_prediction_files(tmp_path, capsys):
    """`score --report`: perfect predictions give per-image mIoU 1, a damaged one less."""
    from deeplabv2.config import load_config, save_config
    cfg = tmp_path / "c.yaml"
    save_config(load_config("demo", ["data.options={num_samples: 4, size: [48, 64]}"]), cfg)
    ds = build_dataset("synthetic", None, "val", num_samples=4, size=[48, 64])
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(len(ds)):
        label = ds.load(i)[1].copy()
        if i == 2:
            label[:, :32] = 0
        Image.fromarray(label).save(preds / f"{ds.name(i)}.png")
    assert main(["score", str(preds), "-c", str(cfg), "--report", str(tmp_path / "r"),
                 "--baseline", str(preds / "none.json")]) == 2
    assert "none.json: no such metrics file" in capsys.readouterr().err
    assert main(["score", str(preds), "-c", str(cfg), "--report", str(tmp_path / "r")]) == 0
    data = _report_data((tmp_path / "r" / "index.html").read_text())
    mious = {e["name"]: e["miou"] for e in data["images"]}
    assert mious[ds.name(2)] < 1 and all(mious[ds.name(i)] == 1 for i in (0, 1, 3))
    assert "miou_before_crf" not in data["images"][0] and data["crf"] is False
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["pixels"] == 4 * 48 * 64


def test_baseline_needs_report(tmp_path, capsys):
    from deeplabv2.config import load_config, save_config
    cfg = tmp_path / "c.yaml"
    save_config(load_config("demo", ["data.options={num_samples: 2, size: [48, 64]}"]), cfg)
    assert main(["score", str(tmp_path), "-c", str(cfg), "--baseline", "x.json"]) == 2
    assert "--baseline compares in the report" in capsys.readouterr().err


def test_evaluate_command_writes_the_report_with_crf_and_baseline(tmp_path, capsys):
    from deeplabv2 import save_weights
    from deeplabv2.config import load_config, save_config
    from deeplabv2.data import SyntheticDataset
    cfg = tmp_path / "c.yaml"
    save_config(load_config("demo", ["data.options={num_samples: 3, size: [48, 64]}",
                                     "data.num_workers=0", "eval.crf_params={iterations: 2}"]),
                cfg)
    ckpt = tmp_path / "m.pth"
    save_weights(build_model(TINY), ckpt, classes=SyntheticDataset.classes,
                 palette=SyntheticDataset.palette)
    assert main(["evaluate", str(ckpt), "-c", str(cfg), "--report", str(tmp_path / "a")]) == 0
    assert main(["evaluate", str(ckpt), "-c", str(cfg), "--crf", "--report", str(tmp_path / "b"),
                 "--baseline", str(tmp_path / "a")]) == 0
    assert f"report written to {tmp_path / 'b' / 'index.html'}" in capsys.readouterr().out
    html = (tmp_path / "b" / "index.html").read_text()
    data = _report_data(html)
    assert data["crf"] is True and len(data["images"]) == 3
    assert all("before_crf" in e["thumbs"] for e in data["images"])
    assert 'id="diff-chart"' in html and "dense CRF" in html

"""Size and opening time of the HTML report for a Cityscapes-sized run (500 images, 2048x1024).

Writes a report of ``--images`` synthetic street scenes at 1024x2048 with 19 classes (the
scene's 7 classes spread over the Cityscapes ids, a prediction damaged in bands, and a
"before CRF" prediction, so every thumbnail kind is written), then measures the folder's size,
the time spent in the report's own work per image, and, when Chromium and chromedriver are
installed, how long headless Chromium takes from navigation to the gallery being drawn.

    python benchmarks/report_size.py            # writes benchmarks/report_size_results.md
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deeplabv2.app.report import ReportCollector
from deeplabv2.data import CityscapesDataset, SyntheticDataset
from deeplabv2.evaluation.metrics import ConfusionMatrix

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import cpu_model  # noqa: E402

CLASS_MAP = np.array([0, 1, 2, 8, 10, 13, 5], dtype=np.uint8)  # synthetic -> Cityscapes ids


def browser_open_seconds(page: Path) -> float | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(driver))
    try:
        t0 = time.perf_counter()
        d.get(page.as_uri())
        while d.execute_script("return document.body.dataset.ready") != "1":
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        d.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--out", default=str(Path(__file__).with_name("report_size_results.md")))
    args = p.parse_args(argv)
    # 25 distinct scenes (generating a 2048x1024 scene takes seconds), each reused with its
    # own damage to the prediction
    ds = SyntheticDataset("val", size=(1024, 2048), num_samples=min(args.images, 25))
    scenes = [ds.load(i) for i in range(len(ds))]
    tmp = Path(tempfile.mkdtemp(prefix="report_size_"))
    try:
        report = ReportCollector(tmp, CityscapesDataset.classes, CityscapesDataset.palette)
        cm = ConfusionMatrix(19)
        rng = np.random.default_rng(0)
        spent = 0.0
        for i in range(args.images):
            image, label = scenes[i % len(scenes)]
            label = CLASS_MAP[label]
            pred = label.copy()
            top = rng.integers(0, 900)
            pred[top:top + 120] = CLASS_MAP[rng.integers(0, 7)]
            before = pred.copy()
            before[:, :200] = 0
            cm.update(pred.astype(np.int64), label.astype(np.int64))
            t0 = time.perf_counter()
            report.add(f"scene_{i:04d}", image, label, pred, before)
            spent += time.perf_counter() - t0
        metrics = cm.compute()
        metrics["confusion"] = cm.matrix.tolist()
        t0 = time.perf_counter()
        page = report.write(metrics, title="report size benchmark")
        write_seconds = time.perf_counter() - t0
        total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        html = page.stat().st_size
        opened = browser_open_seconds(page)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = f"""# Size of the HTML report for a Cityscapes-sized run

Command: `python benchmarks/report_size.py --images {args.images}`. Machine: {cpu_model()}.
Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.
{args.images} synthetic street scenes at 2048x1024 (25 distinct ones, each prediction damaged
differently), 19 Cityscapes classes; every image has
image, ground truth, prediction, error map and before-CRF thumbnails (320x160).

| | value |
| --- | --- |
| report folder | {total / 1e6:.1f} MB ({total / args.images / 1e3:.0f} kB per image) |
| index.html (metrics, charts, per-image data, inlined script and style) | {html / 1e3:.0f} kB |
| report work per image (per-image numbers + 5 thumbnails) | {1e3 * spent / args.images:.0f} ms |
| writing index.html, per_image.json, metrics.json | {write_seconds:.2f} s |
| headless Chromium: navigation to gallery drawn | {'not measured (no chromium)' if opened is None else f'{opened:.2f} s'} |
"""
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation report: one self-contained HTML page plus small thumbnails, opened from disk.

``deeplabv2 evaluate ... --report DIR`` (and ``score``, ``compare`` and the demo) write::

    DIR/index.html       metrics table, per-class IoU chart (against a baseline when given,
                         with the differences sorted), row-normalised confusion heat map, every
                         image's mIoU sorted, a gallery of the worst and best images with a
                         class filter; the CSS and JavaScript are inlined from the package
    DIR/metrics.json     the metrics, as ``--out`` writes them
    DIR/per_image.json   every image's name, mIoU, pixel accuracy and per-class IoU
    DIR/thumbs/          per image: image (JPEG), ground truth, prediction, error map and,
                         when the CRF ran, the prediction before it (palette PNGs), all at most
                         ``thumb_width`` pixels wide

Per-image numbers use the definitions of :mod:`deeplabv2.evaluation.metrics` on that image's pixels alone
(mIoU over the classes present in its ground truth or prediction). Thumbnails are written as
the evaluation goes, so memory stays flat however many images there are; a 500-image
Cityscapes val run gives about 500 x 35 kB.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data import voc_palette
from ..utils.fileio import atomic_write_buffered, atomic_write_text
from ..evaluation.metrics import ConfusionMatrix, save_json
from . import asset

THUMB_WIDTH = 320
GALLERY_SIZE = 8  # worst and best images shown per gallery
ERROR_COLOUR = (230, 32, 32)
IGNORE_COLOUR = (20, 20, 60)


class ReportError(ValueError):
    """A report cannot be written from what was given; the message says which file or key."""


def per_image_confusion(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C + 1)`` int64 counts of one image: rows ground truth (255 = ignore, not counted),
    columns prediction, the last column "no class" (a prediction value ``>= C``), the layout of
    :attr:`deeplabv2.evaluation.metrics.ConfusionMatrix.counts` (whose ``from_counts`` and
    ``compute`` turn them into the image's numbers)."""
    C = num_classes
    label = np.asarray(label)
    pred = np.minimum(np.asarray(pred), C)
    # one bin per (label value 0..255, prediction 0..C); rows >= C (ignore) are dropped after
    # counting, which is cheaper than masking the pixels of a 2048x1024 image first
    dtype = np.int32 if 256 * (C + 1) > np.iinfo(np.uint16).max else np.uint16
    index = label.astype(dtype) * dtype(C + 1) + pred.astype(dtype)
    counts = np.bincount(index.ravel(), minlength=256 * (C + 1))
    return counts.reshape(256, C + 1)[:C].astype(np.int64)


def _thumb_size(height: int, width: int, max_width: int) -> tuple[int, int]:
    if width <= max_width:
        return width, height
    return max_width, max(1, round(height * max_width / width))


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> None:
    """A thumbnail, written whole or not at all (a full disk: one line naming it)."""
    atomic_write_buffered(path, lambda f: im.save(f, format=fmt, **kw), fsync=False)


class ReportCollector:
    """Collects what the report needs, one image at a time (``add``), and writes it (``write``).

    ``palette``: ``(C, 3)`` uint8 colours of the ``class_names``. Pass the collector as
    :func:`deeplabv2.evaluation.evaluate.evaluate`'s ``on_image`` (it is callable with that signature)
    or call :meth:`add` yourself.
    """

    def __init__(self, out_dir, class_names: Sequence[str], palette, *,
                 thumb_width: int = THUMB_WIDTH, names=None):
        self.out = Path(out_dir)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.palette = np.asarray(palette, dtype=np.uint8)[: self.num_classes]
        if len(self.palette) != self.num_classes:
            raise ReportError(f"palette has {len(self.palette)} colours for "
                              f"{self.num_classes} classes")
        self.thumb_width = int(thumb_width)
        self.names = names  # index -> image name, for the evaluate callback
        self.images: list[dict] = []
        self.crf = False
        (self.out / "thumbs").mkdir(parents=True, exist_ok=True)

    def __call__(self, index: int, image, label, pred, pred_before_crf=None) -> None:
        name = self.names(index) if callable(self.names) else f"image {index}"
        self.add(name, image, label, pred, pred_before_crf)

    def add(self, name: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
            pred_before_crf: np.ndarray | None = None) -> None:
        """One image: RGB ``uint8 (H, W, 3)``, ground truth ``(H, W)`` (255 = ignore) and the
        prediction ``(H, W)`` (``0..C-1``; ``C`` or more = no class); ``pred_before_crf``
        when a CRF refined it. Computes its numbers and writes its thumbnails."""
        image, label, pred = np.asarray(image), np.asarray(label), np.asarray(pred)
        if image.ndim != 3 or image.shape[:2] != label.shape or label.shape != pred.shape:
            raise ReportError(f"{name}: image {image.shape}, ground truth {label.shape} and "
                              f"prediction {pred.shape} must share (H, W)")
        C = self.num_classes
        counts = per_image_confusion(label, pred, C)
        scores = ConfusionMatrix.from_counts(counts).compute()
        entry = {"name": str(name), "miou": _round(scores["miou"]),
                 "pixel_accuracy": _round(scores["pixel_accuracy"]),
                 "iou": [_round(v) for v in scores["iou"]],
                 "gt_classes": np.flatnonzero(counts.sum(1)).tolist()}
        k = len(self.images)
        thumbs = self._write_thumbs(k, image, label, pred, pred_before_crf)
        entry["thumbs"] = thumbs
        if pred_before_crf is not None:
            self.crf = True
            entry["miou_before_crf"] = _round(ConfusionMatrix.from_counts(
                per_image_confusion(label, pred_before_crf, C)).compute()["miou"])
        self.images.append(entry)

    def _write_thumbs(self, k, image, label, pred, before) -> dict:
        h, w = label.shape
        size = _thumb_size(h, w, self.thumb_width)
        # nearest-neighbour sampling of the label maps, done on the small grid only
        rows = (np.arange(size[1]) * h // size[1])[:, None]
        cols = (np.arange(size[0]) * w // size[0])[None, :]
        prefix = f"thumbs/{k:06d}"
        small_image = np.asarray(Image.fromarray(
            np.ascontiguousarray(image[..., :3]).astype(np.uint8)).resize(
            size, Image.Resampling.BILINEAR, reducing_gap=3.0))
        _save(Image.fromarray(small_image), self.out / f"{prefix}_image.jpg", "JPEG",
              quality=80)
        files = {"image": f"{prefix}_image.jpg"}
        small_label = self._display(label[rows, cols])
        for key, labels in (("gt", label), ("pred", pred), ("before_crf", before)):
            if labels is None:
                continue
            small = small_label if key == "gt" else self._display(np.asarray(labels)[rows, cols])
            self._save_palette_png(small, self.out / f"{prefix}_{key}.png")
            files[key] = f"{prefix}_{key}.png"
            if key == "pred":
                small_pred = small
        # error map: the image dimmed to grey where right, red where wrong, dark where ignored
        grey = (small_image.astype(np.float32).mean(2, keepdims=True) * 0.45 + 20)
        err = np.repeat(grey, 3, axis=2).astype(np.uint8)
        wrong = (small_label != small_pred) & (small_label != 255)
        err[wrong] = ERROR_COLOUR
        err[small_label == 255] = IGNORE_COLOUR
        _save(Image.fromarray(err), self.out / f"{prefix}_error.png", "PNG")
        files["error"] = f"{prefix}_error.png"
        return files

    def _display(self, labels) -> np.ndarray:
        """Labels as ``uint8`` for a palette PNG: classes as they are, no class as 255."""
        labels = np.asarray(labels)
        return np.where((labels >= 0) & (labels < self.num_classes), labels, 255).astype(np.uint8)

    def _save_palette_png(self, labels: np.ndarray, path: Path) -> None:
        im = Image.fromarray(labels, mode="P")
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: self.num_classes] = self.palette
        im.putpalette(table.flatten().tolist())
        _save(im, path, "PNG")

    def write(self, metrics: dict, *, title: str = "Evaluation report", settings: dict | None
              = None, baseline: dict | None = None, baseline_name: str = "baseline",
              sections: Sequence[str] = ()) -> Path:
        """Write ``metrics.json``, ``per_image.json`` and ``index.html``; return the page's
        path. ``metrics`` is :func:`deeplabv2.evaluation.evaluate.evaluate`'s dict (``iou``,
        ``class_accuracy``, ``confusion``, ...); ``baseline`` a second run's metrics (the same
        dict, or a ``metrics.json`` as read from disk)."""
        save_json(metrics, self.class_names, self.out / "metrics.json")
        atomic_write_text(self.out / "per_image.json",
                          json.dumps({"classes": self.class_names, "crf": self.crf,
                                      "images": self.images}, allow_nan=False) + "\n")
        return write_page(self.out, metrics, self.class_names, self.palette,
                          images=self.images, crf=self.crf, title=title, settings=settings,
                          baseline=baseline, baseline_name=baseline_name,
                          sections=sections)


def _round(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 5)


# -- reading metrics back -----------------------------------------------------------------------
def read_metrics(path) -> tuple[dict, list[str]]:
    """``(metrics dict as evaluate returns it, class names)`` from a ``metrics.json`` written by
    ``--out``/``--report``, or from a report folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such metrics file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a metrics JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
        raise ReportError(f"{path}: no 'classes' table; expected the metrics.json that "
                          "`deeplabv2 evaluate --out` writes")
    names = list(data["classes"])
    nan = float("nan")

    def num(x):
        return nan if x is None else float(x)

    metrics = {k: num(data.get(k)) for k in ("miou", "fw_iou", "pixel_accuracy",
                                              "mean_class_accuracy")}
    metrics["pixels"] = int(data.get("pixels") or 0)
    metrics["iou"] = [num(data["classes"][n].get("iou")) for n in names]
    metrics["class_accuracy"] = [num(data["classes"][n].get("accuracy")) for n in names]
    if "confusion" in data:
        metrics["confusion"] = data["confusion"]
    return metrics, names


def align_baseline(baseline: dict, baseline_names: Sequence[str],
                   class_names: Sequence[str], source="baseline") -> dict:
    """``baseline``'s metrics with its per-class lists reordered to ``class_names``; a class
    that one run has and the other lacks is an error naming it."""
    missing = [n for n in class_names if n not in baseline_names]
    extra = [n for n in baseline_names if n not in class_names]
    if missing or extra:
        raise ReportError(f"{source}: classes differ from this run's (missing {missing}, "
                          f"extra {extra})")
    order = [list(baseline_names).index(n) for n in class_names]
    out = dict(baseline)
    for key in ("iou", "class_accuracy"):
        out[key] = [baseline[key][i] for i in order]
    return out


# -- the page -----------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def _protocol_text(protocol: dict) -> str:
    """The evaluation protocol a metrics dict records (``evaluate``'s ``"protocol"``), as one
    line for the report's settings."""
    if protocol.get("name") == "none":
        return "none (this project's test-time mode)"
    details = ", ".join(f"{k} {v}" for k, v in protocol.items()
                        if k not in ("name", "class_subsets", "source") and v is not None)
    return f"{protocol.get('name')} ({details}; {protocol.get('source', '')})"


def _metrics_table(metrics, baseline) -> str:
    rows = [("mIoU", "miou"), ("fwIoU", "fw_iou"), ("pixel accuracy", "pixel_accuracy"),
            ("mean class accuracy", "mean_class_accuracy")]
    head = "<tr><th>metric</th><th>this run %</th>" + (
        "<th>baseline %</th><th>difference</th>" if baseline else "") + "</tr>"
    body = []
    for label, key in rows:
        cells = f'<td class="num" data-key="{key}">{_pct(metrics[key])}</td>'
        if baseline:
            d = metrics[key] - baseline[key]
            cells += f'<td class="num">{_pct(baseline[key])}</td><td class="num">{_signed(d)}</td>'
        body.append(f"<tr><th>{label}</th>{cells}</tr>")
    body.append(f'<tr><th>pixels counted</th><td class="num" data-key="pixels">'
                f'{int(metrics["pixels"])}</td></tr>')
    return f'<table id="metrics-table">{head}{"".join(body)}</table>'


def _signed(d) -> str:
    return "-" if d is None or math.isnan(d) else f"{100 * d:+.2f}"


def _class_table(metrics, names, palette, baseline) -> str:
    head = ("<tr><th></th><th>class</th><th>IoU %</th><th>accuracy %</th>" +
            ("<th>baseline IoU %</th><th>difference</th>" if baseline else "") + "</tr>")
    rows = []
    for c, name in enumerate(names):
        iou, acc = metrics["iou"][c], metrics["class_accuracy"][c]
        extra = ""
        if baseline:
            extra = (f'<td class="num">{_pct(baseline["iou"][c])}</td>'
                     f'<td class="num">{_signed(iou - baseline["iou"][c])}</td>')
        rows.append(f'<tr data-class="{html.escape(name)}"><td><span class="swatch" '
                    f'style="background:{_hex(palette[c])}"></span></td>'
                    f"<td>{html.escape(name)}</td><td class=\"num iou\">{_pct(iou)}</td>"
                    f'<td class="num acc">{_pct(acc)}</td>{extra}</tr>')
    return f'<table id="class-table">{head}{"".join(rows)}</table>'


def _iou_chart(metrics, names, palette, baseline, baseline_name) -> str:
    """Horizontal bars of per-class IoU, worst class first (SVG, no script needed)."""
    order = sorted(range(len(names)), key=lambda c: (_key(metrics["iou"][c]), c))
    bar_h = 9 if baseline else 14
    row = 2 * bar_h + 6 if baseline else bar_h + 6
    label_w, plot_w = 150, 420
    height = row * len(names) + 30
    parts = [f'<svg id="iou-chart" class="chart" width="{label_w + plot_w + 70}" '
             f'height="{height}" role="img" aria-label="per-class IoU">']
    for t in range(0, 101, 25):
        x = label_w + plot_w * t / 100
        parts.append(f'<line x1="{x}" y1="0" x2="{x}" y2="{height - 20}" class="grid"/>'
                     f'<text x="{x}" y="{height - 6}" class="tick">{t}%</text>')
    for r, c in enumerate(order):
        y = r * row + 4
        iou = metrics["iou"][c]
        w = 0 if math.isnan(iou) else plot_w * iou
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h - 2}" class="label">'
                     f'{html.escape(names[c])}</text>'
                     f'<rect class="bar" data-class="{html.escape(names[c])}" x="{label_w}" '
                     f'y="{y}" width="{w:.1f}" height="{bar_h}" fill="{_hex(palette[c])}" '
                     f'stroke="#333" stroke-width="0.5"><title>{html.escape(names[c])}: '
                     f'{_pct(iou)}%</title></rect>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 2}" class="value">'
                     f'{_pct(iou)}</text>')
        if baseline:
            b = baseline["iou"][c]
            wb = 0 if math.isnan(b) else plot_w * b
            parts.append(f'<rect class="bar baseline" x="{label_w}" y="{y + bar_h + 1}" '
                         f'width="{wb:.1f}" height="{bar_h}"><title>{html.escape(names[c])} '
                         f'({html.escape(baseline_name)}): {_pct(b)}%</title></rect>'
                         f'<text x="{label_w + wb + 4:.1f}" y="{y + 2 * bar_h - 1}" '
                         f'class="value muted">{_pct(b)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _diff_chart(metrics, names, baseline) -> str:
    """Per-class IoU minus the baseline's, sorted from the largest loss to the largest gain."""
    diffs = [(metrics["iou"][c] - baseline["iou"][c], c) for c in range(len(names))]
    diffs.sort(key=lambda t: (_key(t[0]), t[1]))
    finite = [abs(d) for d, _ in diffs if not math.isnan(d)]
    scale = max(finite + [0.01])
    label_w, half, row = 150, 200, 18
    height = row * len(names) + 10
    parts = [f'<svg id="diff-chart" class="chart" width="{label_w + 2 * half + 70}" '
             f'height="{height}" role="img" aria-label="IoU difference to the baseline">',
             f'<line x1="{label_w + half}" y1="0" x2="{label_w + half}" y2="{height}" '
             f'class="axis"/>']
    for r, (d, c) in enumerate(diffs):
        y = r * row + 3
        w = 0 if math.isnan(d) else half * abs(d) / scale
        x = label_w + half - w if d < 0 else label_w + half
        cls = "loss" if d < 0 else "gain"
        parts.append(f'<text x="{label_w - 6}" y="{y + 11}" class="label">'
                     f'{html.escape(names[c])}</text>'
                     f'<rect class="bar {cls}" data-class="{html.escape(names[c])}" '
                     f'x="{x:.1f}" y="{y}" width="{w:.1f}" height="13"/>'
                     f'<text x="{label_w + 2 * half + 6}" y="{y + 11}" class="value">'
                     f'{_signed(d)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _key(x) -> float:
    return math.inf if x is None or math.isnan(x) else x


def _confusion_table(confusion, names) -> str:
    """Row-normalised confusion heat map: rows ground truth, columns prediction."""
    m = np.asarray(confusion, dtype=np.float64)
    totals = m.sum(1)
    norm = m / np.maximum(totals[:, None], 1)
    head = ('<tr><th class="corner">ground truth \u2193 / prediction \u2192</th>' +
            "".join(f'<th class="col"><div>{html.escape(n)}</div></th>' for n in names) + "</tr>")
    rows = []
    for g, name in enumerate(names):
        cells = []
        for p in range(len(names)):
            v = norm[g, p]
            text = "" if m[g, p] == 0 else f"{100 * v:.0f}" if v >= 0.005 else "&middot;"
            colour = f"rgba(33, 102, 172, {v:.3f})"
            fg = "#fff" if v > 0.5 else "#111"
            cells.append(f'<td style="background:{colour};color:{fg}" data-value="{v:.5f}" '
                         f'title="{html.escape(name)} \u2192 {html.escape(names[p])}: '
                         f'{100 * v:.2f}% ({int(m[g, p])} px)">{text}</td>')
        rows.append(f'<tr><th class="row">{html.escape(name)}</th>{"".join(cells)}</tr>')
    return f'<table id="confusion">{head}{"".join(rows)}</table>'


def _script_json(data) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>`` breakout)."""
    return (json.dumps(data, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def write_page(out_dir, metrics: dict, class_names: Sequence[str], palette, *,
               images: list[dict] | None = None, crf: bool = False,
               title: str = "Evaluation report", settings: dict | None = None,
               baseline: dict | None = None, baseline_name: str = "baseline",
               sections: Sequence[str] = ()) -> Path:
    """Write ``out_dir/index.html`` from the metrics (and, when given, the per-image entries of
    a :class:`ReportCollector`, whose thumbnails are already in ``out_dir/thumbs``).
    ``sections``: more HTML sections, placed after the per-class ones (e.g. the snapshot
    series of :func:`deeplabv2.evaluation.series.html_section`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    palette = np.asarray(palette, dtype=np.uint8)
    images = images or []
    extra_sections = list(sections)
    worst = sorted(range(len(names)), key=lambda c: (_key(metrics["iou"][c]), c))[:3]
    worst_text = ", ".join(f"<b>{html.escape(names[c])}</b> ({_pct(metrics['iou'][c])}%)"
                           for c in worst if not math.isnan(metrics["iou"][c]))
    ranked = sorted((e for e in images if e["miou"] is not None), key=lambda e: e["miou"])
    worst_images = ", ".join(f"{html.escape(e['name'])} ({_pct(e['miou'])}%)"
                             for e in ranked[:3])
    settings = dict(settings or {})
    if "protocol" not in settings and isinstance(metrics.get("protocol"), dict):
        settings["protocol"] = _protocol_text(metrics["protocol"])
    settings_html = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td>"
                            f"</tr>" for k, v in settings.items())
    sections = [
        f'<section id="summary"><h2>At a glance</h2><p>mIoU <b id="miou">'
        f'{_pct(metrics["miou"])}%</b> over {len(names)} classes'
        + (f" and {len(images)} images" if images else "") + ". Worst classes: "
        + (worst_text or "-") + "."
        + (f" Worst images: {worst_images}." if worst_images else "") + "</p>"
        + (f'<table id="settings">{settings_html}</table>' if settings_html else "")
        + "</section>",
        f'<section id="metrics"><h2>Metrics</h2>{_metrics_table(metrics, baseline)}</section>',
        '<section id="per-class"><h2>Per-class IoU</h2><p class="note">Worst class first'
        + (f"; grey bars: {html.escape(baseline_name)}" if baseline else "") + ".</p>"
        + _iou_chart(metrics, names, palette, baseline, baseline_name)
        + (f"<h3>Difference to {html.escape(baseline_name)} (IoU points, sorted)</h3>"
           + _diff_chart(metrics, names, baseline) if baseline else "")
        + _class_table(metrics, names, palette, baseline) + "</section>",
    ]
    sections += extra_sections  # the parameter's, kept aside before the name was reused
    if metrics.get("confusion") is not None:
        sections.append('<section id="confusion-section"><h2>Confusion matrix</h2><p class='
                        '"note">Each row sums to 100%: where the pixels of a ground-truth class '
                        'went. Hover a cell for the pixel count.</p>'
                        + _confusion_table(metrics["confusion"], names) + "</section>")
    if images:
        sections.append(
            '<section id="images"><h2>Images</h2><p class="note">Every image\'s own mIoU '
            '(classes in its ground truth or prediction), sorted. Pick a class to rank the '
            'images that contain it by that class\'s IoU instead.</p>'
            '<label>class <select id="class-filter"><option value="">all classes (image mIoU)'
            '</option></select></label> <span id="filter-count"></span>'
            '<div id="image-chart"></div></section>'
            '<section id="gallery"><h2>Worst images</h2><div id="worst" class="gallery"></div>'
            '<h2>Best images</h2><div id="best" class="gallery"></div>'
            '<p class="note">Error map: red = wrong, grey = right, dark blue = ignored.</p>'
            '</section>')
    data = {"classes": names, "palette": [_hex(c) for c in palette], "crf": crf,
            "gallery_size": GALLERY_SIZE, "images": images}
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{asset('report.css')}</style></head>"
            f"<body><header><h1>{html.escape(title)}</h1></header><main>{''.join(sections)}"
            f'</main><script id="report-data" type="application/json">{_script_json(data)}'
            f"</script><script>{asset('report.js')}</script></body></html>\n")
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def compare_report(out_dir, run, baseline, *, run_name: str | None = None,
                   baseline_name: str | None = None) -> tuple[Path, list[tuple[str, float]]]:
    """``deeplabv2 compare RUN BASELINE --report DIR``: a report of ``run`` (a ``metrics.json``
    or a report folder) against ``baseline``. Returns the page and the per-class IoU
    differences ``[(class, run - baseline)]`` sorted from the largest loss."""
    metrics, names = read_metrics(run)
    base, base_names = read_metrics(baseline)
    base = align_baseline(base, base_names, names, source=str(baseline))
    run_name = run_name or str(run)
    baseline_name = baseline_name or str(baseline)
    palette = _default_palette(len(names))
    diffs = sorted(((n, metrics["iou"][c] - base["iou"][c]) for c, n in enumerate(names)),
                   key=lambda t: (_key(t[1]), t[0]))
    page = None
    if out_dir is not None:
        page = write_page(out_dir, metrics, names, palette,
                          title=f"{run_name} against {baseline_name}",
                          settings={"run": run_name, "baseline": baseline_name},
                          baseline=base, baseline_name=baseline_name)
    return page, diffs


def _default_palette(n: int) -> np.ndarray:
    return np.asarray(voc_palette(max(n, 1)))[:n]


# -- the adaptation table (deeplabv2 adapt-table --report, the adaptation demo) ------------------
def write_table_page(out_dir, table, *, title: str = "Adaptation results", decimals: int = 1,
                     palette=None, sections: Sequence[str] = ()) -> Path:
    """``out_dir/index.html``: the per-class IoU table of
    :class:`deeplabv2.evaluation.table.Table` (rows methods, columns classes, mIoU last, the
    highest of each column in bold), each row's evaluation as a footnote, the rows that are not
    comparable flagged and listed; ``palette`` (one colour per class) puts a swatch over each
    class column. ``sections``: more HTML after the table (e.g. the demo's)."""
    from ..evaluation.table import FLAG, _best, _columns
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(table)
    best = _best(table, columns, decimals) if len(table.rows) > 1 else [set()] * len(columns)
    n = len(table.classes)
    head = ['<th>method</th><th>eval.</th>']
    for j, (h, _) in enumerate(columns):
        swatch = (f'<span class="swatch" style="background:{_hex(palette[j])}"></span>'
                  if palette is not None and j < n else "")
        cls = "col class" if j < n else "col summary"
        head.append(f'<th class="{cls}"><div>{swatch}{html.escape(h)}</div></th>')
    body = []
    for i, (r, m, f) in enumerate(zip(table.rows, table.marks, table.flagged)):
        cells = []
        for j, (h, get) in enumerate(columns):
            v = get(r)
            text = "-" if v is None or math.isnan(v) else f"{100 * v:.{decimals}f}"
            cells.append(f'<td class="num{" best" if i in best[j] else ""}" '
                         f'data-column="{html.escape(h)}">'
                         f'{f"<b>{text}</b>" if i in best[j] else text}</td>')
        flag = f'<span class="flag" title="not comparable">{FLAG}</span>' if f else ""
        body.append(f'<tr data-row="{html.escape(r.label)}"{" class=flagged" if f else ""}>'
                    f'<th title="{html.escape(r.source)}">{html.escape(r.label)}</th>'
                    f'<td><a href="#eval-{m + 1}">[{m + 1}]</a>{flag}</td>{"".join(cells)}</tr>')
    notes = "".join(f'<li id="eval-{k + 1}">[{k + 1}] {html.escape(t)}</li>'
                    for k, t in enumerate(table.footnotes))
    flagged = ""
    if table.notes:
        flagged = ('<section id="not-comparable"><h2>Not comparable</h2><ul>'
                   + "".join(f"<li>{html.escape(t)}</li>" for t in table.notes)
                   + "</ul></section>")
    sources = "".join(f"<tr><th>{html.escape(r.label)}</th><td>{html.escape(r.source)}</td>"
                      f"</tr>" for r in table.rows)
    style = ("#adapt-table th.col { height: 120px; vertical-align: bottom; padding: 0 2px; "
             "font-weight: normal; } #adapt-table th.col div { writing-mode: vertical-rl; "
             "transform: rotate(180deg); white-space: nowrap; margin: 0 auto; } "
             "#adapt-table th.summary div { font-weight: 600; } "
             "#adapt-table tr.flagged { background: #fff4e5; } .flag { color: #c60; }")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{asset('report.css')}{style}</style>"
            f"</head><body><header><h1>{html.escape(title)}</h1></header><main>"
            f'<section id="table"><h2>Per-class IoU (%)</h2><p class="note">Rows are methods, '
            f"columns classes, mIoU last; the highest of each column in bold; "
            f"{FLAG}: evaluated otherwise than the first row.</p>"
            f'<table id="adapt-table"><tr>{"".join(head)}</tr>{"".join(body)}</table>'
            f'<h3>Evaluations</h3><ul id="evaluations">{notes}</ul></section>{flagged}'
            f"{''.join(sections)}"
            f'<section id="sources"><h2>Rows</h2><table>{sources}</table></section>'
            f"</main></body></html>\n")
    atomic_write_text(out / "index.html", page)
    return out / "index.html"

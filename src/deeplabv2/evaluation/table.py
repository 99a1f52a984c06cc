"""``deeplabv2 adapt-table``: the evaluations of several runs as one table, as the adaptation
papers print them: one row per method, one column per class (IoU %), mIoU last, then the
subset mIoUs when present (SYNTHIA -> Cityscapes: over 16 and 13 classes), and the protocol of
every number.

A row is read from

* a run folder: its ``snapshots.json`` (written by ``deeplabv2 evaluate RUN_DIR``: the final
  model, or the best snapshot when the run's ``eval.selection`` is ``best``), else its
  ``metrics.json`` (the last validation of the training run); the row is named after the run's
  ``adapt.method`` (``config.yaml``);
* a metrics JSON file as ``deeplabv2 evaluate --out`` (or ``--report``, ``score --out``)
  writes it (:func:`deeplabv2.evaluation.metrics.save_json`), or a ``snapshots.json``;
  named after its folder (``metrics.json``) or its file name;
* ``LABEL=PATH`` names the row ``LABEL``.

Numbers are only comparable under one evaluation: the protocol (the released script followed,
:mod:`deeplabv2.evaluation.protocols`, or ``none``: this project's test-time mode), the model
selection (final, or best on the evaluated split) and the pixels counted (the split, its size
and how many images). Each distinct evaluation gets a footnote; rows that differ from the
first row's are flagged (``*``) and listed under the table, or refused with ``strict``. Rows of
different class sets cannot share the class columns and are always refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from ..utils.fileio import atomic_write_text
from .protocols import describe, get_protocol
from .series import BEST_LABEL

#: the mark of a row whose evaluation differs from the first row's
FLAG = "*"


class TableError(ValueError):
    """Inputs that make no table; the message names the file or the key."""


@dataclass
class Row:
    """One method's numbers: fractions in [0, 1], NaN where undefined."""

    label: str
    source: str
    classes: list[str]
    iou: list[float]
    miou: float
    subsets: dict[str, float] = field(default_factory=dict)  # {"16": mIoU over 16, ...}
    protocol: dict = field(default_factory=lambda: {"name": "none"})
    selection: str = "final"  # or "best" (selected on the evaluated split)
    pixels: int | None = None
    recorded: bool = True  # False: the file does not say its protocol

    @classmethod
    def from_metrics(cls, label: str, metrics: dict, classes: Sequence[str], *,
                     source: str = "", selection: str = "final") -> "Row":
        """A row from :func:`deeplabv2.evaluation.evaluate.evaluate`'s dict."""
        subsets = {k[len("miou_"):]: _num(v) for k, v in metrics.items()
                   if k.startswith("miou_")}
        return cls(label, source, list(classes), [_num(v) for v in metrics["iou"]],
                   _num(metrics["miou"]), subsets, dict(metrics.get("protocol") or
                                                        {"name": "none"}),
                   selection, int(metrics["pixels"]) if "pixels" in metrics else None,
                   "protocol" in metrics)

    def evaluation(self) -> str:
        """What makes two rows' numbers comparable, as one key."""
        return json.dumps({"protocol": self.protocol if self.recorded else None,
                           "selection": self.selection}, sort_keys=True)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


# -- reading ----------------------------------------------------------------------------------
def read_row(spec: str) -> Row:
    """The row of one command-line input (``PATH`` or ``LABEL=PATH``; see the module)."""
    label, path = None, spec
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        if not label or not path:
            raise TableError(f"{spec!r}: give PATH or LABEL=PATH")
    p = Path(path)
    if p.is_dir():
        return _from_run(p, label)
    if not p.is_file():
        raise TableError(f"{p}: no such run folder or metrics file")
    data = _read_json(p)
    if isinstance(data, dict) and "snapshots" in data:
        return _from_series(p, data, label or _default_label(p), "final")
    return _from_metrics_json(p, data, label or _default_label(p))


def _default_label(path: Path) -> str:
    generic = path.stem in ("metrics", "snapshots", "target_val_metrics")
    return path.parent.name if generic and path.parent.name else path.stem


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: not a JSON file ({e})") from None


def _from_run(run: Path, label: str | None) -> Row:
    config = run / "config.yaml"
    cfg = {}
    if config.is_file():
        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as e:
            raise TableError(f"{config}: unreadable ({e})") from None
    method = (cfg.get("adapt") or {}).get("method")
    label = label or (method if method not in (None, "none") else run.name)
    selection = (cfg.get("eval") or {}).get("selection", "final")
    if (run / "snapshots.json").is_file():
        path = run / "snapshots.json"
        return _from_series(path, _read_json(path), label, selection)
    if (run / "metrics.json").is_file():
        row = _from_metrics_json(run / "metrics.json", _read_json(run / "metrics.json"), label)
        if not row.recorded and cfg:  # older runs: the config says which protocol validated
            row.protocol = describe(get_protocol((cfg.get("eval") or {}).get("protocol")
                                                 or "none"))
            row.recorded = True
        if row.protocol.get("name") == "none" and cfg:  # training validates with eval's mode
            row.protocol = {**row.protocol, "test_time": test_time(cfg.get("eval"))}
        limit = (cfg.get("train") or {}).get("val_limit") or 0
        if limit:  # the training's validation counted only the first images
            row.protocol = {**row.protocol, "images": f"first {limit}"}
        return row
    raise TableError(f"{run}: neither snapshots.json (deeplabv2 evaluate {run}) nor "
                     "metrics.json (a finished training run) in this folder")


def test_time(eval_section: dict | None, flags: dict | None = None) -> str:
    """The test-time mode of protocol ``none`` (the config's ``eval`` section, overridden by
    ``evaluate``'s flags): it changes the numbers too."""
    e, f = dict(eval_section or {}), dict(flags or {})
    parts = []
    if f.get("sliding") or e.get("mode") == "sliding":
        parts.append(f"sliding {f.get('sliding') or e.get('crop_size')}")
    msc = f.get("msc") if f.get("msc") is not None else e.get("msc_scales")
    if msc is not None:
        parts.append(f"MSC {msc or 'paper scales'}")
    avg = f.get("avg_scales") or e.get("avg_scales")
    if avg and list(avg) != [1.0]:
        parts.append(f"averaged scales {avg}")
    if f.get("flip") or e.get("flip"):
        parts.append("flip")
    if f.get("crf") or e.get("crf"):
        parts.append("dense CRF")
    return ", ".join(parts) or "whole image, one scale"


def _from_metrics_json(path: Path, data, label: str) -> Row:
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict) \
            or "miou" not in data:
        raise TableError(f"{path}: no 'classes' and 'miou'; expected the metrics.json that "
                         "`deeplabv2 evaluate --out` or a training run writes, or a "
                         "snapshots.json")
    names = list(data["classes"])
    try:
        metrics = {k: v for k, v in data.items() if k == "miou" or k.startswith("miou_")}
        metrics["iou"] = [data["classes"][n]["iou"] for n in names]
    except (KeyError, TypeError):
        raise TableError(f"{path}: a class entry without 'iou'") from None
    if "pixels" in data:
        metrics["pixels"] = data["pixels"]
    if "protocol" in data:
        metrics["protocol"] = data["protocol"]
    return Row.from_metrics(label, metrics, names, source=str(path))


def _from_series(path: Path, data: dict, label: str, selection: str) -> Row:
    """The final (or best) checkpoint's row of a ``snapshots.json``."""
    rows, classes = data.get("snapshots"), data.get("classes")
    if not isinstance(rows, list) or not isinstance(classes, list):
        raise TableError(f"{path}: no 'snapshots' and 'classes' lists; expected the "
                         "snapshots.json of `deeplabv2 evaluate RUN_DIR`")
    if selection == "best":
        valid = [r for r in rows if r.get("miou") is not None]
        chosen = max(valid, key=lambda r: r["miou"]) if valid else None  # earliest on a tie
    else:
        chosen = next((r for r in rows if r.get("final")), None)
    if chosen is None:
        what = "evaluated snapshot" if selection == "best" else "final model"
        raise TableError(f"{path}: no {what} among its rows (eval.selection {selection})")
    settings = data.get("settings") or {}
    name = (settings.get("flags") or {}).get("protocol") or \
        (settings.get("eval") or {}).get("protocol") or "none"
    try:
        protocol = describe(get_protocol(name))
    except ValueError as e:
        raise TableError(f"{path}: {e}") from None
    metrics = {k: v for k, v in chosen.items() if k == "miou" or k.startswith("miou_")}
    metrics["iou"] = [chosen["iou"].get(c) for c in classes]
    metrics["pixels"] = chosen.get("pixels")
    flags = settings.get("flags") or {}
    if name == "none":
        protocol["test_time"] = test_time(settings.get("eval"), flags)
    if flags.get("limit"):
        protocol["images"] = f"first {flags['limit']}"
    metrics["protocol"] = protocol
    row = Row.from_metrics(label, metrics, classes, source=f"{path} ({chosen.get('file')})",
                           selection=selection)
    if row.pixels == 0:
        row.pixels = None
    return row


# -- the table ----------------------------------------------------------------------------------
@dataclass
class Table:
    rows: list[Row]
    classes: list[str]
    subsets: list[str]  # subset mIoU names present in any row, as they sort
    notes: list[str]  # what makes rows incomparable; empty when every row is
    footnotes: list[str]  # one per distinct evaluation, in the order of first use
    marks: list[int]  # per row, the index of its footnote
    flagged: list[bool]  # per row, evaluated otherwise than the first row


def build_table(rows: Sequence[Row], *, strict: bool = False) -> Table:
    """The table of ``rows`` (at least one). Rows of other classes than the first row's are a
    :class:`TableError`; rows evaluated otherwise (protocol, selection, pixels counted) are
    flagged, or a :class:`TableError` with ``strict``."""
    rows = list(rows)
    if not rows:
        raise TableError("no runs to tabulate: give run folders or metrics files")
    seen: dict[str, str] = {}
    for r in rows:
        if r.label in seen:
            raise TableError(f"two rows named {r.label!r} ({seen[r.label]} and {r.source}); "
                             "name them with LABEL=PATH")
        seen[r.label] = r.source
    first = rows[0]
    for r in rows[1:]:
        if r.classes != first.classes:
            missing = [c for c in first.classes if c not in r.classes]
            extra = [c for c in r.classes if c not in first.classes]
            what = (f"missing {missing}, extra {extra}" if missing or extra
                    else "the same classes in another order")
            raise TableError(f"{r.source}: its classes differ from {first.source}'s ({what}); "
                             "a table needs one class set (tabulate 19- and 16-class "
                             "evaluations separately)")
    evaluations: list[str] = []
    marks = []
    for r in rows:
        key = r.evaluation()
        if key not in evaluations:
            evaluations.append(key)
        marks.append(evaluations.index(key))
    footnotes = [_evaluation_text(next(r for r, m in zip(rows, marks) if m == i))
                 for i in range(len(evaluations))]
    flagged = [m != marks[0] for m in marks]
    notes = []
    for r, m, f in zip(rows, marks, flagged):
        if f:
            notes.append(f"{r.label} ({r.source}) was evaluated otherwise than {first.label}: "
                         f"[{m + 1}] against [{marks[0] + 1}]")
    pixels = {r.pixels for r in rows if r.pixels is not None}
    if len(pixels) > 1:
        counts = ", ".join(f"{r.label} {r.pixels}" for r in rows if r.pixels is not None)
        notes.append(f"the rows counted different numbers of pixels ({counts}): another "
                     "split, label size or number of images")
        for i, r in enumerate(rows):
            if r.pixels is not None and r.pixels != first.pixels:
                flagged[i] = True
    if strict and notes:
        raise TableError("rows not comparable (drop --strict to tabulate them flagged): "
                         + "; ".join(notes))
    subsets = sorted({k for r in rows for k in r.subsets}, key=_subset_order)
    return Table(rows, list(first.classes), subsets, notes, footnotes, marks, flagged)


def _subset_order(name: str):
    return (0, -int(name)) if name.isdigit() else (1, name)


def _evaluation_text(row: Row) -> str:
    p = row.protocol
    if not row.recorded:
        text = "protocol not recorded in the file"
    elif p.get("name") == "none":
        text = "none: this project's front, " + (
            p.get("test_time") or "its test-time mode not recorded in the file (the whole image "
            "at one scale unless evaluate was given --msc, --avg-scales, --flip, --sliding or "
            "--crf)")
    else:
        size = lambda s: "as loaded" if s is None else f"{s[1]}x{s[0]}"  # noqa: E731
        text = (f"{p.get('name')}: image {p.get('image_filter')} to "
                f"{size(p.get('image_size'))}, stride-8 {p.get('upsample')} upsampled to "
                f"labels {size(p.get('label_size'))}"
                + (f" ({p['source']})" if p.get("source") else ""))
    if p.get("images"):
        text += f"; on the {p['images']} images only"
    text += "; " + ("best snapshot, " + BEST_LABEL if row.selection == "best"
                    else "final model")
    return text


def _pct(x: float, decimals: int) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.{decimals}f}"


def _columns(table: Table) -> list[tuple[str, callable]]:
    """(header, row -> value) of the number columns: classes, mIoU, subset mIoUs."""
    cols = [(c, lambda r, i=i: r.iou[i]) for i, c in enumerate(table.classes)]
    cols.append(("mIoU", lambda r: r.miou))
    cols += [(f"mIoU {s}", lambda r, s=s: r.subsets.get(s, float("nan")))
             for s in table.subsets]
    return cols


def _best(table: Table, columns, decimals: int) -> list[set]:
    """Per column, the rows holding its highest value as printed (bold, as the papers)."""
    out = []
    for _, get in columns:
        shown = [(_pct(get(r), decimals), get(r)) for r in table.rows]
        values = [v for s, v in shown if s != "-"]
        top = _pct(max(values), decimals) if values else None
        out.append({i for i, (s, _) in enumerate(shown) if s == top})
    return out


def markdown(table: Table, *, decimals: int = 1, title: str | None = None) -> str:
    """The table in markdown: ``| method | evaluation | class ... | mIoU | mIoU 16 ... |``, the
    highest value of each column in bold, then the footnotes and what is not comparable."""
    columns = _columns(table)
    best = _best(table, columns, decimals) if len(table.rows) > 1 else [set()] * len(columns)
    lines = [f"# {title}", ""] if title else []
    lines.append("| method | eval. | " + " | ".join(h for h, _ in columns) + " |")
    lines.append("| --- | --- |" + " ---: |" * len(columns))
    for i, (r, m, f) in enumerate(zip(table.rows, table.marks, table.flagged)):
        cells = []
        for j, (_, get) in enumerate(columns):
            text = _pct(get(r), decimals)
            cells.append(f"**{text}**" if i in best[j] else text)
        lines.append(f"| {r.label} | [{m + 1}]{FLAG if f else ''} | " + " | ".join(cells)
                     + " |")
    lines.append("")
    lines.append("IoU per class and mIoU in %; the highest of each column in bold. "
                 "Evaluations:")
    lines.append("")
    lines += [f"[{k + 1}] {text}" + "  " for k, text in enumerate(table.footnotes)]
    if table.notes:
        lines += ["", f"**Not comparable** ({FLAG}):", ""]
        lines += [f"- {n}" for n in table.notes]
    lines.append("")
    lines.append("Rows: " + "; ".join(f"{r.label}: {r.source}" for r in table.rows))
    return "\n".join(lines) + "\n"


def write_markdown(table: Table, path, **kw) -> Path:
    atomic_write_text(path, markdown(table, **kw))
    return Path(path)

"""``deeplabv2 evaluate RUN_DIR``: every snapshot of a run and its final model, final and best.

The released adaptation codes report numbers picked from a snapshot series on the split they
evaluate: ADVENT's ``eval_best`` (valeoai/ADVENT ``advent/domain_adaptation/eval_UDA.py``)
evaluates ``model_2000.pth`` ... ``model_120000.pth`` on Cityscapes val, caches each one's
per-class IoU in ``all_res.pkl`` and prints the best; DACS (vikolss/DACS ``trainUDA.py``)
validates every 5000 iterations on Cityscapes val, keeps ``best_model.pth``, and its README
gives the peak (53.66) and the final value (53.04). This module does the same over a run folder
of this project (``snapshots/iter_XXXXXX.pth`` and ``model.pth``, :mod:`deeplabv2.snapshots`)
and says both numbers: *final* (the model the run ends with, chosen without looking at the
evaluated split) and *best*, selected on the evaluated split, as the papers did, and so
optimistic: it is tuned on the data it is reported on.

Each checkpoint is evaluated by the caller's ``evaluate_one(path, on_image)`` (the CLI passes
the code path of a single-checkpoint ``deeplabv2 evaluate``). Results go to
``snapshots.json`` after every checkpoint, keyed by file name, size and modification time and
by the evaluation settings, so a re-run (or a run interrupted half-way) evaluates only the
checkpoints not yet there; other settings start the series again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..snapshots import list_snapshots
from ..utils.digest import file_sha256
from ..utils.fileio import atomic_write_text

CACHE_VERSION = 1
#: how the best snapshot is labelled wherever it is reported
BEST_LABEL = "selected on the evaluated split, as the papers did (optimistic)"
_SCALARS = ("miou", "fw_iou", "pixel_accuracy", "mean_class_accuracy")


class SeriesError(ValueError):
    """A run folder whose snapshot series cannot be evaluated; the message names the file."""


@dataclass
class Entry:
    """One checkpoint of the series: ``iteration`` (None: unknown), its path, and whether it
    is the run's final model."""

    iteration: int | None
    path: Path
    final: bool = False
    same_as: str | None = None  # model.pth, when this snapshot is byte-identical to it


@dataclass
class SeriesResult:
    rows: list[dict]  # per checkpoint, by iteration: iteration, file, final, metrics...
    final: dict | None
    best: dict | None
    evaluated: list[str] = field(default_factory=list)  # files evaluated by this call
    cached: list[str] = field(default_factory=list)  # files whose results were reused
    # which of the two the run's paper reports (eval.selection): "final" or "best"
    selection: str = "final"


def _same_file_contents(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and file_sha256(a) == file_sha256(b)


def run_entries(run_dir, final_iteration: int | None = None) -> list[Entry]:
    """The checkpoints of the run in ``run_dir``: its snapshots by iteration, and
    ``model.pth`` as the final one (at ``final_iteration``, the run's ``train.stop_at`` or
    ``train.iterations``). A snapshot byte-identical to ``model.pth`` (the one at the last
    iteration) stands for it instead of being evaluated twice."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SeriesError(f"{run_dir}: no such run folder")
    entries = [Entry(it, p) for it, p in list_snapshots(run_dir)]
    model = run_dir / "model.pth"
    if model.is_file():
        same = [e for e in entries if e.iteration == final_iteration] or entries[-1:]
        if same and _same_file_contents(same[0].path, model):
            same[0].final, same[0].same_as = True, model.name
        else:
            entries.append(Entry(final_iteration, model, final=True))
    if not entries:
        raise SeriesError(f"{run_dir}: no snapshots (snapshots/iter_*.pth) and no model.pth: "
                          "not a finished run folder, or one trained without "
                          "train.snapshot_every; give a checkpoint file to evaluate one")
    return entries


def _key(run_dir: Path, path: Path) -> dict:
    st = path.stat()
    return {"file": path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir)
            else str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _num(x):
    x = float(x)
    return None if math.isnan(x) else x


def _row(entry: Entry, key: dict, metrics: dict, classes: Sequence[str]) -> dict:
    """The JSON row of one checkpoint: every scalar the evaluation returns (subset mIoUs
    included), per-class IoU and accuracy by class name, the confusion matrix."""
    row = {"iteration": entry.iteration, **key, "final": entry.final}
    if entry.same_as:
        row["same_as"] = entry.same_as
    for k, v in metrics.items():
        if k in _SCALARS or k.startswith("miou_"):
            row[k] = _num(v)
    row["pixels"] = int(metrics.get("pixels", 0))
    row["iou"] = {c: _num(v) for c, v in zip(classes, metrics["iou"])}
    row["class_accuracy"] = {c: _num(v) for c, v in zip(classes, metrics["class_accuracy"])}
    if "confusion" in metrics:
        row["confusion"] = metrics["confusion"]
    return row


def row_metrics(row: dict, classes: Sequence[str]) -> dict:
    """A row back as the metrics dict :func:`deeplabv2.evaluation.evaluate.evaluate` returns
    (NaN for undefined values), e.g. for the HTML report."""
    nan = float("nan")
    out = {k: nan if row.get(k) is None else row[k] for k in row
           if k in _SCALARS or k.startswith("miou_")}
    out["pixels"] = row.get("pixels", 0)
    out["iou"] = [nan if row["iou"][c] is None else row["iou"][c] for c in classes]
    out["class_accuracy"] = [nan if row["class_accuracy"][c] is None else
                             row["class_accuracy"][c] for c in classes]
    if "confusion" in row:
        out["confusion"] = row["confusion"]
    return out


def read_cache(path: Path, settings: dict) -> tuple[dict, str | None]:
    """``{file: row}`` of an earlier ``snapshots.json`` evaluated with the same ``settings``,
    and a line saying why it was not used (None when it was, or there was none)."""
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
        rows = data["snapshots"]
        same = data.get("version") == CACHE_VERSION and data.get("settings") == settings
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {}, f"{path}: unreadable ({e}); evaluating every checkpoint again"
    if not same:
        return {}, (f"{path}: evaluated with other settings; evaluating every checkpoint "
                    "again")
    return {r["file"]: r for r in rows if isinstance(r, dict) and "file" in r}, None


def choose(rows: list[dict]) -> tuple[dict | None, dict | None]:
    """``(final, best)``: the final model's row, and the row of highest mIoU (the earliest on
    a tie, as ADVENT's ``eval_best`` keeps the first of equal values; undefined mIoUs never
    win)."""
    final = next((r for r in rows if r["final"]), None)
    best = None
    for r in rows:
        if r.get("miou") is not None and (best is None or r["miou"] > best["miou"]):
            best = r
    return final, best


def evaluate_series(run_dir, entries: list[Entry], evaluate_one: Callable, cache_path,
                    settings: dict, classes: Sequence[str], *, fresh: Sequence[Path] = (),
                    on_image_for: Callable | None = None, write: bool = True,
                    log: Callable[[str], None] = print) -> SeriesResult:
    """Evaluate ``entries`` with ``evaluate_one(path, on_image)`` (returning the metrics
    dict), reusing the rows of ``cache_path`` evaluated with the same ``settings`` for files
    of unchanged name, size and modification time; ``fresh`` paths are evaluated whatever
    the cache holds, and ``on_image_for(entry)`` gives the ``on_image`` callback for one (the
    HTML report's collector for the final model). ``cache_path`` is rewritten after every
    evaluation, so an interrupted series continues where it stopped (``write=False``: read
    only, for the ranks other than 0 under torchrun)."""
    run_dir, cache_path = Path(run_dir), Path(cache_path)
    cached, why = read_cache(cache_path, settings)
    if why:
        log(why)
    rows: list[dict] = []
    result = SeriesResult(rows, None, None)
    fresh = {Path(p) for p in fresh}
    for entry in entries:
        key = _key(run_dir, entry.path)
        old = cached.get(key["file"])
        if entry.path not in fresh and old is not None and \
                (old.get("size"), old.get("mtime_ns")) == (key["size"], key["mtime_ns"]):
            rows.append({**{k: v for k, v in old.items() if k != "same_as"},
                         "iteration": entry.iteration, "final": entry.final,
                         **({"same_as": entry.same_as} if entry.same_as else {})})
            result.cached.append(key["file"])
            continue
        on_image = on_image_for(entry) if on_image_for is not None else None
        try:
            metrics = evaluate_one(entry.path, on_image)
        except (OSError, ValueError) as e:
            n = len(rows)
            kept = f"; {n} earlier result{'s' if n != 1 else ''} kept in {cache_path}" \
                if rows else ""
            text = str(e) if str(entry.path) in str(e) else f"{entry.path}: {e}"
            raise SeriesError(f"{text} (evaluating the series of {run_dir}{kept}; replace "
                              "or delete that file and run again)") from None
        rows.append(_row(entry, key, metrics, classes))
        result.evaluated.append(key["file"])
        if write:
            write_json(cache_path, run_dir, rows, settings, classes)
    result.final, result.best = choose(rows)
    if write:
        write_json(cache_path, run_dir, rows, settings, classes)
    return result


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"iteration": row["iteration"], "file": row["file"], "miou": row.get("miou"),
            **{k: v for k, v in row.items() if k.startswith("miou_")}}


def write_json(path, run_dir, rows: list[dict], settings: dict, classes) -> None:
    final, best = choose(rows)
    best_brief = _brief(best)
    if best_brief is not None:
        best_brief["selection"] = BEST_LABEL
    data = {"version": CACHE_VERSION, "run": str(run_dir), "settings": settings,
            "classes": list(classes), "final": _brief(final), "best": best_brief,
            "snapshots": rows}
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _file(row: dict) -> str:
    return row["file"] + (f" = {row['same_as']}" if row.get("same_as") else "")


def _it(row: dict) -> str:
    return "?" if row["iteration"] is None else str(row["iteration"])


def markdown(result: SeriesResult, title: str, description: str = "") -> str:
    """``snapshots.md``: a table iteration | mIoU (and the subset mIoUs), then final and
    best."""
    subsets = sorted({k for r in result.rows for k in r if k.startswith("miou_")})
    head = "| iteration | mIoU % |" + "".join(f" mIoU {k[5:]} % |" for k in subsets) + \
        " file |"
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [head, "|" + "---:|" * (2 + len(subsets)) + "---|"]
    for r in result.rows:
        tags = [t for t, on in (("final", r["final"]), ("best", r is result.best)) if on]
        lines.append(f"| {_it(r)}{' (' + ', '.join(tags) + ')' if tags else ''} | "
                     f"{_pct(r.get('miou'))} |" + "".join(f" {_pct(r.get(k))} |"
                                                          for k in subsets)
                     + f" {_file(r)} |")
    lines.append("")
    lines += summary_lines(result)
    return "\n".join(lines) + "\n"


def summary_lines(result: SeriesResult) -> list[str]:
    out = []
    f, b = result.final, result.best
    if f is not None:
        out.append(f"final: mIoU {_pct(f.get('miou'))} at iteration {_it(f)} ({_file(f)})")
    if b is not None:
        out.append(f"best:  mIoU {_pct(b.get('miou'))} at iteration {_it(b)} ({_file(b)}), "
                   f"{BEST_LABEL}")
    chosen = b if result.selection == "best" else f
    if chosen is not None:
        out.append(f"the paper's number (eval.selection {result.selection}): mIoU "
                   f"{_pct(chosen.get('miou'))}")
    return out


def curve(result: SeriesResult, path, title: str = "snapshots") -> None:
    """``snapshots.png``: mIoU against iteration, the best and the final model marked."""
    from ..utils.visualize import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    points = [(r["iteration"], 100 * r["miou"]) for r in result.rows
              if r["iteration"] is not None and r.get("miou") is not None]
    if points:
        ax.plot(*zip(*points), "o-", markersize=3, label="mIoU")
    for row, style, name in ((result.best, "r*", "best (selected on this split)"),
                             (result.final, "ks", "final")):
        if row is not None and row["iteration"] is not None and row.get("miou") is not None:
            ax.plot([row["iteration"]], [100 * row["miou"]], style, markersize=9,
                    fillstyle="none", label=f"{name}: {_pct(row['miou'])}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mIoU %")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_outputs(result: SeriesResult, out_dir, title: str, description: str = "") -> list:
    """``snapshots.md`` and ``snapshots.png`` into ``out_dir`` (``snapshots.json`` is written
    as the series is evaluated); returns their paths."""
    out = Path(out_dir)
    atomic_write_text(out / "snapshots.md", markdown(result, title, description))
    curve(result, out / "snapshots.png", title)
    return [out / "snapshots.json", out / "snapshots.md", out / "snapshots.png"]


def html_section(result: SeriesResult) -> str:
    """The HTML report's section: the curve as an inline SVG (the page stays self-contained)
    and the table, final and best said, best labelled as selected on the evaluated split."""
    import html as _html
    pts = [(r["iteration"], r["miou"]) for r in result.rows
           if r["iteration"] is not None and r.get("miou") is not None]
    svg = ""
    if pts:
        w, h, left, bottom = 520, 200, 50, 30
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 0.01

        def xy(it, m):
            return (left + (w - left - 10) * (it - x0) / span_x,
                    10 + (h - bottom - 10) * (1 - (m - y0) / span_y))
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*p) for p in pts))
        marks = []
        for row, cls in ((result.best, "best"), (result.final, "final")):
            if row is not None and row["iteration"] is not None and row.get("miou") is not None:
                x, y = xy(row["iteration"], row["miou"])
                marks.append(f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="5" '
                             f'fill="none" stroke="{"#c00" if cls == "best" else "#000"}">'
                             f"<title>{cls}: {_pct(row['miou'])}% at {_it(row)}</title>"
                             "</circle>")
        svg = (f'<svg id="snapshot-curve" class="chart" width="{w}" height="{h}" role="img" '
               f'aria-label="mIoU against iteration"><polyline points="{line}" fill="none" '
               f'stroke="#2166ac" stroke-width="1.5"/>{"".join(marks)}'
               f'<text x="{left}" y="{h - 8}" class="tick">{x0}</text>'
               f'<text x="{w - 60}" y="{h - 8}" class="tick">{x1} it</text>'
               f'<text x="{left - 24}" y="{h - bottom}" class="tick">{_pct(y0)}%</text>'
               f'<text x="{left - 24}" y="16" class="tick">{_pct(y1)}%</text></svg>')
    body = "".join(
        f"<tr><td class=\"num\">{_it(r)}</td><td class=\"num\">{_pct(r.get('miou'))}</td>"
        f"<td>{'final' if r['final'] else ''}{' best' if r is result.best else ''}</td>"
        f"<td>{_html.escape(_file(r))}</td></tr>" for r in result.rows)
    summary = "".join(f"<li>{_html.escape(s)}</li>" for s in summary_lines(result))
    return ('<section id="snapshots"><h2>Snapshot series</h2><p class="note">Every snapshot '
            "of the run on this split. <b>final</b> is the model the run ends with; "
            f"<b>best</b> is {_html.escape(BEST_LABEL)}: tuned on the data it is reported "
            f"on.</p><ul>{summary}</ul>{svg}<table id=\"snapshot-table\"><tr><th>iteration"
            f"</th><th>mIoU %</th><th></th><th>file</th></tr>{body}</table></section>")

"""Snapshot series: the weights of a run every ``train.snapshot_every`` iterations.

The domain adaptation papers report numbers picked from a series of snapshots: ADVENT
evaluates ``model_{2000, 4000, ..., 120000}.pth`` on Cityscapes val and reports the best
(``TEST.MODE: best``, ``SNAPSHOT_STEP`` 2000, ``SNAPSHOT_MAXITER`` 120000 in valeoai/ADVENT
``advent/domain_adaptation/config.py``; ``eval_best`` in ``eval_UDA.py``), DACS's README gives
the peak of its every-5000-iterations validation and the final value. A run with
``train.snapshot_every: N`` keeps such a series, and ``deeplabv2 evaluate RUN_DIR``
(:mod:`deeplabv2.evaluation.series`) evaluates it.

A snapshot is ``<out_dir>/snapshots/iter_XXXXXX.pth``: the weights after that many iterations,
written by rank 0 in exactly the format of the run's final ``model.pth``
(:func:`deeplabv2.weights.save_weights`: weights, architecture, preprocessing, classes,
palette; no optimizer, RNG or adaptation state), so ``evaluate``, ``predict`` and ``serve``
take it, and the snapshot at the last iteration is byte-identical to ``model.pth``. It is
written atomically (a temporary file renamed over the final name). Writing one draws no random
number and changes nothing in the run: a run with snapshots trains the same weights as one
without.
"""

from __future__ import annotations

import re
from pathlib import Path

SNAPSHOT_DIR = "snapshots"
#: what ``deeplabv2 evaluate RUN_DIR`` writes into the run folder (an --overwrite removes them)
SERIES_FILES = ("snapshots.json", "snapshots.md", "snapshots.png")
_NAME = re.compile(r"^iter_(\d+)\.pth$")


def snapshot_name(iteration: int) -> str:
    """``iter_XXXXXX.pth`` (six digits at least, so that names sort as iterations do)."""
    return f"iter_{int(iteration):06d}.pth"


def snapshot_path(run_dir, iteration: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / snapshot_name(iteration)


def list_snapshots(run_dir) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` of the run's snapshots, by iteration (other files in
    ``snapshots/`` are ignored)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_snapshot(run_dir, iteration: int, model, classes=None, palette=None) -> Path:
    """Write the snapshot of ``model`` after ``iteration`` iterations; return its path."""
    from .weights import save_weights  # the run's model.pth format, written atomically
    path = snapshot_path(run_dir, iteration)
    save_weights(model, path, classes, palette)
    return path


def remove_snapshots_after(run_dir, iteration: int) -> list[Path]:
    """Delete the snapshots taken after ``iteration``: a run resumed from a checkpoint of
    ``iteration`` replaces that continuation, and its series must not mix the two (a run
    resumed from its ``last.pth`` writes those iterations again). Returns what was removed."""
    removed = []
    for it, p in list_snapshots(run_dir):
        if it > iteration:
            p.unlink()
            removed.append(p)
    return removed

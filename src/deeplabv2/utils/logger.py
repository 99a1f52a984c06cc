"""What a training run reports as it goes: a progress bar, the mean loss of every ``log_every``
window (``history.json`` and TensorBoard), and the validation scores beside it.

Each rank keeps the history (it is returned by ``train``); only the main rank shows a progress
bar, writes TensorBoard and saves ``history.json``, so the loop builds a :class:`TrainLog` with
those switched off elsewhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .fileio import atomic_write_text


def read_history(path: Path) -> list[dict]:
    """The entries a resumed run's ``history.json`` holds (none when it has none)."""
    return json.loads(path.read_text()) if path.is_file() else []


class TrainLog:
    """The log of iterations ``start + 1 .. stop``; ``history`` holds the entries of earlier
    iterations of the run (a resume) and receives one ``{"iteration", "loss", "lr",
    "seconds_per_iteration"}`` entry per ``log_every`` window (and a last one at ``stop``)."""

    def __init__(self, start: int, stop: int, log_every: int, history: list[dict], *,
                 progress: bool = False, tensorboard: Path | None = None):
        self.start, self.stop, self.log_every = start, stop, log_every
        self.history = history
        self.writer = _tensorboard(tensorboard) if tensorboard is not None else None
        self._bar = _progress(start, stop) if progress else _NoProgress()
        self._window_loss, self._window_start = 0.0, time.perf_counter()

    def iteration(self, iteration: int, loss: float, lr: float, scalars: dict) -> None:
        """After optimizer step ``iteration`` (1-based): ``loss`` its mean loss over ranks,
        ``scalars`` more TensorBoard scalars of this step (the adaptation method's terms)."""
        self._window_loss += loss
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if iteration % self.log_every != 0 and iteration != self.stop:
            return
        # The first window of a resumed run may be shorter (it starts mid-window).
        n = (iteration - self.start) % self.log_every or self.log_every
        elapsed = time.perf_counter() - self._window_start
        entry = {"iteration": iteration, "loss": self._window_loss / n, "lr": lr,
                 "seconds_per_iteration": elapsed / n}
        self.history.append(entry)
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, iteration)
            self.writer.add_scalar("train/loss", entry["loss"], iteration)
            self.writer.add_scalar("train/lr", lr, iteration)
            self.writer.add_scalar("train/seconds_per_iteration", entry["seconds_per_iteration"],
                                   iteration)
        self._window_loss, self._window_start = 0.0, time.perf_counter()

    def validation(self, iteration: int, miou: float,
                   samples: Callable[[], dict] | None = None,
                   protocol: dict | None = None) -> None:
        """Validation after step ``iteration``: its mIoU beside that step's history entry (for
        the curves), and in TensorBoard with the images ``samples()`` returns (``{tag: HWC
        uint8 array}``; called only when there is a TensorBoard to show them). ``protocol``
        (the evaluation protocol: its name and settings) is recorded beside the mIoU as
        ``val_protocol``."""
        if self.history and self.history[-1]["iteration"] == iteration:
            self.history[-1]["val_miou"] = miou
            if protocol is not None:
                self.history[-1]["val_protocol"] = protocol
        if self.writer:
            self.writer.add_scalar("val/mIoU", miou, iteration)
            for tag, image in (samples() if samples else {}).items():
                self.writer.add_image(tag, image, iteration, dataformats="HWC")

    def save_history(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.history, indent=2))

    def close_progress(self) -> None:
        """End the progress bar (before an error message, so that it prints on a line of its
        own)."""
        self._bar.close()

    def close(self) -> None:
        self._bar.close()
        if self.writer:
            self.writer.close()


def _tensorboard(path: Path):
    try:  # imported only for a run that writes TensorBoard: a quarter second of start-up
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a trimmed install may lack it
        print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))


class _NoProgress:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(start: int, total: int):
    from tqdm.auto import tqdm  # imported only when a bar is shown (70 ms of start-up)
    return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

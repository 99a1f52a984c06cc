"""Segmentation metrics from a confusion matrix, accumulated over batches and DDP ranks.

Definitions (``M[g, p]``: pixels of ground-truth class ``g`` predicted as ``p``; pixels whose
ground truth is ``ignore_index`` or outside ``0..C-1`` are not counted)::

    IoU_c            = M[c, c] / (sum_p M[c, p] + sum_g M[g, c] - M[c, c])
    mIoU             = mean of IoU_c over the classes present in ground truth or prediction
    pixel accuracy   = sum_c M[c, c] / sum M
    class accuracy_c = M[c, c] / sum_p M[c, p];  mean class accuracy over classes in ground truth
    fwIoU            = sum_c freq_c * IoU_c,  freq_c = sum_p M[c, p] / sum M

Ground-truth pixels predicted as "no class" (``void_index`` of :meth:`ConfusionMatrix.update`)
add to their row sums only: misses of their class, false positives of none.

These are the numbers reported by the DeepLab papers (mean IoU over the classes, pixels of the
whole split pooled, not averaged per image) and by the official Cityscapes evaluator.

A class absent from both ground truth and prediction has IoU NaN and is left out of the mean;
a class that is predicted but absent from ground truth has IoU 0 and pulls the mean down.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import torch
import torch.distributed as dist

from ..utils.fileio import atomic_write_text


class ConfusionMatrix:
    """Pixel counts ``(C, C)`` int64, rows = ground truth, columns = prediction.

    ``counts`` is ``(C, C + 1)``: the extra last column counts ground-truth pixels that received
    *no* class (see ``void_index`` in :meth:`update`); it is zero unless you ask for that. The
    counts live on ``device``, or (when ``device`` is None) follow the tensors of the first
    :meth:`update`, so that :meth:`reduce_` can use NCCL on GPU tensors.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._follow_data = device is None
        self.counts = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.int64,
                                  device=device)

    @classmethod
    def from_counts(cls, counts, ignore_index: int = 255) -> "ConfusionMatrix":
        """A matrix holding ``counts`` already made elsewhere: ``(C, C + 1)`` integer counts in
        the layout of :attr:`counts` (the last column: ground truth predicted as no class), a
        tensor or array. For code that counts its own way (e.g. one image at a time, faster
        than :meth:`update` on large label maps) and takes its numbers from :meth:`compute`."""
        counts = torch.as_tensor(counts)
        if counts.ndim != 2 or counts.shape[1] != counts.shape[0] + 1:
            raise ValueError(f"counts must be (C, C + 1), got {tuple(counts.shape)}")
        if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise TypeError(f"counts must be integers, got {counts.dtype}")
        cm = cls(counts.shape[0], ignore_index, device=counts.device)
        cm.counts += counts.to(torch.int64)
        return cm

    @property
    def matrix(self) -> torch.Tensor:
        """``(C, C)`` int64 view: ``matrix[g, p]`` pixels of class ``g`` predicted as ``p``."""
        return self.counts[:, :self.num_classes]

    @property
    def missed(self) -> torch.Tensor:
        """``(C,)`` int64 view: pixels of each class predicted as ``void_index`` (no class)."""
        return self.counts[:, self.num_classes]

    @torch.no_grad()
    def update(self, pred, target, *, void_index: int | None = None) -> None:
        """Count one batch: ``pred`` and ``target`` are integer tensors (or arrays) of one shape.

        Every counted pixel (``target`` in ``0..C-1``) must have a prediction in ``0..C-1``,
        else ``ValueError``. ``void_index``: a prediction value meaning "no class"; such pixels
        are misses of their ground-truth class and false positives of none, which is how the
        official Cityscapes evaluator scores a prediction with a non-evaluated label id.
        """
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}")
        if pred.is_floating_point() or pred.is_complex() or pred.dtype == torch.bool:
            raise TypeError(f"prediction must hold integer class indices, got {pred.dtype} "
                            "(take the argmax of the logits first)")
        if self._follow_data and self.counts.device != target.device:
            self.counts = self.counts.to(target.device)
        self._follow_data = False
        pred = pred.to(self.counts.device, torch.int64).flatten()
        target = target.to(self.counts.device, torch.int64).flatten()

        C = self.num_classes
        valid = (target != self.ignore_index) & (target >= 0) & (target < C)
        pred, target = pred[valid], target[valid]
        bad = (pred < 0) | (pred >= C)
        if void_index is not None:
            bad &= pred != void_index
            pred = torch.where(pred == void_index, C, pred)  # the "missed" column
        if bad.any():
            raise ValueError(f"prediction value {int(pred[bad][0])} is outside 0..{C - 1} "
                             f"(num_classes={C})")
        self.counts += torch.bincount(target * (C + 1) + pred,
                                      minlength=C * (C + 1)).view(C, C + 1)

    def reset(self) -> None:
        self.counts.zero_()

    def reduce_(self, group=None) -> "ConfusionMatrix":
        """Sum the counts of all ranks in place (a no-op without an initialised process group).

        Call it once, after the last :meth:`update`: a second call would count twice.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        return self

    def compute(self) -> dict:
        """Metrics as plain Python numbers, fractions in ``[0, 1]``, NaN where undefined.

        Returns ``{"iou": [C floats], "class_accuracy": [C floats], "miou", "pixel_accuracy",
        "mean_class_accuracy", "fw_iou", "pixels"}`` (``pixels``: the number counted).
        """
        counts = self.counts.detach().to("cpu", torch.float64)
        matrix = counts[:, :self.num_classes]
        tp = matrix.diagonal()
        gt_pixels = counts.sum(1)  # includes the misses of the void column
        predicted = matrix.sum(0)
        total = gt_pixels.sum()
        iou = tp / (gt_pixels + predicted - tp)  # 0 / 0 = NaN: class absent from both
        class_accuracy = tp / gt_pixels  # NaN: class absent from ground truth
        present = gt_pixels > 0
        return {
            "iou": iou.tolist(),
            "class_accuracy": class_accuracy.tolist(),
            "miou": float(iou.nanmean()),
            "pixel_accuracy": float(tp.sum() / total),
            "mean_class_accuracy": float(class_accuracy.nanmean()),
            "fw_iou": float((gt_pixels[present] * iou[present]).sum() / total),
            "pixels": int(self.counts.sum()),
        }

    def state_dict(self) -> dict:
        """``{"num_classes", "ignore_index", "counts"}`` (CPU int64), loadable with
        ``torch.load(weights_only=True)``."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "counts": self.counts.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self._check_compatible(state)
        self.counts = state["counts"].to(self.counts.device, torch.int64).clone()

    def merge(self, other: "ConfusionMatrix | dict") -> "ConfusionMatrix":
        """Add the counts of another matrix or of a saved :meth:`state_dict`; returns self."""
        state = other.state_dict() if isinstance(other, ConfusionMatrix) else other
        self._check_compatible(state)
        self.counts += state["counts"].to(self.counts.device, torch.int64)
        return self

    def _check_compatible(self, state: dict) -> None:
        expected = (self.num_classes, self.num_classes + 1)
        if (state["num_classes"] != self.num_classes or state["ignore_index"] != self.ignore_index
                or tuple(state["counts"].shape) != expected):
            raise ValueError(f"confusion matrix of {state['num_classes']} classes (ignore "
                             f"{state['ignore_index']}, counts {tuple(state['counts'].shape)}) "
                             f"cannot merge into one of {self.num_classes} classes (ignore "
                             f"{self.ignore_index}, counts {expected})")

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, "
                f"ignore_index={self.ignore_index}, pixels={int(self.counts.sum())})")


_SUMMARY = (("mIoU", "miou"), ("fwIoU", "fw_iou"), ("pixel accuracy", "pixel_accuracy"),
            ("mean class accuracy", "mean_class_accuracy"))


def add_subset_mious(results: dict, dataset) -> dict:
    """Add ``miou_<name>``: the mean IoU over a subset of the classes that the dataset's
    protocol also reports (``dataset.miou_subsets``: {name: class indices}; e.g. the 13 of
    SYNTHIA -> Cityscapes' "mIoU*" from a 16-class evaluation). Returns ``results``."""
    for name, indices in getattr(dataset, "miou_subsets", {}).items():
        values = [results["iou"][i] for i in indices if not math.isnan(results["iou"][i])]
        results[f"miou_{name}"] = sum(values) / len(values) if values else float("nan")
    # ``dataset.miou_scaled``: {name: n}, the mIoU over all classes rescaled to n of them (the
    # DAFormer family's SYNTHIA number: mIoU16 = mIoU19 * 19 / 16, absent classes counted 0)
    for name, n in getattr(dataset, "miou_scaled", {}).items():
        results[f"miou_{name}"] = results["miou"] * len(results["iou"]) / n
    return results


def format_table(results: dict, class_names: Sequence[str]) -> str:
    """A text table of per-class IoU and accuracy in percent, then the summary metrics.

    ``-`` marks an undefined value (IoU of a class absent from ground truth and prediction,
    accuracy of a class absent from ground truth).
    """
    _check_names(results, class_names)

    def pct(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:.2f}"

    width = max([len(n) for n in class_names] + [len(label) for label, _ in _SUMMARY])
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'acc %':>7}"]
    lines += [f"{name:<{width}}  {pct(iou):>7}  {pct(acc):>7}"
              for name, iou, acc in zip(class_names, results["iou"], results["class_accuracy"])]
    lines.append("-" * (width + 18))
    lines += [f"{label:<{width}}  {pct(results[key]):>7}" for label, key in _SUMMARY]
    lines += [f"{'mIoU over ' + key[len('miou_'):]:<{width}}  {pct(value):>7}"
              for key, value in results.items() if key.startswith("miou_")]
    lines.append(f"{'pixels':<{width}}  {results['pixels']:>7}")
    return "\n".join(lines)


def save_json(results: dict, class_names: Sequence[str], path) -> None:
    """Write the metrics to ``path`` as JSON (fractions in ``[0, 1]``, NaN as ``null``).

    Layout: ``{"miou", "fw_iou", "pixel_accuracy", "mean_class_accuracy", "pixels",
    "classes": {name: {"iou", "accuracy"}}}``, then any other entries of ``results`` as they are
    (e.g. ``"confusion"`` added by :func:`deeplabv2.evaluation.evaluate.evaluate`). The file is written to a
    temporary file in the same folder and renamed over ``path``, so a reader never sees half a
    file.
    """
    _check_names(results, class_names)
    if len(set(class_names)) != len(class_names):
        raise ValueError("class names must be unique to key the JSON per class")
    data = {key: _nan_to_none(results[key]) for _, key in _SUMMARY}
    data["pixels"] = int(results["pixels"])
    data["classes"] = {name: {"iou": _nan_to_none(iou), "accuracy": _nan_to_none(acc)}
                       for name, iou, acc in zip(class_names, results["iou"],
                                                 results["class_accuracy"])}
    known = {"iou", "class_accuracy", *data}
    data.update({k: _nan_to_none(v) for k, v in results.items() if k not in known})
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"

    atomic_write_text(path, text)


def _nan_to_none(x):
    """``x`` with every NaN float replaced by None, through lists, tuples and dicts."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _check_names(results: dict, class_names: Sequence[str]) -> None:
    if len(class_names) != len(results["iou"]):
        raise ValueError(f"{len(class_names)} class names for {len(results['iou'])} classes")

"""Score a folder of saved prediction PNGs against the ground truth of a dataset split.

Which file belongs to which sample:

* **Cityscapes** (every image of the split is named ``{city}_{seq}_{frame}_leftImg8bit.png``,
  the official layout): a prediction is any ``{city}_{seq}_{frame}*.png`` anywhere under the
  folder, as in the official submission format and ``evalPixelLevelSemanticLabeling.py``. It
  holds Cityscapes *label ids* (the submission format) or *train ids*, see ``id_format``.
  When a frame has both ``{frame}..._labelIds.png`` and another PNG (what ``deeplabv2 predict
  --cityscapes-ids`` writes: the label ids and the palette train-id map), the label id file is
  scored (``id_format="train"`` takes the other one), so ``predict -> score`` needs no renaming.
* **Any other dataset**: ``{pred_dir}/{dataset.name(i)}.png`` holding train ids.

The result says which files were used: ``"files": {"matched": count, "extra": [names of PNG
files that matched no sample; legend.png is not counted]}``. A missing prediction is an error
that counts them and names the first ones.

A prediction pixel may hold "no class": 255 in a train id file, or a label id that is not
evaluated (0 ``unlabeled``, 4 ``static``, ...) in a label id file. It counts as a miss of its
ground-truth class and a false positive of no class, exactly as in the official Cityscapes
evaluator, so that our mIoU equals the one it reports for the same files.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..data.cityscapes_labels import IGNORE_INDEX, LABEL_TO_TRAIN, LABELS, NUM_CLASSES
from ..data.base import DatasetError, check_label_values, read_label_png
from .metrics import ConfusionMatrix

ID_FORMATS = ("auto", "label", "train")
_VOID = 255  # "no class" in a train id prediction
_CITYSCAPES_IMAGE = re.compile(r"^([^_]+_\d{6}_\d{6})_leftImg8bit$")
_CITYSCAPES_PREDICTION = re.compile(r"^([^_]+_\d{6}_\d{6}).*\.png$")
# Values that settle id_format="auto": label ids that are no train id (19..33), and train ids or
# 255 that are no evaluated label id, so a model writing label ids does not produce them. 0 is
# in neither: road as a train id, "unlabeled" (often written for void) as a label id.
_ONLY_LABEL_IDS = frozenset(range(NUM_CLASSES, len(LABELS)))
_ONLY_TRAIN_IDS = frozenset([_VOID] + [v for v in range(1, NUM_CLASSES)
                                       if LABEL_TO_TRAIN[v] == IGNORE_INDEX])


class ScoreError(ValueError):
    """Predictions that cannot be scored; the message names the file and what is wrong."""


def score_folder(pred_dir, dataset, *, id_format: str = "auto", on_image=None) -> dict:
    """Score the predictions in ``pred_dir`` against every sample of ``dataset``.

    ``dataset`` follows :class:`deeplabv2.data.base.SegmentationDataset` (``samples``,
    ``read_label`` or ``load``, ``num_classes``, ``name``). ``id_format`` says what the
    Cityscapes prediction files hold: ``"label"`` (label ids 0..33, the official submission
    format), ``"train"`` (train ids 0..18, 255 = no class) or ``"auto"``, decided once for the
    whole set of files from the values they contain:

    1. a value in 19..33 (a label id, never a train id) means label ids;
    2. otherwise 255 or a value in {1..6, 9, 10, 14, 15, 16, 18} (a train id, but a label id
       that is not evaluated, so not written by a model that predicts label ids) means train ids;
    3. otherwise every value is one of {0, 7, 8, 11, 12, 13, 17}, valid in both encodings with
       different meanings: ``ScoreError`` asking for an explicit ``id_format``.

    Other datasets take train ids (``"auto"`` or ``"train"``). A missing prediction, a
    prediction whose size differs from its ground truth, or a value valid in neither encoding
    raises :class:`ScoreError` naming the file. Returns :meth:`ConfusionMatrix.compute`'s dict.

    ``on_image(index, label, pred)``, when given, is called for every sample once the files are
    known to be valid, with the ground truth (train ids, 255 = ignore) and the prediction as
    class indices ``(H, W)`` int64 (``num_classes`` = no class); the files are read again for it.
    """
    if id_format not in ID_FORMATS:
        raise ValueError(f"id_format must be one of {ID_FORMATS}, got {id_format!r}")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise ScoreError(f"{pred_dir}: prediction folder not found")
    if len(dataset) == 0:
        raise ScoreError("the dataset split has no samples to score")
    C = dataset.num_classes
    cityscapes = bool(dataset.samples) and all(
        _CITYSCAPES_IMAGE.match(Path(image).stem) for image, _ in dataset.samples)
    if cityscapes:
        if C != NUM_CLASSES:
            raise ScoreError(f"a Cityscapes split must have {NUM_CLASSES} classes, not {C}")
        pred_files, extra = _match_cityscapes(pred_dir, dataset, id_format)
        if id_format == "auto" and all(p.name.endswith("_labelIds.png") for p in pred_files):
            id_format = "label"  # the official submission naming says what the files hold
    else:
        if id_format == "label":
            raise ScoreError("id_format='label' is for Cityscapes label ids; predictions of "
                             f"{type(dataset).__name__} hold train ids")
        pred_files = [pred_dir / f"{dataset.name(i)}.png" for i in range(len(dataset))]
        missing = [p for p in pred_files if not p.is_file()]
        if missing:
            raise ScoreError(f"{missing[0]}: prediction not found ({len(missing)} of "
                             f"{len(pred_files)} missing: "
                             f"{_some(p.name for p in missing)})")
        expected = {p.resolve() for p in pred_files}
        extra = [p for p in sorted(pred_dir.rglob("*.png")) if p.resolve() not in expected
                 and p.name != "legend.png"]

    # One pass over the files: count (ground-truth train id, raw prediction value) pairs, decide
    # what the raw values mean once all are seen, then fold the 256 columns into C classes.
    joint = np.zeros((C, 256), dtype=np.int64)
    first_file_with: dict[int, Path] = {}  # raw value -> first file holding it, for messages
    for i, pred_path in enumerate(pred_files):
        gt = _ground_truth(dataset, i)
        pred = _read_prediction(pred_path)
        if pred.shape != gt.shape:
            raise ScoreError(f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} but "
                             f"ground truth of {dataset.name(i)} is {gt.shape[1]}x{gt.shape[0]}")
        for value in np.flatnonzero(np.bincount(pred.ravel(), minlength=256)):
            first_file_with.setdefault(int(value), pred_path)
        valid = gt < C  # drops 255 = ignore
        joint += np.bincount(gt[valid].astype(np.int64) * 256 + pred[valid],
                             minlength=C * 256).reshape(C, 256)

    fmt = id_format if cityscapes else "train"
    if fmt == "auto":
        fmt = _guess_id_format(set(first_file_with), pred_dir)
    to_class = _value_to_class(C, fmt)
    for value, path in sorted(first_file_with.items()):
        if to_class[value] < 0:
            what = ("a Cityscapes label id (0..33)" if fmt == "label"
                    else f"a train id (0..{C - 1}) or {_VOID} (no class)")
            how = f" (id_format={id_format!r} read the files as {fmt} ids)" if cityscapes else ""
            raise ScoreError(f"{path}: value {value} is not {what}{how}")

    if on_image is not None:  # a second pass, now that the meaning of the values is known
        for i, pred_path in enumerate(pred_files):
            on_image(i, _ground_truth(dataset, i), to_class[_read_prediction(pred_path)])

    cm = ConfusionMatrix(C)
    counts = np.zeros((C, C + 1), dtype=np.int64)  # last column: no class
    for value in range(256):
        if to_class[value] >= 0:
            counts[:, to_class[value]] += joint[:, value]
    cm.counts += torch.from_numpy(counts)
    results = cm.compute()
    results["files"] = {"matched": len(pred_files),
                        "extra": [str(p.relative_to(pred_dir)) for p in extra]}
    return results


def describe_files(files: dict) -> str:
    """One line: how many predictions matched, and which files were extra."""
    line = f"{files['matched']} prediction files matched the ground truth"
    if files["extra"]:
        line += (f"; {len(files['extra'])} other PNG files ignored: "
                 f"{_some(files['extra'])}")
    return line


def _some(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _match_cityscapes(pred_dir: Path, dataset, id_format: str) -> tuple[list[Path], list[Path]]:
    """The prediction file of every sample, by the ``city_seq_frame`` prefix of its name, and
    the PNG files that are no sample's prediction."""
    by_frame: dict[str, list[Path]] = {}
    pngs = sorted(pred_dir.rglob("*.png"))
    for path in pngs:
        m = _CITYSCAPES_PREDICTION.match(path.name)
        if m:
            by_frame.setdefault(m.group(1), []).append(path)
    files, missing = [], []
    for image, _ in dataset.samples:
        frame = _CITYSCAPES_IMAGE.match(Path(image).stem).group(1)
        found = by_frame.get(frame, [])
        if len(found) > 1:  # predict --cityscapes-ids: {frame}_labelIds.png beside {frame}.png
            ids = [p for p in found if p.name.endswith("_labelIds.png")]
            others = [p for p in found if not p.name.endswith("_labelIds.png")]
            pick = others if id_format == "train" else ids
            if len(pick) == 1:
                found = pick
        if len(found) > 1:
            raise ScoreError(f"{found[0]}, {found[1]}: several predictions for {frame}")
        (files if found else missing).append(found[0] if found else frame)
    if missing:
        raise ScoreError(f"{pred_dir / missing[0]}*.png: prediction not found ({len(missing)} "
                         f"of {len(dataset)} missing: {_some(missing)})")
    frames = {_CITYSCAPES_IMAGE.match(Path(image).stem).group(1) for image, _ in dataset.samples}
    extra = [p for p in pngs if p.name != "legend.png" and not (
        (m := _CITYSCAPES_PREDICTION.match(p.name)) and m.group(1) in frames)]
    return files, extra


def _guess_id_format(values: set[int], pred_dir: Path) -> str:
    """``"label"`` or ``"train"`` from the values of all files (rule in :func:`score_folder`)."""
    if values & _ONLY_LABEL_IDS:
        return "label"
    if values & _ONLY_TRAIN_IDS:
        return "train"
    raise ScoreError(f"{pred_dir}: the predictions hold only the values {sorted(values)}, which "
                     "are Cityscapes label ids and train ids alike (with different meanings); "
                     "pass id_format='label' or id_format='train'")


def _value_to_class(num_classes: int, id_format: str) -> np.ndarray:
    """``(256,)`` int64: raw value -> class column, ``num_classes`` = no class, -1 = invalid."""
    out = np.full(256, -1, dtype=np.int64)
    if id_format == "label":
        label_ids = [label.label_id for label in LABELS]
        out[label_ids] = LABEL_TO_TRAIN[label_ids]
        out[out == IGNORE_INDEX] = num_classes
    else:
        out[:num_classes] = np.arange(num_classes)
        out[_VOID] = num_classes
    return out


def _ground_truth(dataset, i: int) -> np.ndarray:
    """Train-id labels of sample ``i``: read without decoding the image where the dataset lists
    files and its labels need no resizing to the image; else through ``load``."""
    if not dataset.samples:  # generated data (the synthetic set)
        return dataset.load(i)[1]
    label_path = dataset.samples[i][1]
    if label_path is None:
        raise ScoreError(f"{dataset.samples[i][0]}: sample has no ground truth to score")
    if getattr(dataset, "labels_match_images", True):
        label = dataset.read_label(label_path)
        check_label_values(label, dataset.num_classes, label_path,
                           getattr(dataset, "ignore_index", IGNORE_INDEX))
        return label
    return dataset.load(i)[1]


def _read_prediction(path: Path) -> np.ndarray:
    """Single-channel PNG as ``uint8`` ``(H, W)``; palette PNGs give their indices."""
    try:
        return read_label_png(path)
    except DatasetError as e:
        raise ScoreError(f"prediction {e}") from None  # "prediction PATH: what is wrong"

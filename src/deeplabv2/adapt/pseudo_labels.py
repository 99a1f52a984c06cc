"""FDA's self-training round (Yang & Soatto, CVPR 2020, Sec. 3.3): pseudo-labels of the target
training images from an adapted network (or FDA's multi-band ensemble), then a second training
run with them as target labels (``adapt.target_labels``).

How the released code does it (YanchaoYang/FDA):

* ``getSudoLabel_multi.py``: every target training image (``cityscapesDataSet``, resized to
  1024x512, the size the adaptation run trains on) through the three networks of beta 0.01,
  0.05, 0.09; their softmax outputs (the scores upsampled to the input size first) averaged;
  per pixel the class (argmax) and its confidence (max). For each class ``c``, over *all*
  pixels of *all* images predicted as ``c``: the confidences sorted ascending and the one at
  index ``round(0.66 * n)`` taken (the 66th percentile, not the median); a class no pixel is
  predicted as gets 0; every threshold is then capped at 0.9. A pixel whose confidence is below
  its class's threshold becomes 255 (ignored). One label PNG of train ids per image.
* ``SStrain.py`` (README step 5): a new run from the same ImageNet init as the first one
  (``--init-weights``, not the adapted weights), the same schedule, with one more term: the
  cross-entropy (weight 1, 255 ignored) on a pseudo-labelled target image, and the Charbonnier
  entropy (``--entW``) on that image from the first step (``switch2entropy`` is not read).

:func:`make_pseudo_labels` is ``deeplabv2 pseudo-label``; :class:`PseudoLabelled` reads its
folder back as the target set's labels. Where this differs from the released script: the
ensemble averages with equal weights 1/3 (the script: 0.3333, 0.3333, 0.3334); a class with a
single predicted pixel takes that pixel's confidence (the script's index ``round(0.66)`` = 1
is past its end); the percentile is exact but computed from per-pixel confidences cached on
disk in ``DIR/.cache`` (5 bytes a pixel at the inference size: about 7.8 GB for the 2975
Cityscapes training images at 1024x512; the script holds them in memory as float64) with two
passes of histograms over their float32 bit patterns, not one sort.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from ..data.base import (IGNORE_INDEX, DatasetError, SegmentationDataset, check_label_values,
                         read_label_png)
from ..inference.front import segment
from ..utils.fileio import atomic_write_buffered, atomic_write_text

#: the released script's per-class threshold: the confidence at this fraction of the sorted
#: confidences of the class's pixels, capped at :data:`CAP`
PERCENTILE = 0.66
CAP = 0.9
#: the folder's record of how it was made; it is written last, so its presence marks a finished
#: folder
META = "thresholds.json"
CACHE = ".cache"
_BINS = 1 << 16


def percentile_index(n: int, percentile: float = PERCENTILE) -> int:
    """The index into ``n`` sorted confidences that the released script takes:
    ``round(n * 0.66)`` (NumPy's round, half to even), kept inside the array (n >= 1)."""
    return min(int(np.round(n * percentile)), n - 1)


def class_thresholds(read_pairs: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                     num_classes: int, percentile: float = PERCENTILE,
                     cap: float = CAP) -> tuple[np.ndarray, np.ndarray]:
    """The released script's per-class thresholds over every pixel of every image:
    ``(thresholds float64 (C,), predicted pixels int64 (C,))``.

    ``read_pairs()`` yields ``(confidence float32 (H, W), class uint8 (H, W))`` per image and is
    called twice (the pairs are not held in memory): the first pass counts each class's pixels
    in 65536 bins of the top 16 bits of the confidences' float32 bit patterns (a non-negative
    float32's bits order as its value), which finds the bin of the wanted order statistic; the
    second counts the low 16 bits inside that bin, which gives it exactly."""
    c = int(num_classes)
    top = np.zeros(c * _BINS, np.int64)
    for conf, label in read_pairs():
        bits, label = _bits(conf, label, c)
        top += np.bincount(label * _BINS + (bits >> 16), minlength=c * _BINS)
    top = top.reshape(c, _BINS)
    counts = top.sum(1)
    wanted_bin = np.full(c, -1, np.int64)
    rank = np.zeros(c, np.int64)
    for k in np.flatnonzero(counts):
        index = percentile_index(int(counts[k]), percentile)
        cum = np.cumsum(top[k])
        b = int(np.searchsorted(cum, index, side="right"))
        wanted_bin[k], rank[k] = b, index - (int(cum[b - 1]) if b else 0)
    low = np.zeros(c * _BINS, np.int64)
    for conf, label in read_pairs():
        bits, label = _bits(conf, label, c)
        inside = (bits >> 16) == wanted_bin[label]
        low += np.bincount(label[inside] * _BINS + (bits[inside] & 0xFFFF), minlength=c * _BINS)
    low = low.reshape(c, _BINS)
    thresholds = np.zeros(c, np.float64)
    for k in np.flatnonzero(counts):
        j = int(np.searchsorted(np.cumsum(low[k]), rank[k], side="right"))
        value = np.array([(int(wanted_bin[k]) << 16) | j], np.uint32).view(np.float32)[0]
        thresholds[k] = float(value)
    thresholds[thresholds > cap] = cap
    return thresholds, counts


def _bits(conf: np.ndarray, label: np.ndarray, num_classes: int):
    """The float32 bit patterns and classes (int64) of the pixels with a class."""
    conf = np.ascontiguousarray(conf, dtype=np.float32).ravel()
    label = np.asarray(label).ravel().astype(np.int64)
    keep = label < num_classes
    if conf.size and float(conf.min()) < 0:
        raise ValueError("confidences must be >= 0")
    return conf.view(np.uint32)[keep].astype(np.int64), label[keep]


def apply_thresholds(conf: np.ndarray, label: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``label`` (uint8) with 255 where the confidence is below its class's threshold (the
    released script: ``label[(prob < thres[i]) * (label == i)] = 255`` for every class i)."""
    out = np.array(label, dtype=np.uint8)
    has_class = out < len(thresholds)
    below = np.zeros(out.shape, bool)
    below[has_class] = conf[has_class].astype(np.float64) < thresholds[out[has_class]]
    out[below] = IGNORE_INDEX
    return out


# -- the command ----------------------------------------------------------------------------------
def target_dataset(cfg) -> SegmentationDataset:
    """The target training set of config ``cfg`` as the training loop builds it (the same seed:
    ``train.seed + 1``, which makes the synthetic target scenes)."""
    from ..data import build_dataset
    a = cfg.adapt
    if not a.target_dataset:
        raise ValueError("the config has no adapt.target_dataset: pseudo-labels are made for "
                         "an adaptation config's target training images")
    return build_dataset(a.target_dataset, a.target_root, a.target_split,
                         seed=cfg.train.seed + 1, **a.target_options)


class _Resized(torch.utils.data.Dataset):
    """Index, the image as the target's training transform sizes it, and its original
    ``(H, W)``: resized to exactly ``size`` ``(h, w)`` with ``image_filter`` when given
    (``adapt.target_resize``), then by ``scale`` (PIL bilinear, ``round(side * scale)``)."""

    def __init__(self, dataset, scale: float, size=None, image_filter: str = "bilinear"):
        self.dataset, self.scale = dataset, float(scale)
        self.size = tuple(size) if size else None
        self.filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[image_filter]

    def __len__(self) -> int:
        return len(self.dataset)

    def inference_size(self, h: int, w: int) -> tuple[int, int]:
        if self.size:
            h, w = self.size
        return max(1, round(h * self.scale)), max(1, round(w * self.scale))

    def __getitem__(self, index: int):
        image, _ = self.dataset.load(index)
        h, w = image.shape[:2]
        if self.size and self.size != (h, w):
            image = np.asarray(Image.fromarray(image).resize(self.size[::-1], self.filter))
        sh, sw = self.inference_size(h, w)
        if (sh, sw) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))
        return index, torch.from_numpy(np.array(image)), torch.tensor([h, w])


def make_pseudo_labels(net, dataset: SegmentationDataset, out_dir, *, scale: float = 1.0,
                       size=None, resize_filter: str = "bilinear", device="cpu", num_workers: int = 0, sources: list[str] | None = None,
                       progress: bool = True) -> dict:
    """Write ``out_dir/<name>.png`` (train ids, 255 ignored) for every image of ``dataset``,
    and ``out_dir/thresholds.json``; return what the json holds.

    ``net`` (a model or an :class:`~deeplabv2.inference.ensemble.Ensemble`, in eval mode) runs
    through :func:`deeplabv2.inference.front.segment` on each image at the size the target is
    trained at: resized to ``size`` with ``resize_filter`` when given (``adapt.target_resize``:
    the released code's 1024x512, bicubic), then by ``scale``; the
    thresholds come from those confidences (:func:`class_thresholds`); the labels are written
    at the image's own size (nearest), so that they read back beside it and the target's
    training transform shrinks them back (exactly, for scales 1 and 1/2)."""
    out = Path(out_dir)
    if (out / META).exists():
        raise FileExistsError(f"{out / META}: {out} already holds pseudo-labels; write them "
                              "to another folder (-o) or delete this one")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    num_classes = int(net.num_classes)
    if num_classes != dataset.num_classes:
        raise ValueError(f"the network has {num_classes} classes, the target set "
                         f"{dataset!r} {dataset.num_classes}")
    if len(dataset) == 0:
        raise DatasetError(f"{dataset!r}: no target images to label")
    cache = out / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    resize = list(size) if size else None  # (``size`` names each image's below)
    resized = _Resized(dataset, scale, resize, resize_filter)
    _require_space(cache, dataset, resized)
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(resized, batch_size=None,
                                         num_workers=num_workers)
    sizes: dict[int, tuple[int, int]] = {}
    for index, image, size in loader:
        index = int(index)
        result = segment(net, image[None], device=device)
        conf, label = result.probs[0].max(0)
        np.save(cache / f"{index}.conf.npy", conf.float().cpu().numpy())
        np.save(cache / f"{index}.label.npy", label.to(torch.uint8).cpu().numpy())
        sizes[index] = (int(size[0]), int(size[1]))
        if progress and (index + 1) % 100 == 0:
            print(f"{index + 1}/{len(dataset)} images labelled", flush=True)

    def pairs():
        for i in range(len(dataset)):
            yield np.load(cache / f"{i}.conf.npy"), np.load(cache / f"{i}.label.npy")

    thresholds, predicted = class_thresholds(pairs, num_classes)
    kept = np.zeros(num_classes, np.int64)
    inference_size = None
    for i, (conf, label) in enumerate(pairs()):
        labels = apply_thresholds(conf, label, thresholds)
        inference_size = inference_size or list(labels.shape)
        kept += np.bincount(labels[labels < num_classes], minlength=num_classes)
        h, w = sizes[i]
        full = Image.fromarray(labels)
        if labels.shape != (h, w):
            full = full.resize((w, h), Image.NEAREST)
        atomic_write_buffered(out / f"{dataset.name(i)}.png",
                              lambda f, im=full: im.save(f, format="PNG"), fsync=False)
    shutil.rmtree(cache)
    classes = list(getattr(net, "classes", None) or dataset.classes)
    meta = {
        "num_classes": num_classes, "classes": classes, "images": len(dataset),
        "dataset": repr(dataset), "scale": scale,
        "resize": resize, "resize_filter": resize_filter if resize else None,
        "inference_size": inference_size,
        "networks": sources or [], "percentile": PERCENTILE, "cap": CAP,
        "thresholds": {c: float(t) for c, t in zip(classes, thresholds)},
        "predicted_pixels": {c: int(n) for c, n in zip(classes, predicted)},
        "kept_pixels": {c: int(n) for c, n in zip(classes, kept)},
        "kept_fraction": float(kept.sum() / max(1, predicted.sum())),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out / META, json.dumps(meta, indent=2))
    return meta


def summary_line(meta: dict, out_dir) -> str:
    """One line: how many labels were written where, how much of the image they keep."""
    return (f"{meta['images']} pseudo-labels written to {out_dir} ({meta['inference_size'][0]}x"
            f"{meta['inference_size'][1]} inference, thresholds {min(meta['thresholds'].values()):.3f}"
            f"..{max(meta['thresholds'].values()):.3f}, {100 * meta['kept_fraction']:.1f}% of "
            f"the pixels kept); per class in {Path(out_dir) / META}")


def _require_space(cache: Path, dataset, resized: _Resized) -> None:
    """Refuse before the first forward when the cache cannot fit (estimated from the first
    image's size)."""
    image, _ = dataset.load(0)
    sh, sw = resized.inference_size(*image.shape[:2])
    pixels = sh * sw
    need = 5 * pixels * len(dataset)
    free = shutil.disk_usage(cache).free
    if need > free:
        raise OSError(f"{cache}: the per-pixel confidences of {len(dataset)} images need about "
                      f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free")


# -- reading them back ----------------------------------------------------------------------------
class PseudoLabelled(SegmentationDataset):
    """``dataset``'s images with the labels ``deeplabv2 pseudo-label`` wrote to ``folder``
    (``<folder>/<dataset.name(i)>.png``): what ``adapt.target_labels`` makes of the target
    set. Errors (:class:`DatasetError`) name the folder or file: a missing folder, a folder
    without ``thresholds.json`` (not written, or not finished), another class count than the
    target set's, a missing label for an image."""

    def __init__(self, dataset: SegmentationDataset, folder):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"{folder}: adapt.target_labels folder does not exist (write it "
                               "with deeplabv2 pseudo-label)")
        meta_path = folder / META
        if not meta_path.is_file():
            raise DatasetError(f"{meta_path}: missing; {folder} is not a finished "
                               "deeplabv2 pseudo-label folder (adapt.target_labels)")
        try:
            meta = json.loads(meta_path.read_text())
            num_classes = int(meta["num_classes"])
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{meta_path}: unreadable ({e})") from None
        if num_classes != dataset.num_classes:
            raise DatasetError(f"{folder}: pseudo-labels of {num_classes} classes, but the "
                               f"target set {dataset!r} has {dataset.num_classes} "
                               "(adapt.target_options)")
        super().__init__(dataset.root, dataset.split, None, dataset.seed)
        self.dataset, self.folder, self.meta = dataset, folder, meta
        self.classes, self.palette = dataset.classes, dataset.palette
        self.labels = [folder / f"{dataset.name(i)}.png" for i in range(len(dataset))]
        for i, path in enumerate(self.labels):
            if not path.is_file():
                raise DatasetError(f"{path}: missing pseudo-label of target image "
                                   f"{dataset.source(i)} (adapt.target_labels={folder})")

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"PseudoLabelled({self.dataset!r}, {str(self.folder)!r})"

    def name(self, index: int) -> str:
        return self.dataset.name(index)

    def source(self, index: int) -> str:
        return str(self.labels[index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, _ = self.dataset.load(index)
        path = self.labels[index]
        label = read_label_png(path)
        check_label_values(label, self.num_classes, path, self.ignore_index)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"{path}: pseudo-label is {label.shape[1]}x{label.shape[0]} but "
                               f"target image {self.dataset.source(index)} is "
                               f"{image.shape[1]}x{image.shape[0]}")
        return image, label

"""DAFormer's rare-class sampling (RCS) of source images, as a pure function of the step.

The released definition (lhoyer/DAFormer, ``mmseg/datasets/uda_dataset.py``:
``get_rcs_class_probs`` and ``UDADataset.get_rare_class_sample``; the statistics from
``tools/convert_datasets/gta.py`` / ``cityscapes.py``: ``sample_class_stats.json`` and
``samples_with_class.json``):

1. per source image, the number of pixels of every class in its label (train ids, at the
   resolution the label file has; 255 not counted), computed once;
2. the class frequencies ``f_c = n_c / sum_k n_k`` over the classes that occur at all, and the
   sampling probabilities ``p(c) = softmax((1 - f_c) / T)`` (``T`` = ``temperature``, 0.01
   in every released config, ``class_temp``);
3. for every sample: a class ``c ~ p``, then uniformly one of the images holding more than
   ``min_pixels`` (3000) pixels of ``c`` (strictly more, as released);
4. the image goes through the training transform; while the crop holds no more than
   ``min_pixels * min_crop_ratio`` (3000 x 0.5 = 1500) pixels of ``c``, the whole transform is
   drawn again (a new scale, flip and crop of the same image), at most 10 times (the released
   loop checks 10 times; the crop of the 10th re-draw is kept unchecked).
   ``min_crop_ratio`` 0 turns the re-draws off.

Unlike the released sampler (``np.random`` in each loader worker), every choice here is drawn
from a generator seeded by ``(seed, global sample position)`` and every crop by
``(dataset seed, position, attempt)``: the samples of a step are a pure function of the step,
as :class:`~deeplabv2.data.sampler.IterationBatchSampler` makes them, so a resumed run
continues with exactly the images and crops an uninterrupted one would take, and the ranks of
a DDP run take disjoint positions of one global batch.

The per-image class counts are cached in a JSON file (:func:`class_stats`): by default
``rcs_class_stats_<split>.json`` in the dataset root, recomputed when the list of label files
(names and byte sizes) or the classes change.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..utils.fileio import atomic_write_text
from .base import DatasetError, check_label_values
from .sampler import StepBatchSampler

CACHE_VERSION = 1
# The number of crop checks of the released loop (``for j in range(10)``).
MAX_CROP_CHECKS = 10
# Tags that keep the class/image choices and the crop draws on other seed streams than the
# loaders' (seed, epoch, index) ones.
_CHOICE_TAG, _CROP_TAG = 0x2C5, 0x2C6


@dataclass(frozen=True)
class RCSSettings:
    """``data.rare_class_sampling``: the released ``rare_class_sampling`` dict
    (``class_temp`` is ``temperature``). ``cache``: the statistics file (None: beside the
    dataset)."""

    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5
    cache: str | None = None

    @classmethod
    def from_dict(cls, d, key: str = "data.rare_class_sampling") -> "RCSSettings":
        if not isinstance(d, dict):
            raise ValueError(f"{key} must be a mapping (temperature, min_pixels, "
                             f"min_crop_ratio, cache) or null, got {d!r}")
        valid = ("temperature", "min_pixels", "min_crop_ratio", "cache")
        for k in d:
            if k not in valid:
                raise ValueError(f"unknown key {key}.{k}; valid keys: {', '.join(valid)}")
        d = dict(d)
        for name in ("temperature", "min_pixels", "min_crop_ratio"):
            v = d.get(name, getattr(cls, name))
            if isinstance(v, str):  # YAML 1.1 reads 1e-2 as a string
                try:
                    v = float(v)
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"{key}.{name} must be a number, got {v!r}")
            if name == "min_pixels" and float(v) == int(v):
                v = int(v)
            d[name] = v
        s = cls(**d)
        if s.temperature <= 0:
            raise ValueError(f"{key}.temperature must be > 0, got {s.temperature!r}")
        if not isinstance(s.min_pixels, int) or s.min_pixels < 0:
            raise ValueError(f"{key}.min_pixels must be an integer >= 0, got {s.min_pixels!r}")
        if s.min_crop_ratio < 0:
            raise ValueError(f"{key}.min_crop_ratio must be >= 0, got {s.min_crop_ratio!r}")
        if s.cache is not None and not isinstance(s.cache, str):
            raise ValueError(f"{key}.cache must be a file path or null, got {s.cache!r}")
        return s


# -- statistics ----------------------------------------------------------------------------------
def default_cache_path(dataset) -> Path | None:
    """``<root>/rcs_class_stats_<split>.json``; None for a dataset without a root folder."""
    root = getattr(dataset, "root", None)
    if root is None:
        return None
    return Path(root) / f"rcs_class_stats_{dataset.split}.json"


def _identity(dataset) -> dict:
    """What the cached counts depend on: the dataset kind, its classes and its label files
    (paths relative to the root, with their byte sizes); a root-less (generated) dataset by its
    description and sample names."""
    root = getattr(dataset, "root", None)
    samples = getattr(dataset, "samples", None) if root is not None else None
    files, sizes = [], []
    for i in range(len(dataset)):
        label = samples[i][1] if samples else None
        if label is None:
            files.append(dataset.source(i))
            sizes.append(None)
            continue
        label = Path(label)
        try:
            files.append(label.relative_to(root).as_posix())
        except ValueError:
            files.append(str(label))
        try:
            sizes.append(label.stat().st_size)
        except OSError as e:
            raise DatasetError(f"{label}: cannot read the label file ({e})") from None
    return {"dataset": type(dataset).__name__, "split": dataset.split,
            "classes": list(dataset.classes), "ignore_index": int(dataset.ignore_index),
            "generated": repr(dataset) if root is None else None,
            "files": files, "sizes": sizes}


def _fingerprint(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _label(dataset, index: int) -> np.ndarray:
    """The label of sample ``index`` in train ids, read without its image where possible."""
    samples = getattr(dataset, "samples", None)
    if samples and getattr(dataset, "root", None) is not None:
        label_path = samples[index][1]
        if label_path is None:
            raise DatasetError(f"{samples[index][0]}: rare-class sampling needs labelled "
                               f"source images; this one has no label file")
        label = dataset.read_label(label_path)
        check_label_values(label, dataset.num_classes, label_path, dataset.ignore_index)
        return label
    return dataset.load(index)[1]


def count_classes(dataset, threads: int | None = None) -> np.ndarray:
    """``(len(dataset), num_classes)`` int64: the pixels of every class in every label (the
    released ``sample_class_stats``; ignored pixels not counted). Labels are read by
    ``threads`` threads (PNG decoding releases the GIL; None: up to 8, one per core)."""
    c = dataset.num_classes

    def count(i):
        label = np.asarray(_label(dataset, i))
        return np.bincount(label.ravel(), minlength=256)[:c]

    threads = threads or min(8, os.cpu_count() or 1)
    counts = np.zeros((len(dataset), c), dtype=np.int64)
    if threads > 1 and len(dataset) > 1:
        with ThreadPoolExecutor(threads) as pool:
            for i, row in enumerate(pool.map(count, range(len(dataset)))):
                counts[i] = row
    else:
        for i in range(len(dataset)):
            counts[i] = count(i)
    return counts


def class_stats(dataset, cache: str | Path | None = None, log=None) -> np.ndarray:
    """The per-image class counts of :func:`count_classes`, read from the cache file when it
    describes this dataset's label files, else computed and written there.

    ``cache``: the JSON file (None: :func:`default_cache_path`; still None for a dataset
    without a root: computed, not cached). A cache that cannot be parsed is an error naming
    the file; one of other files or classes is recomputed and replaced; a cache that cannot be
    written is reported through ``log`` and the counts used anyway."""
    path = Path(cache) if cache is not None else default_cache_path(dataset)
    identity = _identity(dataset)
    fingerprint = _fingerprint(identity)
    if path is not None and path.is_file():
        counts = _read_cache(path, fingerprint, dataset)
        if counts is not None:
            return counts
        if log:
            log(f"{path}: class statistics of other label files or classes; recomputing")
    counts = count_classes(dataset)
    if log:
        log(f"rare-class sampling: counted the class pixels of {len(dataset)} labels"
            + (f" (cached in {path})" if path is not None else ""))
    if path is not None:
        record = {"version": CACHE_VERSION, "fingerprint": fingerprint,
                  "dataset": identity["dataset"], "split": identity["split"],
                  "classes": identity["classes"], "files": identity["files"],
                  "counts": counts.tolist()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, separators=(",", ":")))
        except OSError as e:
            if log:
                log(f"{path}: cannot cache the class statistics ({e}); set "
                    f"data.rare_class_sampling.cache to a writable file")
    return counts


def _read_cache(path: Path, fingerprint: str, dataset) -> np.ndarray | None:
    """The counts of ``path`` when its fingerprint is ``fingerprint``, None when it is another
    one; :class:`DatasetError` for a file that is not such a cache."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable rare-class statistics cache ({e}); delete it "
                           f"to have it recomputed") from None
    if not isinstance(record, dict) or "fingerprint" not in record or "counts" not in record:
        raise DatasetError(f"{path}: not a rare-class statistics cache (no fingerprint/counts); "
                           f"delete it or set data.rare_class_sampling.cache to another file")
    if record.get("version") != CACHE_VERSION or record["fingerprint"] != fingerprint:
        return None
    try:
        counts = np.asarray(record["counts"], dtype=np.int64)
    except (TypeError, ValueError):
        counts = None
    if counts is None or counts.shape != (len(dataset), dataset.num_classes) \
            or (counts < 0).any():
        raise DatasetError(f"{path}: damaged rare-class statistics cache (counts are not "
                           f"{len(dataset)} rows of {dataset.num_classes} pixel counts); "
                           f"delete it to have it recomputed")
    return counts


# -- probabilities and choices ---------------------------------------------------------------------
def class_probabilities(totals, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, p)``: the classes with any pixels (ascending ids) and their sampling
    probabilities ``softmax((1 - f_c) / T)``, ``f_c`` the class's share of all counted pixels
    (the released ``get_rcs_class_probs``; classes without pixels are never drawn)."""
    totals = np.asarray(totals, dtype=np.float64)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = np.flatnonzero(totals > 0)
    if classes.size == 0:
        raise DatasetError("rare-class sampling: the source labels hold no pixel of any class")
    f = totals[classes] / totals[classes].sum()
    z = (1.0 - f) / temperature
    e = np.exp(z - z.max())
    return classes, e / e.sum()


class RareClassSampling:
    """The class probabilities and, per class, the images to draw from.

    ``counts``: ``(num_images, num_classes)`` from :func:`class_stats`. A class that occurs
    but in no image with more than ``min_pixels`` pixels is an error naming it (the released
    code asserts)."""

    def __init__(self, counts: np.ndarray, settings: RCSSettings, class_names=None):
        counts = np.asarray(counts, dtype=np.int64)
        self.settings = settings
        self.classes, self.probs = class_probabilities(counts.sum(0), settings.temperature)
        self.cumulative = np.cumsum(self.probs)
        self.images: dict[int, np.ndarray] = {}
        for c in self.classes:
            holding = np.flatnonzero(counts[:, c] > settings.min_pixels)
            if holding.size == 0:
                name = f"{c} ({class_names[c]})" if class_names is not None else str(c)
                raise DatasetError(
                    f"rare-class sampling: no source image holds more than "
                    f"data.rare_class_sampling.min_pixels={settings.min_pixels} pixels of class "
                    f"{name} (the most in one image: {int(counts[:, c].max())}); lower min_pixels")
            self.images[int(c)] = holding

    @property
    def min_crop_pixels(self) -> float:
        return self.settings.min_pixels * self.settings.min_crop_ratio

    def choose(self, seed: int, position: int) -> tuple[int, int]:
        """``(class, image index)`` of global sample ``position``: a pure function of both."""
        u_class, u_image = np.random.default_rng([seed, _CHOICE_TAG, position]).random(2)
        k = min(int(np.searchsorted(self.cumulative, u_class * self.cumulative[-1],
                                    side="right")), len(self.classes) - 1)
        c = int(self.classes[k])
        images = self.images[c]
        return c, int(images[min(int(u_image * len(images)), len(images) - 1)])


class RareClassBatchSampler(StepBatchSampler):
    """This rank's ``(position, class, image)`` keys for every micro-step from ``start_step``
    on, in the layout of :class:`~deeplabv2.data.sampler.IterationBatchSampler`: micro-step
    ``s`` takes global positions ``s * batch_size * world_size ...`` and rank ``r`` its
    ``r``-th slice of them."""

    def __init__(self, rcs: RareClassSampling, batch_size: int, seed: int, total_steps: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, total_steps, start_step, rank, world_size)
        self.rcs = rcs

    def key(self, position: int) -> tuple[int, int, int]:
        return (position, *self.rcs.choose(self.seed, position))


class RareClassCrops(torch.utils.data.Dataset):
    """``ds[(position, class, image)]``: the transformed image, its transform re-drawn while
    the crop holds no more than ``min_pixels * min_crop_ratio`` pixels of the class (at most
    :data:`MAX_CROP_CHECKS` re-draws); also returns ``"rcs_class"`` and ``"rcs_draws"``."""

    def __init__(self, dataset, transform, rcs: RareClassSampling):
        self.dataset, self.transform, self.rcs = dataset, transform, rcs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        position, c, index = key
        image, label = self.dataset.load(index)
        enough = self.rcs.min_crop_pixels
        check = self.rcs.settings.min_crop_ratio > 0
        draws = 0
        while True:
            rng = np.random.default_rng([self.dataset.seed, _CROP_TAG, position, draws])
            out = self.transform(image, label, rng)
            draws += 1
            if not check or draws > MAX_CROP_CHECKS \
                    or int((out["label"] == c).sum()) > enough:
                break
        out["rcs_class"], out["rcs_draws"] = c, draws
        return out


def build_rare_class_sampling(dataset, settings: RCSSettings, log=None) -> RareClassSampling:
    """The :class:`RareClassSampling` of ``dataset`` (statistics from the cache or counted)."""
    counts = class_stats(dataset, settings.cache, log=log)
    return RareClassSampling(counts, settings, class_names=list(dataset.classes))

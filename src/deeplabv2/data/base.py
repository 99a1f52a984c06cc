"""The interface every dataset implements, and the wrapper that applies transforms.

A dataset lists ``(image_path, label_path)`` pairs from its official on-disk layout and loads
one pair as ``(image, label)``: an RGB ``uint8`` ``(H, W, 3)`` array and a ``uint8`` ``(H, W)``
array of *train ids* (``0 .. num_classes-1``, 255 = ignore). Everything random about a sample
(scale, crop, flip) is drawn from a generator seeded by ``(seed, epoch, index)``, so a sample is
a pure function of those three numbers: runs are reproducible whatever the number of workers,
and a resumed run sees exactly the data an uninterrupted one would.

Bad input is reported as :class:`DatasetError` naming the file or folder: a missing root or
split folder and an empty split when the dataset is built; an unreadable file, an image/label
size mismatch or a label value out of range when a sample is loaded (:meth:`check` loads them
all up front).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """Bad dataset input; the message names the file or folder and what is wrong."""


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``classes``, ``palette`` and fill ``self.samples``.

    ``samples`` holds ``(image_path, label_path)``; ``label_path`` is ``None`` for images
    without labels (e.g. a test split), which load with an all-255 label.

    ``__getitem__`` returns ``transform(image, label, rng)`` plus ``"name"`` when a transform is
    set (see :mod:`deeplabv2.data.transforms`), else ``{"image", "label", "name"}`` with the raw
    arrays.
    """

    classes: Sequence[str] = ()
    palette: np.ndarray | None = None  # (num_classes, 3) uint8
    ignore_index = IGNORE_INDEX
    # {(height, width): how many} of the samples the last check() read (the crop-size warning
    # of deeplabv2.memory uses them; nothing is read for them alone)
    checked_sizes: dict[tuple[int, int], int] = {}

    def __init__(self, root, split: str, transform: Callable | None = None, seed: int = 0):
        self.root = Path(root) if root is not None else None
        self.split = split
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.samples: list[tuple[Path, Path | None]] = []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"{len(self)} samples, {self.num_classes} classes)")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of this epoch (call before each pass)."""
        self.epoch = int(epoch)

    def name(self, index: int) -> str:
        """A short unique name of the sample (the image file stem by default)."""
        return self.samples[index][0].stem

    def source(self, index: int) -> str:
        """Where the label of sample ``index`` comes from, for error messages."""
        image_path, label_path = self.samples[index]
        return str(label_path if label_path is not None else image_path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image RGB uint8 (H, W, 3), label uint8 (H, W) train ids)``."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        if label_path is None:
            return image, np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)
        label = self.read_label(label_path)
        check_label_values(label, self.num_classes, label_path, self.ignore_index)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but "
                               f"image {image_path} is {image.shape[1]}x{image.shape[0]}")
        return image, label

    def read_label(self, path: Path) -> np.ndarray:
        """Read a label file and return train ids; subclasses map their encodings here."""
        return read_label_png(path)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, label = self.load(index)
        if self.transform is None:
            return {"image": image, "label": label, "name": self.name(index)}
        rng = np.random.default_rng([self.seed, self.epoch, index])
        out = self.transform(image, label, rng)
        out["name"] = self.name(index)
        return out

    def check(self, limit: int | None = None) -> None:
        """Read every sample (or the first ``limit``) and raise :class:`DatasetError` on the first
        unreadable file, size mismatch, or label value outside ``0..C-1`` other than 255.
        The sizes of the samples read are kept in :attr:`checked_sizes`."""
        if len(self) == 0:
            where = self.root if self.root is not None else f"dataset {type(self).__name__}"
            raise DatasetError(f"{where}: split {self.split!r} is empty")
        sizes: dict[tuple[int, int], int] = {}
        for i in range(len(self) if limit is None else min(limit, len(self))):
            _, label = self.load(i)
            sizes[label.shape] = sizes.get(label.shape, 0) + 1
            bad = label[(label >= self.num_classes) & (label != self.ignore_index)]
            if bad.size:
                raise DatasetError(f"{self.source(i)}: label value {int(bad[0])} is outside "
                                   f"0..{self.num_classes - 1} (and not {self.ignore_index})")
        self.checked_sizes = sizes


def check_label_values(label: np.ndarray, num_classes: int, source,
                       ignore_index: int = IGNORE_INDEX) -> None:
    """:class:`DatasetError` naming ``source`` and the values when ``label`` holds a value that
    is neither a class ``0..num_classes-1`` nor ``ignore_index`` (such pixels would otherwise
    drop out of training and scoring without a word)."""
    if label.size == 0 or int(label.max()) < num_classes:
        return
    counts = np.bincount(label.ravel(), minlength=256)
    counts[:num_classes] = 0
    counts[ignore_index] = 0
    bad = np.flatnonzero(counts)
    if bad.size:
        values = ", ".join(str(v) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
        raise DatasetError(f"{source}: label values {values} ({int(counts.sum())} pixels) are "
                           f"outside the classes 0..{num_classes - 1} and not the ignore value "
                           f"{ignore_index}")


def read_image(path) -> np.ndarray:
    """RGB ``uint8`` ``(H, W, 3)`` as the image is displayed; a clear :class:`DatasetError` if
    the file cannot be read.

    EXIF orientation is applied (a phone photo is segmented upright, and its outputs overlay
    it); 16-bit grayscale is scaled to 8 bits (not clipped), 16-bit RGB keeps its high byte;
    palette images give their colours; transparency (RGBA, LA, palette with a transparent
    colour) is composited over white."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return _rgb8(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: unreadable image ({e})") from None


def _rgb8(im: Image.Image) -> np.ndarray:
    """A writable ``uint8`` ``(H, W, 3)`` copy (torch refuses read-only arrays)."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:  # 16-bit range
            a = a / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and
                                                       "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(im.convert("RGB"))


def read_label_png(path) -> np.ndarray:
    """Single-channel label PNG as ``uint8`` ``(H, W)``: palette PNGs give their indices."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(f"{path}: label image has mode {im.mode}; expected a "
                                   "single-channel (L or palette) PNG")
            arr = np.array(im)
    except (OSError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: unreadable label ({e})") from None
    if arr.dtype != np.uint8:
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise DatasetError(f"{path}: label value {int(arr.max())} does not fit 0..255")
        arr = arr.astype(np.uint8)
    return arr


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} folder")
    return path


def require_root(root) -> Path:
    """The dataset root as a :class:`Path`; :class:`DatasetError` if it is not a folder."""
    if root is None:
        raise DatasetError("this dataset needs a root folder (got root=None)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root folder does not exist")
    return root


def read_list(path: Path) -> list[str]:
    """Non-empty, stripped lines of a split list file; :class:`DatasetError` if it is missing
    or lists nothing."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing split list file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise DatasetError(f"{path}: split list is empty")
    return lines


def pair_listed(names: Sequence[str], image_dir: Path, image_ext: str, label_dir: Path | None,
                label_ext: str, list_path: Path) -> list[tuple[Path, Path | None]]:
    """``(image, label)`` paths for names from a list file; an error naming the first missing
    file (and the list that asked for it)."""
    samples = []
    for n in names:
        image = image_dir / f"{n}{image_ext}"
        label = label_dir / f"{n}{label_ext}" if label_dir is not None else None
        for p in (image, label):
            if p is not None and not p.is_file():
                raise DatasetError(f"{p}: missing file (listed in {list_path})")
        samples.append((image, label))
    return samples

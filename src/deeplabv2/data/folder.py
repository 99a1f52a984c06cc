"""A user's own data in a plain folder layout.

Layout under ``root``::

    classes.txt                   one class name a line, in class-index order; a line may end
                                  with an RGB colour: ``road 128 64 128``
    images/{split}/{stem}.jpg     (or .jpeg / .png) RGB images
    masks/{split}/{stem}.png      single-channel PNGs (grayscale or palette), value = class
                                  index, 255 = ignore

Images and masks are matched by file stem; a stem on one side only is an error that lists the
first few. Classes without a colour take the VOC palette colour of their index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DatasetError, SegmentationDataset, require_dir, require_root
from .voc import voc_palette

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SHOW = 5  # how many mismatched stems an error lists


def read_classes_file(path: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """``(class names, palette (C, 3) uint8)`` from a ``classes.txt`` (see module docstring).
    Blank lines and ``#`` comments are skipped."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing classes file (one class name a line)")
    names, palette = [], []
    default = voc_palette(256)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        colour = parts[-3:] if len(parts) >= 4 else []
        if colour and all(p.isdigit() for p in colour):
            if any(int(p) > 255 for p in colour):
                raise DatasetError(f"{path}:{n}: colour {' '.join(colour)} is outside 0..255")
            name, rgb = " ".join(parts[:-3]), tuple(int(p) for p in colour)
        else:
            name, rgb = " ".join(parts), None
        palette.append(rgb if rgb is not None else tuple(default[len(names) % 256]))
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: classes file lists no class")
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise DatasetError(f"{path}: class {dup!r} is listed twice")
    return tuple(names), np.array(palette, dtype=np.uint8)


class FolderDataset(SegmentationDataset):
    """``images/{split}`` + ``masks/{split}`` + ``classes.txt`` under ``root``."""

    def __init__(self, root, split: str = "train", transform=None, seed: int = 0):
        root = require_root(root)
        super().__init__(root, split, transform, seed)
        self.classes, self.palette = read_classes_file(root / "classes.txt")
        image_dir = require_dir(root / "images" / split, f"{split!r} image")
        mask_dir = require_dir(root / "masks" / split, f"{split!r} mask")
        images: dict[str, Path] = {}
        for p in sorted(image_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                if p.stem in images:
                    raise DatasetError(f"{p}: two images with stem {p.stem!r} "
                                       f"(also {images[p.stem].name})")
                images[p.stem] = p
        masks = {p.stem: p for p in sorted(mask_dir.iterdir())
                 if p.is_file() and p.suffix.lower() == ".png"}
        if not images:
            raise DatasetError(f"{image_dir}: split {split!r} is empty (no "
                               f"{'/'.join(IMAGE_EXTENSIONS)} images)")
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask or no_image:
            parts = []
            if no_mask:
                parts.append(f"{len(no_mask)} image(s) in {image_dir} without a mask in "
                             f"{mask_dir}: {', '.join(no_mask[:SHOW])}")
            if no_image:
                parts.append(f"{len(no_image)} mask(s) in {mask_dir} without an image: "
                             f"{', '.join(no_image[:SHOW])}")
            raise DatasetError("image and mask stems do not match: " + "; ".join(parts))
        self.samples = [(images[s], masks[s]) for s in sorted(images)]

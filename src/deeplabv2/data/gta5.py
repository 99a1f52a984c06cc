"""GTA5 (Richter et al., "Playing for Data", ECCV 2016): 24,966 game frames, Cityscapes labels.

Layout under ``root`` (the official download, images and labels unpacked side by side)::

    images/00001.png ...      RGB 1914x1052
    labels/00001.png ...      palette PNGs whose indices are Cityscapes label ids (0..33)
    train.txt, val.txt, ...   optional split lists: one file name (``00001.png``) per line

Labels are mapped to the 19 Cityscapes train ids (255 = not evaluated) with the official
table, so a model trained here is evaluated on Cityscapes directly. Without a ``{split}.txt``
list, splits ``all`` and ``train`` are the whole folder.

A few official frames have a label of a different size than their image: the label is resized
to the image with NEAREST (never bilinear, which would invent ids) instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import (DatasetError, SegmentationDataset, read_image, read_label_png, read_list,
                   require_dir, require_root)
from .cityscapes import PALETTE, label_ids_to_train_ids
from .cityscapes_labels import CLASSES

WHOLE_FOLDER_SPLITS = ("all", "train")


class GTA5Dataset(SegmentationDataset):
    """GTA5 ``split`` as ``(image, Cityscapes train ids)``; see the module docstring."""

    classes = CLASSES
    palette = PALETTE
    labels_match_images = False  # a label file may need resizing to its image (see load)
    image_folder, label_folder, what = "images", "labels", "GTA5"  # SYNTHIA: RGB, GT/LABELS

    def __init__(self, root, split: str = "train", transform=None, seed: int = 0):
        root = require_root(root)
        super().__init__(root, split, transform, seed)
        image_dir = require_dir(root / self.image_folder, f"{self.what} images")
        label_dir = require_dir(root / self.label_folder, f"{self.what} labels")
        list_path = root / f"{split}.txt"
        if list_path.is_file():
            names = [_file_name(line) for line in read_list(list_path)]
            origin = f"listed in {list_path}"
        elif split in WHOLE_FOLDER_SPLITS:
            names = sorted(p.name for p in image_dir.glob("*.png"))
            origin = f"found in {image_dir}"
            if not names:
                raise DatasetError(f"{image_dir}: split {split!r} is empty (no *.png images)")
        else:
            raise DatasetError(f"{list_path}: missing split list file (without one only "
                               f"{' and '.join(WHOLE_FOLDER_SPLITS)} = the whole folder exist)")
        for n in names:
            image, label = image_dir / n, label_dir / n
            for p in (image, label):
                if not p.is_file():
                    raise DatasetError(f"{p}: missing file ({n} {origin})")
            self.samples.append((image, label))

    def read_label(self, path: Path) -> np.ndarray:
        return label_ids_to_train_ids(read_label_png(path))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image RGB uint8 (H, W, 3), train ids uint8 (H, W))``, the label resized to the
        image (nearest) where the official files disagree in size."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = self.read_label(label_path)
        if label.shape != image.shape[:2]:
            h, w = image.shape[:2]
            label = np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))
        return image, label


def _file_name(entry: str) -> str:
    """``00001.png``, ``00001`` or ``images/00001.png`` -> ``00001.png``."""
    name = Path(entry.split()[0]).name
    return name if Path(name).suffix else f"{name}.png"

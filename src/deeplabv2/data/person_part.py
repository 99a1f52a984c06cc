"""PASCAL-Person-Part (Chen et al., CVPR 2014): 6 body parts + background, on VOC 2010 images.

Layout under ``root`` (the usual export of the part annotations, as used by DeepLab v2)::

    JPEGImages/{name}.jpg
    SegmentationPart/{name}.png       values 0..6 (grayscale or palette PNG), 255 = ignored
    train_id.txt, val_id.txt          one name a line (1,716 / 1,817)

Class 0 (background) is a real class here: it is predicted and counted in the mIoU.
"""

from __future__ import annotations

from .base import SegmentationDataset, pair_listed, require_dir, require_root
from .voc import list_names, voc_palette

CLASSES = ("background", "head", "torso", "upper arms", "lower arms", "upper legs", "lower legs")


class PersonPartDataset(SegmentationDataset):
    """PASCAL-Person-Part ``split`` (``train``, ``val``) as ``(image, part ids 0..6)``."""

    classes = CLASSES
    palette = voc_palette(len(CLASSES))

    def __init__(self, root, split: str = "train", transform=None, seed: int = 0):
        root = require_root(root)
        super().__init__(root, split, transform, seed)
        list_path = root / f"{split}_id.txt"
        images = require_dir(root / "JPEGImages", "image")
        labels = require_dir(root / "SegmentationPart", "label")
        self.samples = pair_listed(list_names(list_path), images, ".jpg", labels, ".png",
                                   list_path)

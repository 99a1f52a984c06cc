"""Datasets (one file each, reading the official layouts), transforms and the name registry.

Every dataset yields ``(image RGB uint8 (H, W, 3), label uint8 (H, W) train ids, 255 =
ignore)`` from ``load(i)``; ``ds[i]`` applies the transform with a generator seeded by
``(seed, epoch, i)``. See :mod:`deeplabv2.data.base`.
"""

from .base import (IGNORE_INDEX, DatasetError, SegmentationDataset, read_image,
                   read_label_png)
from .cityscapes import CityscapesDataset, train_to_label_ids
from .context import PascalContextDataset
from .folder import FolderDataset
from .gta5 import GTA5Dataset
from .person_part import PersonPartDataset
from .registry import DATASETS, DatasetInfo, build_dataset, dataset_info
from .synthetic import SyntheticDataset
from .transforms import EvalTransform, TrainTransform
from .voc import VOCDataset, voc_palette

__all__ = ["IGNORE_INDEX", "DatasetError", "SegmentationDataset", "read_image",
           "read_label_png", "CityscapesDataset", "train_to_label_ids", "PascalContextDataset",
           "FolderDataset", "GTA5Dataset", "PersonPartDataset", "DATASETS", "DatasetInfo",
           "build_dataset", "dataset_info", "SyntheticDataset", "EvalTransform",
           "TrainTransform", "VOCDataset", "voc_palette"]

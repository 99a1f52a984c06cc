"""Datasets by name: what a config's ``data.dataset`` refers to.

=============  ==========================================  =====================================
name           class                                       splits
=============  ==========================================  =====================================
cityscapes     :class:`~.cityscapes.CityscapesDataset`     train, val, test (images only)
gta5           :class:`~.gta5.GTA5Dataset`                 all / train, or any ``{split}.txt``
voc12          :class:`~.voc.VOCDataset`                   train, val, trainval, train_aug
voc12_aug      VOC with ``train`` read as ``train_aug``    train (= train_aug), val, ...
context        :class:`~.context.PascalContextDataset`     train, val
person_part    :class:`~.person_part.PersonPartDataset`    train, val
folder         :class:`~.folder.FolderDataset`             any ``images/{split}`` folder
synthia        :class:`~.synthia.SynthiaDataset`           all / train, or any ``{split}.txt``
synthetic      :class:`~.synthetic.SyntheticDataset`       train, val (no root needed)
=============  ==========================================  =====================================
"""

from __future__ import annotations

import inspect

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .base import IGNORE_INDEX, DatasetError, SegmentationDataset
from .cityscapes import CityscapesDataset
from .context import PascalContextDataset
from .folder import FolderDataset, read_classes_file
from .gta5 import GTA5Dataset
from .person_part import PersonPartDataset
from .synthetic import SyntheticDataset
from .synthia import SynthiaDataset
from .voc import VOCDataset

DATASETS: dict[str, type[SegmentationDataset]] = {
    "cityscapes": CityscapesDataset,
    "gta5": GTA5Dataset,
    "synthia": SynthiaDataset,
    "voc12": VOCDataset,
    "voc12_aug": VOCDataset,
    "context": PascalContextDataset,
    "person_part": PersonPartDataset,
    "folder": FolderDataset,
    "synthetic": SyntheticDataset,
}


class DatasetInfo(NamedTuple):
    classes: tuple[str, ...]
    palette: np.ndarray  # (num_classes, 3) uint8
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _class_of(name: str) -> type[SegmentationDataset]:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def build_dataset(name: str, root, split: str, transform=None, seed: int = 0,
                  **kwargs) -> SegmentationDataset:
    """The dataset ``name`` (see the module table) at ``root``, split ``split``.

    ``kwargs`` go to the dataset class (e.g. ``size``/``num_samples`` for ``synthetic``,
    ``annotation`` for ``cityscapes``). ``root`` is not used by ``synthetic``.
    """
    cls = _class_of(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise DatasetError(f"dataset {name!r} takes no option {unknown[0]!r} (data.options); "
                           f"it takes: {', '.join(sorted(accepted - {'transform', 'seed'}))}")
    if name == "voc12_aug" and split == "train":
        split = "train_aug"
    if cls is SyntheticDataset:
        return SyntheticDataset(split=split, transform=transform, seed=seed, root=root, **kwargs)
    return cls(root, split, transform=transform, seed=seed, **kwargs)


def dataset_info(name: str, root=None) -> DatasetInfo:
    """Classes and palette of dataset ``name`` without reading its images; ``folder`` reads
    its ``root/classes.txt`` and so needs ``root``."""
    cls = _class_of(name)
    if cls is FolderDataset:
        if root is None:
            raise DatasetError("dataset 'folder' takes its classes from root/classes.txt: "
                               "pass root")
        classes, palette = read_classes_file(Path(root) / "classes.txt")
        return DatasetInfo(classes, palette)
    return DatasetInfo(tuple(cls.classes), np.asarray(cls.palette))

"""The official Cityscapes label table: 34 label ids, 19 of which are evaluated (the train ids).

Ground-truth files ``*_gtFine_labelIds.png`` and the official submission format store *label
ids* (0..33); training, our models and our metrics use *train ids* (0..18, 255 = ignored). The
numbers are those of ``helpers/labels.py`` in the official cityscapesScripts (Cordts et al.,
CVPR 2016, Table 1); ``license plate`` (label id -1) cannot occur in a label id image and is
left out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255


class CityscapesLabel(NamedTuple):
    label_id: int
    train_id: int  # 255: not evaluated
    name: str


LABELS: tuple[CityscapesLabel, ...] = tuple(CityscapesLabel(*row) for row in (
    (0, 255, "unlabeled"),
    (1, 255, "ego vehicle"),
    (2, 255, "rectification border"),
    (3, 255, "out of roi"),
    (4, 255, "static"),
    (5, 255, "dynamic"),
    (6, 255, "ground"),
    (7, 0, "road"),
    (8, 1, "sidewalk"),
    (9, 255, "parking"),
    (10, 255, "rail track"),
    (11, 2, "building"),
    (12, 3, "wall"),
    (13, 4, "fence"),
    (14, 255, "guard rail"),
    (15, 255, "bridge"),
    (16, 255, "tunnel"),
    (17, 5, "pole"),
    (18, 255, "polegroup"),
    (19, 6, "traffic light"),
    (20, 7, "traffic sign"),
    (21, 8, "vegetation"),
    (22, 9, "terrain"),
    (23, 10, "sky"),
    (24, 11, "person"),
    (25, 12, "rider"),
    (26, 13, "car"),
    (27, 14, "truck"),
    (28, 15, "bus"),
    (29, 255, "caravan"),
    (30, 255, "trailer"),
    (31, 16, "train"),
    (32, 17, "motorcycle"),
    (33, 18, "bicycle"),
))

# The 19 evaluated classes in train id order.
CLASSES: tuple[str, ...] = tuple(label.name for label in sorted(
    (label for label in LABELS if label.train_id != IGNORE_INDEX), key=lambda lb: lb.train_id))
NUM_CLASSES = len(CLASSES)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# label id -> train id for every uint8 value: ``LABEL_TO_TRAIN[label_ids]`` maps a whole image.
# Label ids that are not evaluated, and values 34..255 that are no label id, give 255.
LABEL_TO_TRAIN: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABEL_TO_TRAIN[[label.label_id for label in LABELS]] = [label.train_id for label in LABELS]
LABEL_TO_TRAIN = _frozen(LABEL_TO_TRAIN)

# train id -> label id, (19,) uint8: turns a prediction into the official submission format.
TRAIN_TO_LABEL: np.ndarray = _frozen(np.array(
    [next(label.label_id for label in LABELS if label.train_id == t) for t in range(NUM_CLASSES)],
    dtype=np.uint8))

# The SYNTHIA -> Cityscapes protocols (AdaptSegNet, ADVENT, FDA, DACS): the 16 Cityscapes
# classes SYNTHIA labels (no terrain, truck, train), and the 13 of the "mIoU*" protocol (also
# no wall, fence, pole). Entries are 19-class train ids, in train id order.
SYNTHIA16_TRAIN_IDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA13_TRAIN_IDS = tuple(t for t in SYNTHIA16_TRAIN_IDS if t not in (3, 4, 5))


def subset_lut(train_ids: tuple[int, ...]) -> np.ndarray:
    """``(256,)`` uint8: 19-class train id -> index in ``train_ids``, every other value 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(train_ids)] = np.arange(len(train_ids))
    return _frozen(lut)

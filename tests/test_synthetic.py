"""The synthetic demo set: deterministic, every class present, and not solvable by colour."""

from __future__ import annotations

import numpy as np
import pytest

from deeplabv2.demo.colour_baseline import colour_baseline_miou, fit_colour_classifier
from deeplabv2.data import SyntheticDataset
from deeplabv2.data.base import SegmentationDataset
from deeplabv2.data.synthetic import CLASSES


def test_scenes_are_a_pure_function_of_seed_split_and_index():
    a = SyntheticDataset("train", num_samples=5, seed=0)
    b = SyntheticDataset("train", num_samples=5, seed=0)
    for i in (0, 4):
        (ia, la), (ib, lb) = a.load(i), b.load(i)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    assert not np.array_equal(a.load(0)[0], a.load(1)[0])
    assert not np.array_equal(a.load(0)[0], SyntheticDataset("train", seed=1).load(0)[0])
    assert not np.array_equal(a.load(0)[0], SyntheticDataset("val", seed=0).load(0)[0])


def test_shapes_dtypes_and_every_class_present():
    ds = SyntheticDataset("val", size=(96, 160), num_samples=16)
    assert ds.num_classes == len(CLASSES) == 7 and ds.palette.shape == (7, 3)
    counts = np.zeros(ds.num_classes, np.int64)
    for i in range(len(ds)):
        image, label = ds.load(i)
        assert image.shape == (96, 160, 3) and image.dtype == np.uint8
        assert label.shape == (96, 160) and label.dtype == np.uint8
        counts += np.bincount(label.ravel(), minlength=ds.num_classes)
    assert counts.sum() == 16 * 96 * 160  # every pixel has a class (no 255)
    assert (counts / counts.sum() > 0.005).all(), dict(zip(CLASSES, counts))
    ds.check()
    with pytest.raises(IndexError):
        ds.load(16)
    with pytest.raises(ValueError):
        SyntheticDataset("test")


def test_colour_alone_scores_a_low_miou():
    train = SyntheticDataset("train", num_samples=60)
    val = SyntheticDataset("val", num_samples=20)
    assert colour_baseline_miou(train, val, train.num_classes) < 0.4


class OneColourPerClass(SegmentationDataset):
    """Each class painted with its own flat colour: colour alone solves it."""

    classes = ("a", "b", "c")

    def __init__(self, n):
        super().__init__(None, "train")
        self.n = n

    def __len__(self):
        return self.n

    def load(self, index):
        rng = np.random.default_rng(index)
        label = rng.integers(0, 3, (8, 8)).astype(np.uint8)
        label[0, 0] = 255  # ignored pixels are skipped
        colours = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200), (0, 0, 0)], np.uint8)
        return colours[np.minimum(label, 3)], label


def test_colour_baseline_is_perfect_when_colour_decides():
    ds = OneColourPerClass(4)
    assert colour_baseline_miou(ds, ds, 3) == pytest.approx(1.0)
    clf = fit_colour_classifier(ds, bins=8)
    image, label = ds.load(0)
    assert (clf.predict(image)[label != 255] == label[label != 255]).all()


class SharedColour(OneColourPerClass):
    """One image row: classes a and b painted the same red (a on 3 pixels, b on 2), c blue,
    and one ignored pixel, blue too."""

    def load(self, index):
        label = np.array([[0, 0, 0, 1, 1, 255, 2]], np.uint8)
        red, blue = (200, 30, 30), (30, 30, 200)
        image = np.array([[red] * 5 + [blue] * 2], np.uint8)
        return image, label


def test_colour_baseline_miou_by_hand():
    # red predicts a (3 pixels against b's 2), blue c; the ignored pixel counts nowhere:
    # IoU a = 3 / (3 + 2 predicted a wrongly) = 0.6, b = 0 / 2 = 0, c = 1 / 1 = 1
    ds = SharedColour(1)
    assert fit_colour_classifier(ds, bins=4).predict(ds.load(0)[0]).tolist() == \
        [[0, 0, 0, 0, 0, 2, 2]]
    assert colour_baseline_miou(ds, ds, 3, bins=4) == pytest.approx((0.6 + 0 + 1) / 3)

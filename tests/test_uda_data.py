"""The datasets of synthetic-to-real adaptation: SYNTHIA-RAND-CITYSCAPES in its official layout
(16-bit label PNGs), Cityscapes under the 16- and 13-class protocols and without labels."""

import numpy as np
import png
import pytest
from PIL import Image

from deeplabv2.data import build_dataset
from deeplabv2.data.base import DatasetError
from deeplabv2.data.cityscapes import CityscapesDataset
from deeplabv2.data.synthia import SynthiaDataset


def write_png16(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, planes = array.shape
    with open(path, "wb") as f:
        png.Writer(w, h, greyscale=planes == 1, alpha=planes in (2, 4), bitdepth=16).write(
            f, array.reshape(h, w * planes).astype(np.uint16))


def synthia_tree(root, ids):
    ids = np.asarray(ids, np.uint16)
    (root / "RGB").mkdir(parents=True)
    Image.fromarray(np.full((*ids.shape, 3), 90, np.uint8)).save(root / "RGB/0000001.png")
    label = np.stack([ids, ids * 0 + 7, ids * 0], -1)  # class, instance, zero
    write_png16(root / "GT/LABELS/0000001.png", label)


def test_synthia_ids_map_to_the_16_class_protocol(tmp_path):
    # SYNTHIA ids: 3 road, 4 sidewalk, 2 building, 21 wall, 5 fence, 7 pole, 15 light, 9 sign,
    # 6 vegetation, 1 sky, 10 pedestrian, 17 rider, 8 car, 19 bus, 12 motorcycle, 11 bicycle;
    # 0 void, 13 parking, 16 terrain, 18 truck, 20 train, 22 lanemarking: ignored
    ids = [[3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17],
           [8, 19, 12, 11, 0, 13, 16, 18, 20, 22, 14, 300]]
    synthia_tree(tmp_path, ids)
    ds = build_dataset("synthia", tmp_path, "train")
    assert isinstance(ds, SynthiaDataset) and ds.num_classes == 16
    assert ds.classes[3] == "wall" and ds.classes[9] == "sky" and ds.classes[15] == "bicycle"
    image, label = ds.load(0)
    assert image.shape == (2, 12, 3)
    assert label.tolist() == [list(range(12)), [12, 13, 14, 15] + [255] * 8]
    ds.check()
    thirteen = SynthiaDataset(tmp_path, "train", num_classes=13)
    assert thirteen.num_classes == 13 and "wall" not in thirteen.classes
    assert thirteen.load(0)[1].tolist()[0] == [0, 1, 2, 255, 255, 255, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="16, 13 or 19"):
        SynthiaDataset(tmp_path, "train", num_classes=18)
    # FDA's 19 classes (YanchaoYang/FDA data/synthia_dataset.py): Cityscapes train ids, with
    # terrain (16 -> 9), truck (18 -> 14) and train (20 -> 16) kept
    nineteen = SynthiaDataset(tmp_path, "train", num_classes=19)
    assert nineteen.num_classes == 19 and nineteen.classes[9] == "terrain"
    assert nineteen.load(0)[1].tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12], [13, 15, 17, 18, 255, 255, 9, 14, 16, 255,
                                                  255, 255]]
    with pytest.raises(DatasetError, match="val.txt"):
        SynthiaDataset(tmp_path, "val")
    (tmp_path / "GT/LABELS/0000001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="0000001.png"):
        ds.load(0)


def cityscapes_tree(root, label_ids):
    city = "aachen"
    frame = f"{city}_000000_000019"
    img = root / "leftImg8bit/val" / city / f"{frame}_leftImg8bit.png"
    img.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((*np.shape(label_ids), 3), np.uint8)).save(img)
    lbl = root / "gtFine/val" / city / f"{frame}_gtFine_labelIds.png"
    lbl.parent.mkdir(parents=True)
    Image.fromarray(np.asarray(label_ids, np.uint8)).save(lbl)


def test_cityscapes_16_and_13_class_protocols_and_unlabelled_images(tmp_path):
    # label ids: 7 road, 12 wall, 22 terrain, 27 truck, 26 car, 33 bicycle, 0 unlabeled
    cityscapes_tree(tmp_path, [[7, 12, 22, 27, 26, 33, 0]])
    full = CityscapesDataset(tmp_path, "val")
    assert full.load(0)[1].tolist() == [[0, 3, 9, 14, 13, 18, 255]]
    sixteen = CityscapesDataset(tmp_path, "val", num_classes=16)
    assert sixteen.num_classes == 16 and sixteen.palette.shape == (16, 3)
    assert sixteen.load(0)[1].tolist() == [[0, 3, 255, 255, 12, 15, 255]]
    thirteen = CityscapesDataset(tmp_path, "val", num_classes=13)
    assert thirteen.classes[:4] == ("road", "sidewalk", "building", "traffic light")
    assert thirteen.load(0)[1].tolist() == [[0, 255, 255, 255, 9, 12, 255]]
    unlabelled = CityscapesDataset(tmp_path, "val", annotation=None)
    image, label = unlabelled.load(0)
    assert image.shape == (1, 7, 3) and (label == 255).all()
    with pytest.raises(ValueError, match="19, 16 or 13"):
        CityscapesDataset(tmp_path, "val", num_classes=7)


def test_16_class_evaluation_also_reports_the_13_class_miou(tmp_path):
    from deeplabv2.evaluation.metrics import add_subset_mious, format_table
    ds = CityscapesDataset.__new__(CityscapesDataset)
    ds.miou_subsets = {"13": [0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]}
    iou = [0.5] * 16
    iou[3] = iou[4] = iou[5] = 0.0  # wall, fence, pole: out of the 13
    results = add_subset_mious({"iou": iou}, ds)
    assert results["miou_13"] == pytest.approx(0.5)
    cityscapes_tree(tmp_path, [[7, 12]])
    real = CityscapesDataset(tmp_path, "val", num_classes=16)
    assert [real.classes[i] for i in real.miou_subsets["13"]] == [
        "road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
        "person", "rider", "car", "bus", "motorcycle", "bicycle"]
    table = format_table({"iou": iou, "class_accuracy": iou, "miou": 0.4, "fw_iou": 0.4,
                          "pixel_accuracy": 0.4, "mean_class_accuracy": 0.4, "pixels": 10,
                          "miou_13": 0.5}, real.classes)
    assert "mIoU over 13" in table and "50.00" in table


def test_synthia_miou_mmseg_converts_the_19_class_miou_as_the_daformer_family(tmp_path):
    from deeplabv2.evaluation.metrics import add_subset_mious
    cityscapes_tree(tmp_path, [[7, 12]])
    ds = CityscapesDataset(tmp_path, "val", synthia_miou="mmseg")
    assert ds.num_classes == 19
    # 16 classes at 0.6, terrain/truck/train (never labelled in SYNTHIA) at 0: mIoU19 = 9.6/19
    iou = [0.6] * 19
    iou[9] = iou[14] = iou[16] = 0.0
    results = add_subset_mious({"iou": iou, "miou": 9.6 / 19}, ds)
    assert results["miou_16"] == pytest.approx(0.6)  # = mIoU19 * 19 / 16
    with pytest.raises(ValueError, match="synthia_miou must be 'mmseg'.*num_classes 16"):
        CityscapesDataset(tmp_path, "val", num_classes=16, synthia_miou="mmseg")
    with pytest.raises(ValueError, match="synthia_miou must be 'mmseg'.*'mean'"):
        CityscapesDataset(tmp_path, "val", synthia_miou="mean")

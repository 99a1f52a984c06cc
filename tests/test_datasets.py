"""Each dataset reads a tiny fake tree in its official layout, with official file names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplabv2.data import (DATASETS, CityscapesDataset, DatasetError, FolderDataset,
                            GTA5Dataset, PascalContextDataset, PersonPartDataset, VOCDataset,
                            build_dataset, dataset_info, train_to_label_ids, voc_palette)
from deeplabv2.data.cityscapes_labels import LABEL_TO_TRAIN

RNG = np.random.default_rng(0)


# -- helpers -----------------------------------------------------------------------------------
def save_rgb(path: Path, h: int, w: int, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(path, format=fmt)
    return image


def save_label(path: Path, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Single-channel PNG: grayscale, or a palette ("P") PNG when ``palette`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette is not None:
        im = im.convert("P")  # keeps the values as indices
        im.putpalette(palette.flatten().tolist())
    im.save(path)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def raises_naming(path, fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting a :class:`DatasetError` whose message names ``path``."""
    with pytest.raises(DatasetError) as e:
        fn(*args, **kwargs)
    assert str(path) in str(e.value), str(e.value)
    return str(e.value)


# -- Cityscapes --------------------------------------------------------------------------------
CS_FRAME = "aachen_000000_000019"
CS_LABEL_IDS = np.array([[7, 8, 11, 26, 33, 24],
                         [0, 1, 9, 23, 21, 17],
                         [7, 7, 26, 26, 30, 31],
                         [4, 6, 13, 19, 20, 27]], np.uint8)


def cityscapes_tree(root: Path) -> Path:
    save_rgb(root / "leftImg8bit/train/aachen" / f"{CS_FRAME}_leftImg8bit.png", 4, 6)
    save_label(root / "gtFine/train/aachen" / f"{CS_FRAME}_gtFine_labelIds.png", CS_LABEL_IDS)
    # a frame whose labelTrainIds file lies beside its labelIds: the train ids are read as is
    save_rgb(root / "leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png", 4, 6)
    save_label(root / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png",
               np.full((4, 6), 7, np.uint8))
    save_label(root / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png",
               np.full((4, 6), 13, np.uint8))
    save_rgb(root / "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png", 4, 6)
    return root


def test_cityscapes_maps_label_ids_to_the_19_train_ids(tmp_path):
    ds = CityscapesDataset(cityscapes_tree(tmp_path), "train")
    assert ds.num_classes == 19 and ds.classes[0] == "road" and ds.classes[13] == "car"
    assert ds.palette.shape == (19, 3) and ds.palette.dtype == np.uint8
    assert tuple(ds.palette[0]) == (128, 64, 128) and tuple(ds.palette[13]) == (0, 0, 142)
    assert len(ds) == 2 and ds.name(0) == CS_FRAME
    image, label = ds.load(0)
    assert image.shape == (4, 6, 3) and label.dtype == np.uint8
    expected = {7: 0, 8: 1, 11: 2, 26: 13, 33: 18, 24: 11, 23: 10, 21: 8, 17: 5, 13: 4,
                19: 6, 20: 7, 27: 14, 31: 16, 0: 255, 1: 255, 4: 255, 6: 255, 9: 255, 30: 255}
    for label_id, train_id in expected.items():
        assert set(label[CS_LABEL_IDS == label_id]) == {train_id}, label_id
    _, label = ds.load(1)
    assert (label == 13).all()  # from labelTrainIds, not the labelIds (which say 7 -> 0)
    ds.check()


def test_cityscapes_test_split_has_images_only(tmp_path):
    ds = CityscapesDataset(cityscapes_tree(tmp_path), "test")
    assert ds.samples[0][1] is None
    image, label = ds.load(0)
    assert label.shape == image.shape[:2] and (label == 255).all()


def test_train_to_label_ids_inverts_the_mapping():
    train_ids = np.arange(19)
    label_ids = train_to_label_ids(train_ids)
    assert label_ids.tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                  31, 32, 33]
    assert (LABEL_TO_TRAIN[label_ids] == train_ids).all()
    assert train_to_label_ids(np.array([[255, 0]])).tolist() == [[0, 7]]  # no class -> unlabeled
    with pytest.raises(ValueError):
        train_to_label_ids(np.array([-1]))


def test_cityscapes_errors_name_the_file(tmp_path):
    raises_naming(tmp_path / "nope", CityscapesDataset, tmp_path / "nope", "train")
    root = cityscapes_tree(tmp_path / "cs")
    raises_naming(root / "leftImg8bit" / "val", CityscapesDataset, root, "val")
    (root / "leftImg8bit/val/lindau").mkdir(parents=True)
    raises_naming(root / "leftImg8bit" / "val", CityscapesDataset, root, "val")  # empty split

    frame = root / "gtFine/train/aachen" / f"{CS_FRAME}_gtFine_labelIds.png"
    frame.unlink()
    raises_naming(frame, CityscapesDataset, root, "train")

    save_label(frame, np.zeros((5, 6), np.uint8))  # 5 rows, image has 4
    raises_naming(frame, CityscapesDataset(root, "train").check)

    save_label(frame, CS_LABEL_IDS)
    image = root / "leftImg8bit/train/aachen" / f"{CS_FRAME}_leftImg8bit.png"
    image.write_bytes(b"not a png")
    raises_naming(image, CityscapesDataset(root, "train").check)

    save_rgb(image, 4, 6)
    bad = root / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png"
    save_label(bad, np.full((4, 6), 19, np.uint8))  # train id 19 does not exist
    ds = CityscapesDataset(root, "train")
    msg = raises_naming(bad, ds.check)
    assert "19" in msg


# -- GTA5 --------------------------------------------------------------------------------------
def gta5_tree(root: Path) -> Path:
    pal = voc_palette()  # GTA5 labels are palette PNGs whose indices are label ids
    save_rgb(root / "images/00001.png", 4, 6)
    save_label(root / "labels/00001.png", CS_LABEL_IDS, pal)
    save_rgb(root / "images/00002.png", 8, 12)  # its label is half the size, as in some frames
    save_label(root / "labels/00002.png", CS_LABEL_IDS, pal)
    return root


def test_gta5_maps_to_cityscapes_and_resizes_mismatched_labels_nearest(tmp_path):
    ds = GTA5Dataset(gta5_tree(tmp_path), "train")
    assert ds.num_classes == 19 and len(ds) == 2
    assert ds.classes == CityscapesDataset.classes
    _, label = ds.load(0)
    assert (label == LABEL_TO_TRAIN[CS_LABEL_IDS]).all()
    image, label = ds.load(1)
    assert label.shape == image.shape[:2] == (8, 12)
    expected = np.repeat(np.repeat(LABEL_TO_TRAIN[CS_LABEL_IDS], 2, 0), 2, 1)
    assert (label == expected).all()  # nearest: every pixel a copy, no blended ids
    ds.check()


def test_gta5_splits_from_list_files(tmp_path):
    root = gta5_tree(tmp_path)
    assert len(GTA5Dataset(root, "all")) == 2
    raises_naming(root / "val.txt", GTA5Dataset, root, "val")
    write(root / "val.txt", "00002.png\n")
    write(root / "train.txt", "00001\n")
    assert [ds.name(0) for ds in (GTA5Dataset(root, "val"), GTA5Dataset(root, "train"))] == \
        ["00002", "00001"]
    write(root / "val.txt", "00003.png\n")
    raises_naming(root / "images" / "00003.png", GTA5Dataset, root, "val")


# -- PASCAL VOC 2012 ---------------------------------------------------------------------------
VOC_LABEL = np.array([[0, 0, 1, 1, 255],
                      [0, 15, 15, 255, 20],
                      [12, 15, 15, 255, 20]], np.uint8)


def voc_tree(root: Path) -> Path:
    voc = root / "VOCdevkit/VOC2012"
    for name in ("2007_000032", "2007_000039", "2008_000002"):
        save_rgb(voc / "JPEGImages" / f"{name}.jpg", 3, 5, fmt="JPEG")
    save_label(voc / "SegmentationClass/2007_000032.png", VOC_LABEL, voc_palette())
    save_label(voc / "SegmentationClass/2007_000039.png", VOC_LABEL, voc_palette())
    save_label(voc / "SegmentationClassAug/2008_000002.png", VOC_LABEL)  # grayscale
    save_label(voc / "SegmentationClassAug/2007_000032.png", VOC_LABEL)
    write(voc / "ImageSets/Segmentation/train.txt", "2007_000032\n")
    write(voc / "ImageSets/Segmentation/val.txt", "2007_000039\n")
    write(voc / "ImageSets/SegmentationAug/train_aug.txt",
          "/JPEGImages/2008_000002.jpg /SegmentationClassAug/2008_000002.png\n"
          "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n")
    return root


def test_voc_reads_palette_pngs_as_indices(tmp_path):
    root = voc_tree(tmp_path)
    with Image.open(root / "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png") as im:
        assert im.mode == "P"  # the fixture is a real palette PNG, as the official files
    ds = VOCDataset(root, "train")
    assert ds.num_classes == 21 and ds.classes[15] == "person"
    assert tuple(ds.palette[1]) == (128, 0, 0) and tuple(ds.palette[15]) == (192, 128, 128)
    image, label = ds.load(0)
    assert image.shape == (3, 5, 3) and (label == VOC_LABEL).all()  # 255 border kept as ignore
    ds.check()
    assert VOCDataset(root, "val").name(0) == "2007_000039"


def test_voc_train_aug_split_and_list_formats(tmp_path):
    root = voc_tree(tmp_path)
    ds = build_dataset("voc12_aug", root, "train")
    assert ds.split == "train_aug" and len(ds) == 2 and ds.name(0) == "2008_000002"
    assert "SegmentationClassAug" in str(ds.samples[0][1])
    assert (ds.load(0)[1] == VOC_LABEL).all()
    voc = root / "VOCdevkit/VOC2012"
    write(voc / "ImageSets/SegmentationAug/train_aug.txt", "2008_000002\n2007_000032\n")
    # root may also be VOCdevkit/VOC2012 itself, as in configs/voc12_aug.yaml
    assert [VOCDataset(voc, "train_aug").name(i) for i in range(2)] == ["2008_000002",
                                                                        "2007_000032"]


def test_voc_errors_name_the_file(tmp_path):
    root = voc_tree(tmp_path)
    voc = root / "VOCdevkit/VOC2012"
    raises_naming(voc / "ImageSets/Segmentation/trainval.txt", VOCDataset, root, "trainval")
    write(voc / "ImageSets/Segmentation/trainval.txt", "2007_000032\n2007_000099\n")
    raises_naming(voc / "JPEGImages/2007_000099.jpg", VOCDataset, root, "trainval")
    write(voc / "ImageSets/Segmentation/trainval.txt", "\n")
    raises_naming(voc / "ImageSets/Segmentation/trainval.txt", VOCDataset, root, "trainval")
    rgb = voc / "SegmentationClass/2007_000032.png"  # an RGB-converted label, a common mistake
    Image.fromarray(voc_palette()[VOC_LABEL]).save(rgb)
    assert "mode RGB" in raises_naming(rgb, VOCDataset(root, "train").check)
    raises_naming(tmp_path / "empty", VOCDataset, tmp_path / "empty", "train")
    (tmp_path / "empty").mkdir()
    raises_naming(tmp_path / "empty", VOCDataset, tmp_path / "empty", "train")


# -- PASCAL-Context ----------------------------------------------------------------------------
def test_context_60_classes_by_default_background_counted(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2010"
    save_rgb(voc / "JPEGImages/2008_000002.jpg", 2, 3, fmt="JPEG")
    save_label(voc / "SegmentationClassContext/2008_000002.png",
               np.array([[0, 1, 59], [37, 255, 2]], np.uint8))
    write(voc / "ImageSets/SegmentationContext/train.txt", "2008_000002\n")
    ds = PascalContextDataset(tmp_path, "train")  # the paper's protocol: 59 + background
    assert ds.num_classes == 60 and ds.palette.shape == (60, 3)
    assert ds.classes[0] == "background" and ds.classes[37] == "person"
    assert ds.load(0)[1].tolist() == [[0, 1, 59], [37, 255, 2]]
    ds.check()
    with pytest.raises(ValueError, match="60 .* or 59"):
        PascalContextDataset(tmp_path, "train", num_classes=21)


def test_context_59_ignores_background_and_shifts_the_59_classes(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2010"
    save_rgb(voc / "JPEGImages/2008_000002.jpg", 2, 3, fmt="JPEG")
    save_label(voc / "SegmentationClassContext/2008_000002.png",
               np.array([[0, 1, 59], [37, 255, 2]], np.uint8))
    write(voc / "ImageSets/SegmentationContext/train.txt", "2008_000002\n")
    ds = PascalContextDataset(tmp_path, "train", num_classes=59)
    assert ds.num_classes == 59 and ds.palette.shape == (59, 3)
    assert ds.classes[0] == "aeroplane" and ds.classes[36] == "person"
    assert ds.load(0)[1].tolist() == [[255, 0, 58], [36, 255, 1]]
    ds.check()
    save_label(voc / "SegmentationClassContext/2008_000002.png", np.full((2, 3), 60, np.uint8))
    raises_naming(voc / "SegmentationClassContext/2008_000002.png", ds.check)
    raises_naming(voc / "ImageSets/SegmentationContext/val.txt", PascalContextDataset,
                  tmp_path, "val", num_classes=59)


# -- PASCAL-Person-Part ------------------------------------------------------------------------
def test_person_part_layout_and_range_check(tmp_path):
    save_rgb(tmp_path / "JPEGImages/2008_000003.jpg", 2, 4, fmt="JPEG")
    part = np.array([[0, 1, 2, 3], [4, 5, 6, 255]], np.uint8)
    save_label(tmp_path / "SegmentationPart/2008_000003.png", part, voc_palette())
    write(tmp_path / "train_id.txt", "2008_000003\n")
    ds = PersonPartDataset(tmp_path, "train")
    assert ds.classes == ("background", "head", "torso", "upper arms", "lower arms",
                          "upper legs", "lower legs")
    assert (ds.load(0)[1] == part).all()
    ds.check()
    save_label(tmp_path / "SegmentationPart/2008_000003.png", np.full((2, 4), 7, np.uint8))
    raises_naming(tmp_path / "SegmentationPart/2008_000003.png", ds.check)
    raises_naming(tmp_path / "val_id.txt", PersonPartDataset, tmp_path, "val")


# -- folder ------------------------------------------------------------------------------------
def test_folder_dataset_reads_classes_palette_and_matches_stems(tmp_path):
    write(tmp_path / "classes.txt", "road 128 64 128\ncar\n# a comment\ntraffic sign 220 220 0\n")
    save_rgb(tmp_path / "images/train/a.jpg", 3, 4, fmt="JPEG")
    save_rgb(tmp_path / "images/train/b.png", 3, 4)
    save_label(tmp_path / "masks/train/a.png", np.array([[0, 1, 2, 255]] * 3))
    save_label(tmp_path / "masks/train/b.png", np.zeros((3, 4)))
    ds = FolderDataset(tmp_path, "train")
    assert ds.classes == ("road", "car", "traffic sign")
    assert ds.palette.tolist() == [[128, 64, 128], voc_palette(2)[1].tolist(), [220, 220, 0]]
    assert [ds.name(i) for i in range(len(ds))] == ["a", "b"]
    ds.check()
    info = dataset_info("folder", tmp_path)
    assert info.classes == ds.classes and (info.palette == ds.palette).all()

    save_rgb(tmp_path / "images/train/c.png", 3, 4)
    save_label(tmp_path / "masks/train/d.png", np.zeros((3, 4)))
    msg = raises_naming(tmp_path / "images" / "train", FolderDataset, tmp_path, "train")
    assert "without a mask" in msg and ": c;" in msg and msg.endswith("without an image: d")

    save_label(tmp_path / "masks/train/b.png", np.full((3, 4), 3))
    (tmp_path / "images/train/c.png").unlink()
    (tmp_path / "masks/train/d.png").unlink()
    raises_naming(tmp_path / "masks/train/b.png", FolderDataset(tmp_path, "train").check)
    raises_naming(tmp_path / "images" / "val", FolderDataset, tmp_path, "val")
    (tmp_path / "classes.txt").unlink()
    raises_naming(tmp_path / "classes.txt", FolderDataset, tmp_path, "train")


# -- registry ----------------------------------------------------------------------------------
def test_registry_knows_every_dataset_and_lists_names_on_error(tmp_path):
    with pytest.raises(DatasetError) as e:
        build_dataset("kitti", tmp_path, "train")
    for name in DATASETS:
        assert name in str(e.value)
    expected = {"cityscapes": 19, "gta5": 19, "voc12": 21, "voc12_aug": 21, "context": 60,
                "person_part": 7, "synthetic": 7}
    for name, n in expected.items():
        info = dataset_info(name)
        assert info.num_classes == n and len(set(info.classes)) == n, name
        assert info.palette.shape == (n, 3) and info.palette.dtype == np.uint8, name
    with pytest.raises(DatasetError, match="root"):
        dataset_info("folder")
    ds = build_dataset("synthetic", None, "val", seed=3, num_samples=4, size=[48, 64])
    assert len(ds) == 4 and ds.load(0)[0].shape == (48, 64, 3) and ds.seed == 3
    assert isinstance(build_dataset("cityscapes", cityscapes_tree(tmp_path), "train"),
                      CityscapesDataset)


def test_an_empty_synthetic_set_names_the_dataset_and_its_option(tmp_path, capsys):
    """``num_samples: 0`` used to fail as ``None: split 'train' is empty`` (the missing root)."""
    from deeplabv2.cli import main
    with pytest.raises(DatasetError, match=r"^dataset 'synthetic', split 'train': "
                                           r"num_samples=0 makes no images; set num_samples "
                                           r"to 1 or more"):
        build_dataset("synthetic", None, "train", num_samples=0)
    assert main(["train", "-c", "demo", "data.options={num_samples: 0}", "train.amp=none",
                 f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("deeplabv2 train: error: dataset 'synthetic', split 'train': num_samples=0 "
                   "makes no images; set num_samples to 1 or more (data.options, "
                   "adapt.target_options)"), err
    assert not (tmp_path / "run").exists()

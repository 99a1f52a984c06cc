"""Scoring a prediction folder: the same mIoU as the official Cityscapes evaluator, clear errors.

The fixture is a tiny Cityscapes tree in the official layout (3 frames of 16x24 pixels, two
cities) with noisy label id predictions that include non-evaluated label ids. The official
``cityscapesscripts`` evaluator runs in-process on the same files.
"""

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from deeplabv2.data.base import SegmentationDataset, read_label_png
from deeplabv2.data.cityscapes_labels import CLASSES, LABEL_TO_TRAIN, LABELS, TRAIN_TO_LABEL
from deeplabv2.evaluation.metrics import ConfusionMatrix
from deeplabv2.evaluation.score import ScoreError, score_folder
from extras import require

FRAMES = [("aachen", "000000", "000019"), ("aachen", "000001", "000019"),
          ("bochum", "000000", "000313")]
# Prediction names: the official convention is only the "{city}_{seq}_{frame}" prefix, and files
# may sit in subfolders.
PRED_NAMES = ["aachen/aachen_000000_000019_leftImg8bit.png", "aachen/aachen_000001_000019_pred.png",
              "bochum_000000_000313.png"]
H, W = 16, 24
ABSENT = 31  # "train": removed from ground truth and predictions, so its IoU is NaN


class TinyCityscapes(SegmentationDataset):
    """Test-local stand-in for the package's Cityscapes dataset: official layout, label ids
    mapped to train ids. Switch to ``deeplabv2.data.cityscapes`` once it exists."""

    classes = CLASSES

    def __init__(self, root, split="val"):
        super().__init__(root, split)
        for image in sorted((self.root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            frame = image.name[: -len("_leftImg8bit.png")]
            city = image.parent.name
            label = self.root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png"
            self.samples.append((image, label))

    def read_label(self, path):
        return LABEL_TO_TRAIN[read_label_png(path)]


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def cityscapes(tmp_path):
    """``(dataset, label id predictions {file name: array})``, ground truth written to disk."""
    rng = np.random.default_rng(0)
    label_ids = [label.label_id for label in LABELS if label.label_id != ABSENT]
    root = tmp_path / "cityscapes"
    predictions = {}
    for (city, seq, frame), name in zip(FRAMES, PRED_NAMES):
        stem = f"{city}_{seq}_{frame}"
        gt = rng.choice(label_ids, size=(H, W))
        # A prediction right on ~60% of the pixels, any label id (evaluated or not) elsewhere.
        pred = np.where(rng.random((H, W)) < 0.6, gt, rng.choice(label_ids, size=(H, W)))
        save_png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", gt)
        save_png(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
                 rng.integers(0, 256, (H, W, 3)))
        predictions[name] = pred
    return TinyCityscapes(root), predictions


def write_predictions(folder, predictions, to_train_ids=False):
    for name, pred in predictions.items():
        save_png(folder / name, LABEL_TO_TRAIN[pred] if to_train_ids else pred)
    return folder


def official_scores(cityscapes_root, pred_dir):
    """Run ``evalPixelLevelSemanticLabeling`` in-process: ``(class average IoU, {name: IoU})``.

    The module keeps its settings in a global ``args`` object read at import (no environment
    variable is needed to import it). We pass a copy with: our prediction folder (instead of
    ``CITYSCAPES_RESULTS``); no instance-level nIoU (it would need ``*_instanceIds.png``); no
    JSON (it would write ``evaluationResults/`` next to the installed package); quiet. Its errors
    call ``sys.exit``, which pytest reports as a failure.
    """
    official = require("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
                       "cityscapesscripts, the official evaluator, is not installed")
    args = copy.copy(official.args)
    args.predictionPath, args.predictionWalk = str(pred_dir), None
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet, args.colorized = True, False
    ground_truth = sorted(str(p) for p in
                          (cityscapes_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(ground_truth) == len(FRAMES)
    predictions = [official.getPrediction(args, gt) for gt in ground_truth]
    result = official.evaluateImgLists(predictions, ground_truth, args)
    return result["averageScoreClasses"], result["classScores"]


def test_miou_equals_the_official_cityscapes_evaluator(cityscapes, tmp_path):
    dataset, predictions = cityscapes
    assert any(LABEL_TO_TRAIN[p].max() == 255 for p in predictions.values())  # void predictions
    pred_dir = write_predictions(tmp_path / "results", predictions)
    official_miou, official_iou = official_scores(dataset.root, pred_dir)

    ours = score_folder(pred_dir, dataset, id_format="label")
    assert ours["miou"] == pytest.approx(official_miou, abs=1e-6)
    for name, iou in zip(CLASSES, ours["iou"]):
        assert iou == pytest.approx(official_iou[name], abs=1e-6, nan_ok=True), name
    assert math.isnan(ours["iou"][LABEL_TO_TRAIN[ABSENT]])
    np.testing.assert_equal(score_folder(pred_dir, dataset), ours)  # "auto" finds label ids


@pytest.mark.parametrize("id_format", ["train", "auto"])
def test_train_id_predictions_score_like_label_ids(cityscapes, tmp_path, id_format):
    dataset, predictions = cityscapes
    as_labels = score_folder(write_predictions(tmp_path / "labels", predictions), dataset)
    train_dir = write_predictions(tmp_path / "train", predictions, to_train_ids=True)
    np.testing.assert_equal(score_folder(train_dir, dataset, id_format=id_format), as_labels)


def test_values_valid_in_both_encodings_need_an_explicit_id_format(cityscapes, tmp_path):
    dataset, predictions = cityscapes
    all_road = {name: np.full((H, W), 7) for name in predictions}  # label id road, train id sign
    pred_dir = write_predictions(tmp_path / "results", all_road)
    with pytest.raises(ScoreError, match="pass id_format='label' or id_format='train'"):
        score_folder(pred_dir, dataset)
    road = CLASSES.index("road")
    assert score_folder(pred_dir, dataset, id_format="label")["class_accuracy"][road] == 1.0
    assert score_folder(pred_dir, dataset, id_format="train")["class_accuracy"][road] == 0.0


def test_missing_prediction_is_named(cityscapes, tmp_path):
    dataset, predictions = cityscapes
    del predictions["bochum_000000_000313.png"]
    pred_dir = write_predictions(tmp_path / "results", predictions)
    with pytest.raises(ScoreError, match=r"bochum_000000_000313\*\.png: prediction not found"):
        score_folder(pred_dir, dataset)


def test_several_predictions_for_one_frame_are_an_error(cityscapes, tmp_path):
    dataset, predictions = cityscapes
    pred_dir = write_predictions(tmp_path / "results", predictions)
    save_png(pred_dir / "aachen_000000_000019_copy.png", predictions[PRED_NAMES[0]])
    with pytest.raises(ScoreError, match="several predictions for aachen_000000_000019"):
        score_folder(pred_dir, dataset)


def test_prediction_of_another_size_is_named(cityscapes, tmp_path):
    dataset, predictions = cityscapes
    predictions[PRED_NAMES[1]] = predictions[PRED_NAMES[1]][:, :-1]
    pred_dir = write_predictions(tmp_path / "results", predictions)
    with pytest.raises(ScoreError, match="aachen_000001_000019_pred.png: prediction is 23x16 but "
                                         "ground truth .* is 24x16"):
        score_folder(pred_dir, dataset)


def test_value_that_is_no_label_id_is_named(cityscapes, tmp_path):
    dataset, predictions = cityscapes
    predictions[PRED_NAMES[2]][0, 0] = 40
    pred_dir = write_predictions(tmp_path / "results", predictions)
    with pytest.raises(ScoreError, match="bochum_000000_000313.png: value 40 is not a Cityscapes "
                                         "label id"):
        score_folder(pred_dir, dataset)


def test_rgb_prediction_is_refused(cityscapes, tmp_path):
    dataset, predictions = cityscapes
    pred_dir = write_predictions(tmp_path / "results", predictions)
    save_png(pred_dir / PRED_NAMES[0], np.zeros((H, W, 3)))
    with pytest.raises(ScoreError, match="mode RGB"):
        score_folder(pred_dir, dataset)


class TinyDataset(SegmentationDataset):
    """A non-Cityscapes split: ``{root}/{name}.jpg`` images, ``{name}_label.png`` train ids."""

    classes = ("background", "cat", "dog")

    def __init__(self, root):
        super().__init__(root, "val")
        self.samples = [(self.root / f"{n}.jpg", self.root / f"{n}_label.png") for n in ("a", "b")]


def test_other_datasets_read_train_ids_by_name(tmp_path):
    rng = np.random.default_rng(1)
    dataset = TinyDataset(tmp_path / "data")
    expected = ConfusionMatrix(3)
    for i in range(len(dataset)):
        gt = rng.choice([0, 1, 2, 255], size=(H, W))
        pred = rng.choice([0, 1, 2, 255], size=(H, W))  # 255: no class, a miss
        save_png(dataset.samples[i][1], gt)
        save_png(tmp_path / "pred" / f"{dataset.name(i)}.png", pred)
        expected.update(torch.from_numpy(pred), torch.from_numpy(gt), void_index=255)
    save_png(tmp_path / "pred" / "stray.png", pred)
    scored = score_folder(tmp_path / "pred", dataset)
    assert scored.pop("files") == {"matched": len(dataset), "extra": ["stray.png"]}
    np.testing.assert_equal(scored, expected.compute())

    with pytest.raises(ScoreError, match="is for Cityscapes label ids"):
        score_folder(tmp_path / "pred", dataset, id_format="label")
    (tmp_path / "pred" / "b.png").unlink()
    with pytest.raises(ScoreError, match=r"pred/b\.png: prediction not found"):
        score_folder(tmp_path / "pred", dataset)


def test_label_table_matches_the_official_one():
    official = require("cityscapesscripts.helpers.labels",
                       "cityscapesscripts, the official label table, is not installed")
    expected = [(label.id, label.trainId if label.trainId >= 0 else 255, label.name)
                for label in official.labels if label.id >= 0]
    ours = [(label.label_id, label.train_id, label.name) for label in LABELS]
    assert ours == expected
    assert [official.trainId2label[t].id for t in range(19)] == TRAIN_TO_LABEL.tolist()
    assert [official.trainId2label[t].name for t in range(19)] == list(CLASSES)


def test_predict_cityscapes_ids_output_scores_without_renaming(cityscapes, tmp_path):
    """`predict --cityscapes-ids` writes {stem}.png (train ids) and {stem}_labelIds.png side by
    side; `score` takes the label id files as they are, and says what it matched."""
    from deeplabv2 import build_model
    from deeplabv2.inference.predict import predict_files
    dataset, _ = cityscapes
    model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                         "num_classes": 19}).eval()
    with torch.no_grad():  # a head that predicts several classes, so the scores mean something
        model.head.convs[0].bias.copy_(torch.linspace(-1, 1, 19))
    out = tmp_path / "pred"
    predict_files(model, str(dataset.root / "leftImg8bit" / "val" / "*" / "*.png"), out,
                  dataset.palette if dataset.palette is not None else np.zeros((19, 3), np.uint8),
                  progress=False, cityscapes_ids=True)
    (out / "notes.png").write_bytes(b"")  # a stray file: reported, not scored
    as_label_ids = score_folder(out, dataset)
    assert as_label_ids["files"] == {"matched": 3, "extra": ["notes.png"]}
    as_train_ids = score_folder(out, dataset, id_format="train")
    assert as_train_ids.pop("files") == as_label_ids.pop("files")
    np.testing.assert_equal(as_label_ids, as_train_ids)

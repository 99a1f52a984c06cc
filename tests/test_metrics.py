"""Confusion matrix metrics against values computed by hand, accumulation, saving and reduction."""

import json
import math
import os

import pytest
import torch

from deeplabv2.evaluation.metrics import ConfusionMatrix, format_table, save_json

NAMES = ["road", "car", "sky", "bus"]


def hand_example():
    """A 2x3 image of 4 classes; the last pixel is ignored (its prediction 3 is not counted).

    Counted (ground truth, prediction) pairs: (0,0) (0,0) (0,1) (1,1) (2,1), so

        M = [[2, 1, 0, 0],      ground-truth pixels per class  [3, 1, 1, 0]
             [0, 1, 0, 0],      predicted pixels per class     [2, 3, 0, 0]
             [0, 1, 0, 0],      true positives                 [2, 1, 0, 0]
             [0, 0, 0, 0]]      union = gt + pred - tp         [3, 3, 1, 0]

    IoU = [2/3, 1/3, 0, NaN] (bus is absent from both), mIoU = (2/3 + 1/3 + 0) / 3 = 1/3,
    pixel accuracy = 3/5, class accuracy = [2/3, 1, 0, NaN], mean = (2/3 + 1 + 0) / 3 = 5/9,
    fwIoU = 3/5 * 2/3 + 1/5 * 1/3 + 1/5 * 0 = 7/15.
    """
    target = torch.tensor([[0, 0, 0], [1, 2, 255]])
    pred = torch.tensor([[0, 0, 1], [1, 1, 3]])
    return pred, target


def test_hand_computed_example():
    cm = ConfusionMatrix(4)
    cm.update(*hand_example())
    assert cm.matrix.tolist() == [[2, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    r = cm.compute()
    assert r["iou"][:3] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["pixel_accuracy"] == pytest.approx(3 / 5)
    assert r["class_accuracy"][:3] == pytest.approx([2 / 3, 1.0, 0.0])
    assert math.isnan(r["class_accuracy"][3])
    assert r["mean_class_accuracy"] == pytest.approx(5 / 9)
    assert r["fw_iou"] == pytest.approx(7 / 15)
    assert r["pixels"] == 5


def test_ignored_and_out_of_range_targets_are_not_counted():
    reference, cm = ConfusionMatrix(4), ConfusionMatrix(4)
    reference.update(*hand_example())
    cm.update(*hand_example())
    # More pixels whose ground truth is ignored (255) or no class (7, -1): nothing changes,
    # whatever was predicted there.
    cm.update(torch.tensor([0, 1, 2, 3]), torch.tensor([255, 255, 7, -1]))
    assert torch.equal(cm.counts, reference.counts)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0]))
    r = cm.compute()
    assert r["iou"][0] == pytest.approx(2 / 3) and r["iou"][2] == 0.0
    assert math.isnan(r["iou"][1])  # never seen: left out of the mean
    assert r["miou"] == pytest.approx((2 / 3 + 0) / 2)
    assert r["mean_class_accuracy"] == pytest.approx(2 / 3)  # only class 0 is in ground truth


def test_accumulating_batches_equals_one_update_on_the_concatenation():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 5, (2, 7, 9), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 6, (2, 7, 9), generator=g) for _ in range(3)]
    for t in targets:
        t[t == 5] = 255
    once, batched = ConfusionMatrix(5), ConfusionMatrix(5)
    once.update(torch.cat(preds), torch.cat(targets))
    for p, t in zip(preds, targets):
        batched.update(p.to(torch.uint8), t.to(torch.uint8))  # uint8 must not overflow
    assert torch.equal(once.counts, batched.counts)
    assert batched.compute() == once.compute()


@pytest.mark.parametrize("bad", [4, -1, 255])
def test_prediction_outside_the_classes_raises(bad):
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match=f"prediction value {bad} is outside 0..3"):
        cm.update(torch.tensor([0, bad]), torch.tensor([0, 1]))


def test_bad_inputs_raise():
    cm = ConfusionMatrix(4)
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 4, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))


def test_void_prediction_is_a_miss_and_no_false_positive():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 255, 1, 255]), torch.tensor([0, 0, 1, 255]), void_index=255)
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert cm.missed.tolist() == [1, 0, 0]
    r = cm.compute()
    assert r["iou"][:2] == pytest.approx([1 / 2, 1.0])
    assert r["pixel_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="prediction value 3"):  # void does not widen the range
        cm.update(torch.tensor([3]), torch.tensor([0]), void_index=255)


def test_empty_matrix_gives_nan_without_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = ConfusionMatrix(2).compute()
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy", "fw_iou"):
        assert math.isnan(r[key])


def test_state_dict_saves_and_merges(tmp_path):
    pred, target = hand_example()
    first, second = ConfusionMatrix(4), ConfusionMatrix(4)
    first.update(pred[0], target[0])
    second.update(pred[1], target[1])
    torch.save(second.state_dict(), tmp_path / "cm.pt")
    first.merge(torch.load(tmp_path / "cm.pt", weights_only=True))
    whole = ConfusionMatrix(4)
    whole.update(pred, target)
    assert torch.equal(first.counts, whole.counts)

    restored = ConfusionMatrix(4)
    restored.load_state_dict(whole.state_dict())
    assert torch.equal(restored.counts, whole.counts)
    with pytest.raises(ValueError, match="cannot merge"):
        ConfusionMatrix(5).merge(whole)


def test_from_counts_gives_the_numbers_of_the_matrix_that_counted_them():
    """The report (per image) hands its own counts over: the same numbers, bit for bit, as the
    matrix that counted the pixels itself, from a tensor or an array."""
    import numpy as np
    cm = ConfusionMatrix(4)
    cm.update(*hand_example())
    cm.update(torch.tensor([0, 255, 2]), torch.tensor([0, 1, 2]), void_index=255)
    for counts in (cm.counts.clone(), cm.counts.numpy().astype(np.int32)):
        again = ConfusionMatrix.from_counts(counts)
        assert again.num_classes == 4 and again.ignore_index == 255
        assert again.counts.dtype == torch.int64 and torch.equal(again.counts, cm.counts)
        assert json.dumps(again.compute()) == json.dumps(cm.compute())
    with pytest.raises(ValueError, match=r"\(C, C \+ 1\)"):
        ConfusionMatrix.from_counts(cm.matrix)
    with pytest.raises(TypeError, match="integers"):
        ConfusionMatrix.from_counts(cm.counts.double())


def test_reset():
    cm = ConfusionMatrix(4)
    cm.update(*hand_example())
    cm.reset()
    assert cm.counts.sum() == 0


def test_reduce_without_process_group_is_a_no_op():
    cm = ConfusionMatrix(4)
    cm.update(*hand_example())
    before = cm.counts.clone()
    assert cm.reduce_() is cm
    assert torch.equal(cm.counts, before)


def _reduce_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    pred, target = hand_example()
    cm = ConfusionMatrix(4)
    cm.update(pred[rank], target[rank])  # each rank sees one row of the image
    cm.reduce_()
    torch.save(cm.counts, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_reduce_sums_across_two_ranks(tmp_path):
    # fork, not spawn: the children need not import torch again (seconds instead of ~15 s)
    torch.multiprocessing.start_processes(_reduce_worker, nprocs=2, start_method="fork",
                                          args=(str(tmp_path / "init"), str(tmp_path)))
    whole = ConfusionMatrix(4)
    whole.update(*hand_example())
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), whole.counts)


def test_format_table():
    cm = ConfusionMatrix(4)
    cm.update(*hand_example())
    table = format_table(cm.compute(), NAMES)
    lines = table.splitlines()
    assert lines[1].split() == ["road", "66.67", "66.67"]
    assert lines[3].split() == ["sky", "0.00", "0.00"]
    assert lines[4].split() == ["bus", "-", "-"]
    assert "mIoU" in table and "33.33" in table
    assert "fwIoU" in table and "46.67" in table
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        format_table(cm.compute(), NAMES[:3])


def test_save_json_writes_nan_as_null_and_replaces_atomically(tmp_path):
    cm = ConfusionMatrix(4)
    cm.update(*hand_example())
    path = tmp_path / "eval" / "metrics.json"
    path.parent.mkdir()
    path.write_text("old")
    results = {**cm.compute(), "confusion": cm.matrix.tolist(), "note": [float("nan")]}
    save_json(results, NAMES, path)
    data = json.loads(path.read_text())
    assert data["miou"] == pytest.approx(1 / 3)
    assert data["fw_iou"] == pytest.approx(7 / 15)
    assert data["pixels"] == 5
    assert data["classes"]["road"]["iou"] == pytest.approx(2 / 3)
    assert data["classes"]["bus"] == {"iou": None, "accuracy": None}
    assert data["confusion"] == cm.matrix.tolist() and data["note"] == [None]  # extras kept
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left behind

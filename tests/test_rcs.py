"""DAFormer's rare-class sampling (deeplabv2.data.rcs): probabilities, cached statistics, the
choice of images, the crop re-draws, determinism per (seed, step), DDP ranks, exact resume."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from deeplabv2.config import ConfigError, load_config
from deeplabv2.data import rcs as rcs_module
from deeplabv2.data.base import DatasetError
from deeplabv2.data.folder import FolderDataset
from deeplabv2.data.rcs import (MAX_CROP_CHECKS, RareClassBatchSampler, RareClassCrops,
                                RareClassSampling, RCSSettings, class_probabilities,
                                class_stats, count_classes)
from deeplabv2.data.synthetic import SyntheticDataset
from deeplabv2.data.transforms import TrainTransform
from deeplabv2.train import train

from test_train import tiny_config


# -- probabilities ------------------------------------------------------------------------------
def test_probabilities_from_given_frequencies_by_hand():
    # 6000, 3000, 1000 pixels and a class that never occurs: f = 0.6, 0.3, 0.1
    classes, p = class_probabilities([6000, 3000, 1000, 0], temperature=0.5)
    assert classes.tolist() == [0, 1, 2]  # class 3 has no pixels: never drawn
    e = [math.exp(0.4 / 0.5), math.exp(0.7 / 0.5), math.exp(0.9 / 0.5)]  # exp((1 - f) / T)
    assert p.tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-12)
    # T = 0.01 (the released value): (1 - f) / T = 40, 70, 90
    classes, p = class_probabilities([6000, 3000, 1000, 0], temperature=0.01)
    e = [math.exp(40 - 90), math.exp(70 - 90), 1.0]
    assert p.tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-12)
    assert p[2] == pytest.approx(1 / (1 + math.exp(-20) + math.exp(-50)))
    # f = 0.5, 0.3, 0.2 at T = 0.1: (1 - f) / T = 5, 7, 8, softmax written out as numbers
    # (e^5 = 148.413, e^7 = 1096.633, e^8 = 2980.958 of a sum of 4226.004)
    classes, p = class_probabilities([5000, 3000, 2000], temperature=0.1)
    assert classes.tolist() == [0, 1, 2]
    assert p.tolist() == pytest.approx([0.035119026959, 0.259496460342, 0.705384512698], rel=1e-10)


def test_probabilities_match_the_released_definition():
    """DAFormer's get_rcs_class_probs written out with plain tensor ops on a
    sample_class_stats list (per image: {class: pixels}, classes without pixels absent)."""
    rng = np.random.default_rng(3)
    stats = []
    for _ in range(40):
        stats.append({str(c): int(rng.integers(1, 20000)) for c in range(19)
                      if rng.random() < (0.9 if c < 10 else 0.2)})
    totals: dict[int, int] = {}
    for s in stats:
        for c, n in s.items():
            totals[int(c)] = totals.get(int(c), 0) + n
    ordered = sorted(totals.items(), key=lambda kv: kv[1])
    freq = torch.tensor([n for _, n in ordered])
    freq = 1 - freq / freq.sum()
    released = dict(zip([c for c, _ in ordered], torch.softmax(freq / 0.01, -1).tolist()))

    counts = np.zeros((len(stats), 19), dtype=np.int64)
    for i, s in enumerate(stats):
        for c, n in s.items():
            counts[i, int(c)] = n
    classes, p = class_probabilities(counts.sum(0), 0.01)
    assert sorted(released) == classes.tolist()
    for c, q in zip(classes.tolist(), p.tolist()):
        assert q == pytest.approx(released[c], rel=1e-4, abs=1e-9), c


# -- statistics and their cache -----------------------------------------------------------------
def _folder(root, labels):
    """A folder dataset of the given uint8 labels (3 classes), images all grey."""
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "masks" / "train").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    for i, label in enumerate(labels):
        h, w = label.shape
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "images" / "train"
                                                                 / f"{i:03d}.png")
        Image.fromarray(label).save(root / "masks" / "train" / f"{i:03d}.png")
    return FolderDataset(root, "train")


def _labels():
    a = np.zeros((8, 10), np.uint8)
    a[:2] = 1
    a[7, :4] = 255  # ignored: not counted
    b = np.full((8, 10), 2, np.uint8)
    b[0, 0] = 0
    return [a, b]


def test_counts_are_pixels_per_class_and_the_cache_round_trips(tmp_path, monkeypatch):
    ds = _folder(tmp_path / "data", _labels())
    expected = [[80 - 20 - 4, 20, 0], [1, 0, 79]]  # by hand from _labels()
    counts = class_stats(ds)
    assert counts.tolist() == expected
    cache = tmp_path / "data" / "rcs_class_stats_train.json"  # beside the dataset
    record = json.loads(cache.read_text())
    assert record["counts"] == expected
    assert record["files"] == ["masks/train/000.png", "masks/train/001.png"]
    assert record["classes"] == ["a", "b", "c"]

    def no_counting(dataset):
        raise AssertionError("counted again instead of reading the cache")
    monkeypatch.setattr(rcs_module, "count_classes", no_counting)
    again = class_stats(FolderDataset(tmp_path / "data", "train"))
    assert again.tolist() == expected and again.dtype == np.int64


def test_the_cache_is_recomputed_when_the_file_list_changes(tmp_path):
    root = tmp_path / "data"
    labels = _labels()
    class_stats(_folder(root, labels))
    c = np.full((8, 10), 1, np.uint8)
    ds = _folder(root, [*labels, c])  # a third image
    lines = []
    assert class_stats(ds, log=lines.append).tolist() == [[56, 20, 0], [1, 0, 79], [0, 80, 0]]
    assert "recomputing" in lines[0]
    cache = root / "rcs_class_stats_train.json"
    assert len(json.loads(cache.read_text())["files"]) == 3
    # a label file rewritten with another size (here: another content) is another file list
    Image.fromarray(np.random.default_rng(0).integers(0, 3, (8, 10)).astype(np.uint8)).save(
        root / "masks" / "train" / "002.png")
    fresh = count_classes(FolderDataset(root, "train"))
    assert class_stats(FolderDataset(root, "train")).tolist() == fresh.tolist()
    assert fresh[2].tolist() != [0, 80, 0]


def test_an_explicit_cache_file_and_clear_errors(tmp_path):
    ds = _folder(tmp_path / "data", _labels())
    cache = tmp_path / "elsewhere" / "stats.json"
    class_stats(ds, cache)
    assert cache.is_file() and not (tmp_path / "data" / "rcs_class_stats_train.json").exists()
    cache.write_text("{not json")
    with pytest.raises(DatasetError, match=r"stats\.json: unreadable rare-class statistics"):
        class_stats(ds, cache)
    cache.write_text(json.dumps({"something": 1}))
    with pytest.raises(DatasetError, match="not a rare-class statistics cache"):
        class_stats(ds, cache)
    good = json.loads(json.dumps({"version": rcs_module.CACHE_VERSION,
                                  "fingerprint": rcs_module._fingerprint(
                                      rcs_module._identity(ds)), "counts": [[1, 2]]}))
    cache.write_text(json.dumps(good))
    with pytest.raises(DatasetError, match="damaged rare-class statistics cache"):
        class_stats(ds, cache)


def test_threads_count_as_one_and_an_unwritable_cache_is_reported(tmp_path):
    ds = _synthetic()
    assert count_classes(ds, threads=3).tolist() == count_classes(ds, threads=1).tolist()
    folder = _folder(tmp_path / "data", _labels())
    (tmp_path / "a_file").write_text("")
    lines = []
    counts = class_stats(folder, tmp_path / "a_file" / "stats.json", log=lines.append)
    assert counts.tolist() == [[56, 20, 0], [1, 0, 79]]
    assert "cannot cache the class statistics" in lines[-1]
    assert "data.rare_class_sampling.cache" in lines[-1]


def test_runs_saved_before_these_keys_resume_without_a_change():
    from deeplabv2.checkpoint import changed_settings
    new = load_config(None, []).to_dict()
    old = {**new, "data": {k: v for k, v in new["data"].items()
                           if k not in ("rare_class_sampling", "cat_max_ratio")}}
    assert changed_settings(old, new) == []
    on = load_config(None, [RCS]).to_dict()
    assert changed_settings(new, on) == [
        "data.rare_class_sampling None -> {'temperature': 0.1, 'min_pixels': 300, "
        "'min_crop_ratio': 0.5}"]


def test_a_class_in_no_image_with_enough_pixels_is_named():
    counts = np.array([[100, 5000], [200, 4000]])
    with pytest.raises(DatasetError, match=r"min_pixels=3000 pixels of class 0 \(road\) "
                                           r"\(the most in one image: 200\)"):
        RareClassSampling(counts, RCSSettings(), class_names=["road", "car"])


def test_config_key_is_validated():
    cfg = load_config(None, ["data.rare_class_sampling={temperature: 1e-2, min_pixels: 3000, "
                             "min_crop_ratio: 0.5}"])
    assert RCSSettings.from_dict(cfg.data.rare_class_sampling) == RCSSettings(0.01, 3000, 0.5)
    assert load_config(None, []).data.rare_class_sampling is None
    for bad, match in [("{temp: 0.01}", r"unknown key data\.rare_class_sampling\.temp"),
                       ("{temperature: 0}", "temperature must be > 0"),
                       ("{min_pixels: 2.5}", "min_pixels must be an integer"),
                       ("{min_crop_ratio: -1}", "min_crop_ratio must be >= 0"),
                       ("3", "must be a mapping")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"data.rare_class_sampling={bad}"])


# -- choices ----------------------------------------------------------------------------------
def _synthetic():
    return SyntheticDataset("train", size=(48, 64), num_samples=12)


def test_sampled_images_hold_the_class_and_classes_follow_p():
    ds = _synthetic()
    counts = count_classes(ds)
    rcs = RareClassSampling(counts, RCSSettings(temperature=0.1, min_pixels=300))
    drawn = np.zeros(ds.num_classes)
    n = 20000
    for pos in range(n):
        c, i = rcs.choose(seed=5, position=pos)
        assert counts[i, c] > 300, (pos, c, i)
        drawn[c] += 1
    # p(c) from the totals by hand, then a 5-sigma check of the drawn shares
    f = counts.sum(0) / counts.sum()
    p = np.exp((1 - f) / 0.1) / np.exp((1 - f) / 0.1).sum()
    assert np.all(np.abs(drawn / n - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-12)
    # images of a class: uniform among those with more than min_pixels (strictly)
    pole = 6
    holding = np.flatnonzero(counts[:, pole] > 300)
    seen = [i for c, i in (rcs.choose(5, pos) for pos in range(n)) if c == pole]
    assert sorted(set(seen)) == holding.tolist()
    share = np.bincount(seen, minlength=len(ds))[holding] / len(seen)
    assert np.all(np.abs(share - 1 / len(holding)) < 0.03)


def test_strictly_more_than_min_pixels():
    counts = np.array([[3000, 9000], [3001, 9000]])
    rcs = RareClassSampling(counts, RCSSettings(min_pixels=3000))
    assert rcs.images[0].tolist() == [1]


class _Squares:
    """64x64 images with class 1 in a 20x20 square at the top left, class 0 elsewhere."""
    classes, seed, ignore_index = ("bg", "thing"), 7, 255

    def __len__(self):
        return 1

    def load(self, index):
        label = np.zeros((64, 64), np.uint8)
        label[:20, :20] = 1
        return np.zeros((64, 64, 3), np.uint8), label


def test_crops_are_redrawn_until_the_class_covers_the_ratio():
    ds = _Squares()
    transform = TrainTransform(crop_size=32, scale_range=(1, 1), flip=True)
    rcs = RareClassSampling(np.array([[3696, 400]]), RCSSettings(min_pixels=300,
                                                                 min_crop_ratio=0.5))
    crops = RareClassCrops(ds, transform, rcs)
    draws_seen = set()
    for pos in range(60):
        out = crops[(pos, 1, 0)]
        k = out["rcs_draws"]
        draws_seen.add(k)
        # every earlier draw, made again from its own seed, failed the check (<= 150 pixels)
        for j in range(k - 1):
            rng = np.random.default_rng([ds.seed, rcs_module._CROP_TAG, pos, j])
            assert int((transform(*ds.load(0), rng)["label"] == 1).sum()) <= 150
        if k <= MAX_CROP_CHECKS:
            assert int((out["label"] == 1).sum()) > 150  # 300 x 0.5
        rng = np.random.default_rng([ds.seed, rcs_module._CROP_TAG, pos, k - 1])
        assert torch.equal(out["label"], transform(*ds.load(0), rng)["label"])
    assert 1 in draws_seen and max(draws_seen) > 1  # some crops needed re-draws

    # a ratio that no crop can satisfy: 10 checks, so 11 draws, the last kept
    never = RareClassCrops(ds, transform, RareClassSampling(
        np.array([[3696, 400]]), RCSSettings(min_pixels=300, min_crop_ratio=10)))
    assert never[(0, 1, 0)]["rcs_draws"] == MAX_CROP_CHECKS + 1
    # ratio 0: no re-draws
    off = RareClassCrops(ds, transform, RareClassSampling(
        np.array([[3696, 400]]), RCSSettings(min_pixels=300, min_crop_ratio=0)))
    assert all(off[(pos, 1, 0)]["rcs_draws"] == 1 for pos in range(20))


def test_draws_are_a_function_of_seed_and_step_and_ranks_are_disjoint():
    rcs = RareClassSampling(count_classes(_synthetic()), RCSSettings(temperature=0.1,
                                                                     min_pixels=300))
    one = list(RareClassBatchSampler(rcs, 4, seed=3, total_steps=6))
    ranks = [list(RareClassBatchSampler(rcs, 2, seed=3, total_steps=6, rank=r, world_size=2))
             for r in range(2)]
    for step in range(6):
        assert ranks[0][step] + ranks[1][step] == one[step]
        assert not {k[0] for k in ranks[0][step]} & {k[0] for k in ranks[1][step]}
    assert list(RareClassBatchSampler(rcs, 4, seed=3, total_steps=6, start_step=4)) == one[4:]
    assert list(RareClassBatchSampler(rcs, 4, seed=3, total_steps=6)) == one
    other = list(RareClassBatchSampler(rcs, 4, seed=4, total_steps=6))
    assert other != one
    assert len(RareClassBatchSampler(rcs, 4, seed=3, total_steps=6, start_step=2)) == 4


# -- training -----------------------------------------------------------------------------------
RCS = "data.rare_class_sampling={temperature: 0.1, min_pixels: 300, min_crop_ratio: 0.5}"


def test_training_with_rcs_resumes_exactly(tmp_path):
    full = train(tiny_config(tmp_path / "full", RCS, "train.iterations=4",
                             "train.checkpoint_every=2"))

    def crash(iteration, logs):
        if iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "part", RCS, "train.iterations=4",
                          "train.checkpoint_every=2"), on_iteration=crash)
    resumed = train(tiny_config(tmp_path / "part", RCS, "train.iterations=4",
                                "train.checkpoint_every=2"), resume="auto")
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    plain = train(tiny_config(tmp_path / "plain", "train.iterations=4"))
    assert any(not torch.equal(v, plain.model.state_dict()[k])
               for k, v in full.model.state_dict().items())  # the sampling was used


@pytest.mark.slow
def test_torchrun_two_processes_with_rcs_match_one_process(tmp_path):
    """2 CPU processes x batch 2 with rare-class sampling == 1 process x batch 4: the ranks
    take the two halves of one global batch of draws (frozen BN, scale 1)."""
    from test_train import TINY
    from torchrun import train_two_processes_and_one
    train_two_processes_and_one(tmp_path, [*TINY, RCS, "data.scale_range=[1, 1]",
                                           "train.iterations=3", "train.checkpoint_every=3"])


# -- mmseg RandomCrop's cat_max_ratio (DAFormer's/HRDA's source pipeline) -----------------------
def _mmseg_accepts(crop, ratio, ignore=255):
    """mmseg RandomCrop's test, written out: np.unique counts without the ignore value."""
    labels, cnt = np.unique(crop, return_counts=True)
    cnt = cnt[labels != ignore]
    return len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < ratio


def _expected_window(label, seed, ratio, crop=32):
    """The window the transform should keep, replaying its generator: scale (one uniform
    draw), no flip draw (flip off), then offsets, re-drawn up to 10 times."""
    rng = np.random.default_rng(seed)
    rng.uniform(1, 1)
    span = label.shape[0] - crop + 1
    u = rng.random(2)
    y0, x0 = int(u[0] * span), int(u[1] * span)
    for _ in range(10):
        if _mmseg_accepts(label[y0:y0 + crop, x0:x0 + crop], ratio):
            break
        u = rng.random(2)
        y0, x0 = int(u[0] * span), int(u[1] * span)
    return label[y0:y0 + crop, x0:x0 + crop]


@pytest.mark.parametrize("case", ["square", "one_class", "ignored", "exactly_075"])
def test_cat_max_ratio_redraws_the_window_as_mmseg(case):
    label = np.zeros((64, 64), np.uint8)
    if case == "square":
        label[:32, :32] = 1
    elif case == "ignored":  # class 1 is the minority of labelled pixels only without 255s
        label[:, 20:] = 255
        label[:, :6] = 1
    elif case == "exactly_075":  # every window: class 0 covers exactly 0.75, not less
        label[:, ::4] = 1
    t = TrainTransform(crop_size=32, scale_range=(1, 1), flip=False, cat_max_ratio=0.75)
    plain = TrainTransform(crop_size=32, scale_range=(1, 1), flip=False)
    image = np.zeros((64, 64, 3), np.uint8)
    accepted = moved = 0
    for seed in range(40):
        out = t(image, label, np.random.default_rng(seed))["label"].numpy()
        want = _expected_window(label, seed, 0.75)
        assert np.array_equal(out, want), seed
        accepted += _mmseg_accepts(out, 0.75)
        # the first window is the plain transform's: nothing else changes
        first = plain(image, label, np.random.default_rng(seed))["label"].numpy()
        if _mmseg_accepts(first, 0.75):
            assert np.array_equal(out, first)
        moved += not np.array_equal(out, first)
    if case in ("one_class", "exactly_075"):
        assert accepted == 0  # never acceptable: the 11th window is kept
    else:
        assert accepted > 0 and moved > 0  # re-draws happened and found acceptable windows


def test_cat_max_ratio_is_validated():
    with pytest.raises(ValueError, match="cat_max_ratio"):
        TrainTransform(crop_size=32, cat_max_ratio=0)
    with pytest.raises(ConfigError, match=r"data\.cat_max_ratio"):
        load_config(None, ["data.cat_max_ratio=1.5"])
    assert load_config(None, []).data.cat_max_ratio == 1.0


def test_a_run_without_images_of_a_class_fails_before_writing_anything(tmp_path):
    with pytest.raises(DatasetError, match=r"min_pixels=3000 pixels of class 0 \(road\)"):
        train(tiny_config(tmp_path / "run", "data.rare_class_sampling={min_pixels: 3000}"))
    assert not (tmp_path / "run" / "config.yaml").exists()

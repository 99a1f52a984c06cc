"""FDA's self-training round: the released script's pseudo-label thresholds, the files read back
as target labels, the FDA run that trains on them, and the command's errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deeplabv2.adapt.pseudo_labels import (META, PseudoLabelled, apply_thresholds,
                                           class_thresholds, make_pseudo_labels,
                                           percentile_index)
from deeplabv2.cli import main
from deeplabv2.config import ConfigError, load_config
from deeplabv2.data import DatasetError, build_dataset
from deeplabv2.data.base import SegmentationDataset
from deeplabv2.data.transforms import TrainTransform
from deeplabv2.model import build_model
from deeplabv2.train import train

from test_train import TINY

TARGET_OPTIONS = {"num_samples": 3, "size": [48, 64], "style": "target"}


def released_thresholds(probs: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """YanchaoYang/FDA getSudoLabel_multi.py written out: ``probs`` (N, C, H, W) -> per-pixel
    class and confidence; per class the sorted confidences' element at round(n * 0.66), 0 for
    a class without pixels, capped at 0.9; then every pixel below its class's threshold -> 255
    (returns the thresholds and the labels)."""
    predicted_label = probs.argmax(1).astype(np.float64)
    predicted_prob = probs.max(1).astype(np.float64)
    thres = []
    for i in range(num_classes):
        x = predicted_prob[predicted_label == i]
        if len(x) == 0:
            thres.append(0)
            continue
        x = np.sort(x)
        thres.append(x[int(np.round(len(x) * 0.66))])
    thres = np.array(thres, dtype=np.float64)
    thres[thres > 0.9] = 0.9
    labels = predicted_label.copy()
    for index in range(len(labels)):
        for i in range(num_classes):
            labels[index][(predicted_prob[index] < thres[i]) * (labels[index] == i)] = 255
    return thres, labels.astype(np.uint8)


def _probs(seed, n=3, c=5, h=6, w=7, sharp=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 2
    if sharp is not None:  # a confident class: its pixels' confidences above the cap
        logits[:, sharp] += 8 * (torch.rand(n, h, w, generator=g) > 0.6)
    logits[:, c - 1] = -50  # a class no pixel is predicted as: threshold 0
    return torch.softmax(logits, 1).numpy()


@pytest.mark.parametrize("seed,sharp", [(0, None), (1, 2), (2, 0)])
def test_thresholds_are_the_released_scripts(seed, sharp):
    probs = _probs(seed, sharp=sharp)
    expected, expected_labels = released_thresholds(probs, probs.shape[1])
    conf, label = probs.max(1), probs.argmax(1).astype(np.uint8)

    def pairs():
        return zip(conf, label)

    thresholds, counts = class_thresholds(pairs, probs.shape[1])
    np.testing.assert_array_equal(thresholds, expected)
    assert counts.tolist() == [int((label == i).sum()) for i in range(probs.shape[1])]
    assert thresholds[-1] == 0
    if sharp is not None:
        assert thresholds[sharp] == 0.9, "the cap applies"
    for i in range(len(probs)):
        np.testing.assert_array_equal(apply_thresholds(conf[i], label[i], thresholds),
                                      expected_labels[i])


def test_percentile_index_rounds_as_numpy_and_stays_inside():
    assert [percentile_index(n) for n in (1, 2, 3, 50, 100)] == [0, 1, 2, 33, 66]
    # 0.66 * 25 = 16.5 -> NumPy rounds half to even: 16
    assert percentile_index(25, 0.66) == int(np.round(25 * 0.66))


def test_thresholds_are_exact_across_many_close_values():
    """Values that share the top 16 bits of their float32 patterns (one first-pass bin): the
    second pass finds the exact element."""
    rng = np.random.default_rng(0)
    conf = (0.95 + rng.random((4, 50, 50)) * 1e-3).astype(np.float32)
    label = np.zeros(conf.shape, np.uint8)
    thresholds, _ = class_thresholds(lambda: zip(conf, label), 2, cap=1.0)
    flat = np.sort(conf.ravel().astype(np.float64))
    assert thresholds[0] == flat[int(np.round(flat.size * 0.66))]


def _tiny_model(num_classes=7):
    torch.manual_seed(0)
    return build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                        "num_classes": num_classes}).eval()


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_pseudo_labels_read_back_as_target_labels(tmp_path, scale):
    model = _tiny_model()
    ds = build_dataset("synthetic", None, "train", **TARGET_OPTIONS)
    meta = make_pseudo_labels(model, ds, tmp_path, scale=scale, progress=False)
    assert not (tmp_path / ".cache").exists()
    # the expected labels, independently: the network on the resized images, the released
    # thresholds over all of them
    resized = []
    for i in range(len(ds)):
        image, _ = ds.load(i)
        h, w = round(48 * scale), round(64 * scale)
        resized.append(np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR)))
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(model.preprocess(im)), 1) for im in resized])
    thres, labels = released_thresholds(probs.numpy(), 7)
    assert np.allclose(list(meta["thresholds"].values()), thres, atol=1e-6)
    assert meta["inference_size"] == [round(48 * scale), round(64 * scale)]
    assert sum(meta["kept_pixels"].values()) == int((labels != 255).sum())
    saved = json.loads((tmp_path / META).read_text())
    assert saved["num_classes"] == 7 and saved["images"] == 3

    target = PseudoLabelled(ds, tmp_path)
    target.check()
    transform = TrainTransform(crop_size=labels.shape[1:], scale_range=(scale, scale),
                               flip=False)
    for i in range(len(ds)):
        image, label = target.load(i)
        assert np.array_equal(image, ds.load(i)[0])
        assert label.shape == (48, 64)
        # the target's training transform brings them back to the labels computed
        out = transform(image, label, np.random.default_rng(0))
        assert np.array_equal(out["label"].numpy(), labels[i])


def _fda_config(tmp_path, *more):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path}", "adapt.method=fda",
                              "adapt.target_dataset=synthetic",
                              "adapt.target_options={num_samples: 6, size: [48, 64], "
                              "style: target}",
                              "adapt.target_val_options={num_samples: 2, size: [48, 64], "
                              "style: target}",
                              "adapt.fda_beta=0.05", "train.val_limit=2", *more])


def test_fda_trains_on_its_pseudo_labels(tmp_path, capsys):
    first = train(_fda_config(tmp_path / "fda", "train.iterations=2", "adapt.fda_ent_start=1"))
    labels = tmp_path / "labels"
    assert main(["pseudo-label", str(first.out_dir / "model.pth"), "--ensemble",
                 str(first.out_dir / "model.pth"), "-c", str(first.out_dir / "config.yaml"),
                 "-o", str(labels)]) == 0
    assert "6 pseudo-labels written to" in capsys.readouterr().out
    assert len(list(labels.glob("synthetic_target_train_*.png"))) == 6
    # they belong to the target images the training loop reads (its seed makes the scenes):
    # every kept pixel is the network's class there
    from deeplabv2.weights import load_model
    from deeplabv2.train import _datasets
    model = load_model(first.out_dir / "model.pth").eval()
    cfg = _fda_config(tmp_path / "ssl", "train.iterations=3", "adapt.fda_ent_start=2",
                      f"adapt.target_labels={labels}")
    target = _datasets(cfg)[2]
    assert isinstance(target, PseudoLabelled)
    for i in range(len(target)):
        image, label = target.load(i)
        with torch.no_grad():
            predicted = model(model.preprocess(image)).argmax(1)[0].numpy()
        kept = label != 255
        assert kept.any() and np.array_equal(label[kept], predicted[kept])
    logs = []
    cfg = _fda_config(tmp_path / "ssl", "train.iterations=3", "adapt.fda_ent_start=2",
                      f"adapt.target_labels={labels}")
    train(cfg, on_iteration=lambda it, entry: logs.append(entry))
    for entry in logs:
        assert entry["adapt/pseudo"] > 0, "the target cross-entropy on pseudo-labels"
        # the step's loss is the sum of its terms: source CE + pseudo CE (+ entropy)
        terms = entry["adapt/seg"] + entry["adapt/pseudo"] + entry.get("adapt/ent", 0.0)
        assert entry["loss"] == pytest.approx(terms, rel=1e-5)
    assert "adapt/ent" not in logs[0] and "adapt/ent" in logs[2], "entropy from fda_ent_start"


def test_target_labels_errors(tmp_path):
    ds = build_dataset("synthetic", None, "train", **TARGET_OPTIONS)
    with pytest.raises(DatasetError, match="does not exist"):
        PseudoLabelled(ds, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="not a finished"):
        PseudoLabelled(ds, tmp_path)
    make_pseudo_labels(_tiny_model(), ds, tmp_path / "ok", progress=False)
    (tmp_path / "ok" / "synthetic_target_train_000001.png").unlink()
    with pytest.raises(DatasetError, match="synthetic_target_train_000001.png: missing "
                                           "pseudo-label of target image"):
        PseudoLabelled(ds, tmp_path / "ok")
    make_pseudo_labels(_tiny_model(5), _FiveClasses(ds), tmp_path / "five", progress=False)
    with pytest.raises(DatasetError, match="pseudo-labels of 5 classes, but the target set"):
        PseudoLabelled(ds, tmp_path / "five")
    with pytest.raises(FileExistsError, match="already holds pseudo-labels"):
        make_pseudo_labels(_tiny_model(5), _FiveClasses(ds), tmp_path / "five", progress=False)
    with pytest.raises(ValueError, match="network has 5 classes"):
        make_pseudo_labels(_tiny_model(5), ds, tmp_path / "other", progress=False)
    with pytest.raises(ConfigError, match="adapt.target_labels is read by adapt.method=fda"):
        load_config(None, ["adapt.method=dacs", "adapt.target_dataset=synthetic",
                           f"adapt.target_labels={tmp_path}"])


class _FiveClasses(SegmentationDataset):
    """The synthetic target images as a 5-class set (another class count)."""

    def __init__(self, ds):
        super().__init__(None, ds.split, None, ds.seed)
        self.ds, self.classes, self.palette = ds, ds.classes[:5], ds.palette[:5]

    def __len__(self):
        return len(self.ds)

    def name(self, index):
        return self.ds.name(index)

    def load(self, index):
        return self.ds.load(index)


def test_pseudo_label_command_errors(tmp_path, capsys):
    ckpt = tmp_path / "m.pth"
    from deeplabv2.weights import save_weights
    save_weights(_tiny_model(), ckpt, list(build_dataset("synthetic", None, "val",
                                                         num_samples=1).classes), None)
    # a config without a target set
    assert main(["pseudo-label", str(ckpt), "-c", "demo", "-o", str(tmp_path / "x")]) == 2
    assert "no adapt.target_dataset" in capsys.readouterr().err
    # a scale range without --scale
    assert main(["pseudo-label", str(ckpt), "-c", "demo", "-o", str(tmp_path / "x"),
                 "adapt.method=fda", "adapt.target_dataset=synthetic",
                 "adapt.target_scale_range=[0.5, 1.0]"]) == 2
    assert "give the inference scale with --scale" in capsys.readouterr().err
    # a model of other classes than the target set
    five = tmp_path / "five.pth"
    save_weights(_tiny_model(5), five, None, None)
    assert main(["pseudo-label", str(five), "-c", "demo", "-o", str(tmp_path / "x"),
                 "adapt.method=fda", "adapt.target_dataset=synthetic",
                 "adapt.target_options={num_samples: 2, size: [48, 64]}"]) == 2
    assert "model has 5 classes, the target set 'synthetic' train has 7" in \
        capsys.readouterr().err
    # a missing ensemble member is named
    assert main(["pseudo-label", str(ckpt), "--ensemble", str(tmp_path / "missing.pth"),
                 "-c", "demo", "-o", str(tmp_path / "x"), "adapt.method=fda",
                 "adapt.target_dataset=synthetic"]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_adapt_demo_row_of_fda_self_training(tmp_path, monkeypatch, capsys):
    """``demo --adapt --methods fda fda_ssl``: the fda run's pseudo-labels of the target
    training scenes, then the self-training run from the same weights, a row of its own."""
    from deeplabv2.demo import adapt as demo
    for name in ("SOURCE", "TARGET", "TARGET_VAL", "SOURCE_VAL"):
        monkeypatch.setattr(demo, name, {**getattr(demo, name), "num_samples": 4})
    with pytest.raises(ValueError, match="list fda too"):
        demo.run_adapt_demo(tmp_path / "x", methods=("fda_ssl",))
    summary = demo.run_adapt_demo(
        tmp_path / "adapt", methods=("fda_ssl", "fda"), source_iterations=2,
        method_iterations=1,
        overrides=["model.width=8", "data.batch_size=2", "data.num_workers=0",
                   "train.threads=1", "train.progress=false", "train.tensorboard=false"])
    assert list(summary["runs"]) == ["warm_up", "source_only", "fda", "fda_ssl",
                                     "target_supervised"]
    labels = tmp_path / "adapt" / "fda_ssl_labels"
    assert json.loads((labels / META).read_text())["images"] == 4
    config = load_config(str(tmp_path / "adapt" / "fda_ssl" / "config.yaml"))
    assert config.adapt.target_labels == str(labels) and config.adapt.fda_ent_start == 0
    assert "| fda_ssl |" in (tmp_path / "adapt" / "table.md").read_text()


@pytest.mark.parametrize("source", ["gta5", "synthia"])
def test_self_training_configs_are_the_fda_runs_plus_pseudo_labels(source):
    """SStrain.py is train.py plus the pseudo-label term: same init, schedule and FDA settings;
    the entropy from step 0; the target set of the network's classes (SYNTHIA's FDA network has
    19, as FDA's)."""
    fda = load_config(f"{source}_to_cityscapes_fda").to_dict()
    ssl = load_config(f"{source}_to_cityscapes_fda_ssl").to_dict()
    assert ssl["adapt"].pop("target_labels") == f"runs/{source}_to_cityscapes_fda/pseudo_labels"
    assert fda["adapt"].pop("target_labels") is None
    assert ssl["adapt"].pop("fda_ent_start") == 0
    fda["adapt"].pop("fda_ent_start")
    assert ssl["train"].pop("out_dir") == fda["train"].pop("out_dir") + "_ssl"
    assert ssl == fda
    assert ssl["model"]["num_classes"] == 19 and ssl["adapt"]["target_options"] == {
        "annotation": None}


@pytest.mark.parametrize("source,classes", [("gta5", 19), ("synthia", 19)])
def test_pseudo_label_command_on_the_cityscapes_layout(tmp_path, capsys, source, classes):
    """The packaged self-training config's target set (Cityscapes train, unlabelled, resized as
    the target is trained: adapt.target_resize, bicubic): labels named by frame, at the image's
    size, read back."""
    from deeplabv2.weights import save_weights
    frames = ["aachen/aachen_000000_000019", "bremen/bremen_000001_000019"]
    rng = np.random.default_rng(0)
    for frame in frames:
        path = tmp_path / "cs/leftImg8bit/train" / f"{frame}_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(path)
    ckpt = tmp_path / "fda.pth"
    save_weights(_tiny_model(classes), ckpt, None, None)
    config = [f"{source}_to_cityscapes_fda_ssl"]
    overrides = [f"adapt.target_root={tmp_path / 'cs'}", "data.num_workers=0",
                 "train.device=cpu", "adapt.target_resize=[32, 64]"]  # the config's 512x1024, small
    out = tmp_path / "labels"
    assert load_config(config[0]).adapt.target_resize_filter == "bicubic"
    assert main(["pseudo-label", str(ckpt), "-c", *config, "-o", str(out), *overrides]) == 0
    assert "2 pseudo-labels written" in capsys.readouterr().out
    meta = json.loads((out / META).read_text())
    assert meta["inference_size"] == [32, 64] and meta["num_classes"] == classes
    assert meta["resize"] == [32, 64] and meta["resize_filter"] == "bicubic"
    cfg = load_config(config[0], [*overrides, f"adapt.target_labels={out}"])
    from deeplabv2.adapt.pseudo_labels import target_dataset
    target = PseudoLabelled(target_dataset(cfg), cfg.adapt.target_labels)
    assert target.num_classes == classes
    assert [target.source(i) for i in range(2)] == [
        str(out / f"{f.split('/')[1]}.png") for f in frames]
    image, label = target.load(0)
    assert image.shape == (64, 128, 3) and label.shape == (64, 128)

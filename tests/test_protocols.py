"""Named evaluation protocols (evaluation/protocols.py): each released evaluation script's steps,
written out here with PIL and torch.nn.functional, give the numbers ``evaluate`` reports.

The network is a tiny DeepLab whose stride-8 scores are replaced by a known function of the
input pixels under each score cell, so that the expected scores are computed here without the
network; images and labels are small and the protocols are run at small sizes
(:meth:`Protocol.with_sizes`), their released sizes checked separately.
"""

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deeplabv2.config import ConfigError, load_config
from deeplabv2.evaluation.evaluate import evaluate
from deeplabv2.evaluation.protocols import NAMES, PROTOCOLS, get_protocol
from deeplabv2.inference.ensemble import Ensemble
from deeplabv2.inference.front import InferenceConfig
from deeplabv2.model import build_model

C = 19  # Cityscapes' classes: FDA's 16 and 13 subsets are of these
TINY = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": C}


def known_scores(x, seed):
    """The stub's stride-8 scores of a preprocessed ``(1, 3, H, W)`` input: the pixel under
    each cell (8 i, 8 j; floor(H / 8) + 1 cells, as the network) through a fixed linear map
    and a sine, so that the classes change across the image and softmax is not linear."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 3, generator=g)
    cells = F.pad(x, (0, 1, 0, 1), mode="replicate")[:, :, ::8, ::8]
    lin = torch.einsum("ck,nkhw->nchw", w, cells) / 40
    phase = torch.arange(C, dtype=torch.float32).view(1, C, 1, 1)
    return lin + 2 * torch.sin(cells[:, :1] / 13 + phase)


def stub(seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY).eval()
    model.logits = types.MethodType(lambda self, x: known_scores(x, seed), model)
    return model


class Tiny:
    """Two RGB images with labels (255 = ignore), as a dataset's ``load`` gives them."""

    num_classes, classes = C, tuple(f"c{i}" for i in range(C))

    def __init__(self, height=44, width=76):
        rng = np.random.default_rng(3)
        yy, xx = np.mgrid[0:height, 0:width]
        self.items = []
        for k in range(2):
            image = np.stack([(120 + 100 * np.sin(xx / (5 + k) + c) * np.cos(yy / 7)) for c in
                              range(3)], -1).clip(0, 255).astype(np.uint8)
            label = rng.integers(0, C, (height, width)).astype(np.uint8)
            label[:3] = 255
            self.items.append((image, label))

    def __len__(self):
        return len(self.items)

    def load(self, i):
        return self.items[i]


FILTER = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def released(models, dataset, *, image_wh, image_filter, label_wh, upsample, mean,
             weights=None):
    """The released scripts' steps (evaluate_cityscapes.py / eval_UDA.py / evaluateUDA.py /
    evaluation_multi.py): PIL resize, BGR minus mean, stride-8 output, softmax averaged (FDA)
    or logits summed (ADVENT), nn.Upsample(align_corners=True) to the labels, argmax,
    fast_hist, per_class_iu."""
    hist = np.zeros((C, C))
    for image, label in (dataset.load(i) for i in range(len(dataset))):
        img = Image.fromarray(image).resize(image_wh, FILTER[image_filter])
        arr = np.asarray(img, np.float32)[:, :, ::-1] - np.asarray(mean, np.float32)
        x = torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]
        outs = [known_scores(x, seed) for seed in models]
        if upsample == "probs":
            out = sum(F.softmax(o, dim=1) for o in outs) / len(outs)
        elif weights is not None:  # eval_UDA.py: sum of MODEL_WEIGHT[i] * output_i
            out = sum(w * o for w, o in zip(weights, outs))
        else:
            out = sum(outs)
        if label_wh is not None:
            label = np.asarray(Image.fromarray(label).resize(label_wh, Image.NEAREST))
        out = F.interpolate(out, size=label.shape, mode="bilinear", align_corners=True)
        pred = out[0].numpy().transpose(1, 2, 0).argmax(2)
        a, b = label.flatten().astype(int), pred.flatten()
        k = (a >= 0) & (a < C)
        hist += np.bincount(C * a[k] + b[k], minlength=C * C).reshape(C, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    return hist, iou


def _check(results, hist, iou):
    assert np.array_equal(np.asarray(results["confusion"])[:, :C], hist)
    np.testing.assert_allclose(results["iou"], iou, rtol=1e-6)
    assert results["miou"] == pytest.approx(np.nanmean(iou))


def _mean(model):
    p = model.preprocessing
    assert p.channel_order == "BGR" and p.scale == 1 and tuple(p.std) == (1, 1, 1)
    return p.mean


@pytest.mark.parametrize("name, image_size, label_size, image_filter, label_wh", [
    ("adaptsegnet", (20, 36), (44, 76), "bicubic", None),
    ("advent", (20, 36), (44, 76), "bicubic", None),
    ("dacs", (20, 36), (20, 36), "bilinear", (36, 20)),
])
def test_score_protocols_equal_the_released_steps(name, image_size, label_size, image_filter,
                                                   label_wh):
    model, ds = stub(), Tiny()
    protocol = PROTOCOLS[name].with_sizes(image_size, label_size)
    results = evaluate(model, ds, protocol=protocol)
    hist, iou = released([0], ds, image_wh=image_size[::-1], image_filter=image_filter,
                         label_wh=label_wh, upsample="scores", mean=_mean(model))
    _check(results, hist, iou)
    # scored at the label size: the 1024x2048 labels as loaded, DACS' labels shrunk
    assert results["pixels"] == hist.sum() > 2 * (label_size[0] - 3) * label_size[1] * 0.9
    # the steps matter: another image filter, or our own front, scores otherwise
    other = evaluate(model, ds, protocol=protocol.__class__(**{
        **protocol.__dict__, "image_filter": "bilinear" if image_filter == "bicubic"
        else "bicubic"}))
    assert other["confusion"] != results["confusion"]
    assert results["protocol"]["name"] == name
    assert results["protocol"]["image_size"] == list(image_size)


def test_fda_averages_stride8_softmax_of_the_ensemble_and_reads_16_13_of_19():
    members = [stub(seed) for seed in (0, 1, 2)]
    net = Ensemble(members, names=["b1", "b2", "b3"]).eval()
    ds = Tiny()
    protocol = PROTOCOLS["fda"].with_sizes((24, 56), (44, 76))
    results = evaluate(net, ds, protocol=protocol)
    hist, iou = released([0, 1, 2], ds, image_wh=(56, 24), image_filter="bicubic",
                         label_wh=None, upsample="probs", mean=_mean(members[0]))
    _check(results, hist, iou)
    # evaluation_multi.py: mIoU16 and mIoU13 by np.mean over fixed train ids
    sixteen = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    thirteen = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert not np.isnan(iou).any()
    assert results["miou_16"] == pytest.approx(np.mean(iou[sixteen]))
    assert results["miou_13"] == pytest.approx(np.mean(iou[thirteen]))
    # the averaged softmax is upsampled, not the members' logits
    logits = PROTOCOLS["advent"].with_sizes((24, 56), (44, 76))
    assert evaluate(net, ds, protocol=logits)["confusion"] != results["confusion"]


def test_advent_ensemble_sums_upsampled_logits():
    members = [stub(seed) for seed in (0, 1)]
    net = Ensemble(members, names=["a", "b"]).eval()
    ds = Tiny()
    protocol = PROTOCOLS["advent"].with_sizes((20, 36), (44, 76))
    hist, iou = released([0, 1], ds, image_wh=(36, 20), image_filter="bicubic", label_wh=None,
                         upsample="scores", mean=_mean(members[0]))
    _check(evaluate(net, ds, protocol=protocol), hist, iou)
    equal = hist
    # unequal MODEL_WEIGHTs: the ensemble's weights are applied, whatever its own fuse
    for fuse in ("probs", "logits"):
        weighted = Ensemble(members, names=["a", "b"], fuse=fuse, weights=[0.9, 0.1]).eval()
        hist, iou = released([0, 1], ds, image_wh=(36, 20), image_filter="bicubic",
                             label_wh=None, upsample="scores", mean=_mean(members[0]),
                             weights=[0.9, 0.1])
        assert not np.array_equal(hist, equal)  # the weights matter on these scores
        _check(evaluate(weighted, ds, protocol=protocol), hist, iou)


def test_named_protocols_carry_the_released_settings():
    a, v, f, d = (PROTOCOLS[n] for n in ("adaptsegnet", "advent", "fda", "dacs"))
    # AdaptSegNet evaluate_cityscapes.py / ADVENT config.py: 1024x512 bicubic -> 2048x1024
    for p in (a, v):
        assert (p.image_size, p.image_filter, p.label_size) == ((512, 1024), "bicubic",
                                                                (1024, 2048))
        assert p.upsample == "scores" and p.align_corners
    assert v.ensemble == "scores"
    # FDA data/__init__.py cs_size_test (1344, 576); evaluation_multi.py softmax average
    assert (f.image_size, f.image_filter, f.label_size) == ((576, 1344), "bicubic", (1024, 2048))
    assert f.upsample == "probs" and f.ensemble == "probs" and f.align_corners
    assert set(f.class_subsets) == {"16", "13"} and len(f.class_subsets["16"]) == 16
    # DACS cityscapes_loader.py: scipy imresize (PIL bilinear) of images, nearest of labels
    assert (d.image_size, d.image_filter, d.label_size, d.label_filter) == (
        (512, 1024), "bilinear", (512, 1024), "nearest")
    assert all(p.source for p in PROTOCOLS.values())
    assert NAMES == ("none", "adaptsegnet", "advent", "fda", "dacs", "mmseg")
    # DAFormer configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py: Resize to (1024, 512)
    # keeping the ratio (cv2), logits to the input then to 2048x1024 with align_corners False
    m = PROTOCOLS["mmseg"]
    assert (m.image_size, m.image_filter, m.label_size) == ((512, 1024), "cv2_bilinear",
                                                           (1024, 2048))
    assert m.via_input and not m.align_corners and m.upsample == "scores"


def test_unknown_protocol_is_an_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="eval.protocol must be one of none, adaptsegnet, "
                                          "advent, fda, dacs, mmseg, got 'fdaa'"):
        load_config("configs/gta5_to_cityscapes_fda.yaml", ["eval.protocol=fdaa"])
    with pytest.raises(ValueError, match="valid: none, adaptsegnet"):
        get_protocol("deeplab")
    with pytest.raises(ConfigError, match="avg_scales"):
        load_config("configs/gta5_to_cityscapes_fda.yaml", ["eval.avg_scales=[0.5]"])
    with pytest.raises(ValueError, match="test-time mode"):
        evaluate(stub(), Tiny(), protocol="dacs", inference=InferenceConfig(flip=True))


def test_adaptation_configs_name_their_papers_protocol():
    for source in ("gta5", "synthia"):
        for method in ("adaptsegnet", "advent", "fda", "dacs"):
            cfg = load_config(f"configs/{source}_to_cityscapes_{method}.yaml")
            assert cfg.eval.protocol == method and cfg.eval.avg_scales == [1.0]
    fda = load_config("configs/synthia_to_cityscapes_fda.yaml")
    assert fda.model.num_classes == 19 and fda.data.options == {"num_classes": 19}
    assert fda.adapt.target_val_options.get("num_classes", 19) == 19


def test_none_protocol_is_our_front_and_is_recorded():
    model, ds = stub(), Tiny()
    plain = evaluate(model, ds)
    assert plain["protocol"] == {"name": "none"}
    assert evaluate(model, ds, protocol="none")["confusion"] == plain["confusion"]


def test_protocol_is_recorded_in_metrics_json(tmp_path):
    from deeplabv2.evaluation.metrics import save_json
    results = evaluate(stub(), Tiny(), protocol=PROTOCOLS["dacs"].with_sizes((20, 36),
                                                                            (20, 36)))
    save_json(results, Tiny.classes, tmp_path / "metrics.json")
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["protocol"]["name"] == "dacs"
    assert data["protocol"]["image_filter"] == "bilinear"
    assert data["protocol"]["label_size"] == [20, 36]


def test_protocol_in_report_header(tmp_path):
    from deeplabv2.app.report import write_page
    results = evaluate(stub(), Tiny(), protocol=PROTOCOLS["fda"].with_sizes((24, 56), (44, 76)))
    page = write_page(tmp_path, results, Tiny.classes, np.zeros((C, 3), np.uint8))
    text = page.read_text()
    assert "<th>protocol</th><td>fda (image_size [24, 56], image_filter bicubic" in text
    assert "YanchaoYang/FDA evaluation_multi.py" in text


def test_training_validation_records_the_protocol(tmp_path):
    from deeplabv2.train import train
    from test_train import tiny_config
    result = train(tiny_config(tmp_path, "train.iterations=2", "train.val_every=2",
                               "eval.protocol=dacs",
                               "data.options={num_samples: 4, size: [48, 64]}"))
    assert result.history[-1]["val_protocol"]["name"] == "dacs"
    assert result.history[-1]["val_protocol"]["image_filter"] == "bilinear"
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1]["val_protocol"]["image_size"] == [512, 1024]
    assert result.metrics["protocol"]["name"] == "dacs"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol"]["label_size"] == [512, 1024]


def test_evaluate_command_takes_protocol(tmp_path, capsys):
    from deeplabv2.cli import main
    from deeplabv2.config import save_config
    from test_train import TINY
    cfg_path = tmp_path / "tiny.yaml"
    save_config(load_config(None, [*TINY, "train.iterations=1",
                                   f"train.out_dir={tmp_path / 'run'}",
                                   "data.options={num_samples: 2, size: [48, 64]}"]), cfg_path)
    assert main(["train", "-c", str(cfg_path)]) == 0
    ckpt = str(tmp_path / "run" / "model.pth")
    assert main(["evaluate", ckpt, "-c", str(cfg_path), "--protocol", "advent", "--out",
                 str(tmp_path / "m.json"), "--report", str(tmp_path / "report")]) == 0
    assert "advent protocol: image bicubic to 1024x512" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["protocol"]["name"] == "advent"
    assert "<th>protocol</th><td>advent" in (tmp_path / "report" / "index.html").read_text()
    assert main(["evaluate", ckpt, "-c", str(cfg_path), "--protocol", "nope"]) == 2
    assert "valid: none, adaptsegnet, advent, fda, dacs" in capsys.readouterr().err


def test_mmseg_protocol_is_their_test_pipeline():
    """mmseg's whole-image test of DAFormer/HRDA/MIC: the image halved by cv2's INTER_LINEAR (at
    0.5 the rounded-half-up mean of each 2x2 block), the stride-8 logits resized
    (align_corners False) to the input, then to the labels, argmax."""
    model = stub(0)
    ds = Tiny(44, 76)
    protocol = PROTOCOLS["mmseg"].with_sizes((22, 38), (44, 76))
    hist = np.zeros((C, C))
    mean = np.asarray(_mean(model), np.float32)
    for image, label in (ds.load(i) for i in range(len(ds))):
        blocks = image.astype(np.int64).reshape(22, 2, 38, 2, 3).sum((1, 3))
        half = ((blocks + 2) // 4).astype(np.uint8)  # round half up of the 2x2 mean
        arr = half.astype(np.float32)[:, :, ::-1] - mean
        x = torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]
        out = F.interpolate(known_scores(x, 0), size=(22, 38), mode="bilinear",
                            align_corners=False)
        out = F.interpolate(out, size=(44, 76), mode="bilinear", align_corners=False)
        pred = out[0].argmax(0).numpy()
        a, b = label.flatten().astype(int), pred.flatten()
        k = a < C
        hist += np.bincount(C * a[k] + b[k], minlength=C * C).reshape(C, C)
    results = evaluate(model, ds, protocol=protocol)
    assert np.array_equal(np.asarray(results["confusion"]), hist)
    assert results["protocol"]["name"] == "mmseg" and results["protocol"]["via_input"]
    # the direct upsampling (no stop at the input size) scores otherwise on these scores
    direct = evaluate(model, ds, protocol=protocol.__class__(**{
        **{k: getattr(protocol, k) for k in protocol.__dataclass_fields__}, "via_input": False}))
    assert not np.array_equal(np.asarray(direct["confusion"]), hist)

"""The paper's conventions, checked against values computed by hand from Caffe's definitions, and
the checkpoints of other DeepLab v2 code reproduced: each layout's state dict (exact key names)
is loaded and the model's logits are compared with an independent functional forward of the
same tensors, written here from each code base's architecture."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

import deeplabv2
from deeplabv2.model import MSC, get_alignment
from deeplabv2.train import segmentation_loss
from deeplabv2.weights import load_weights

CAFFE, PYTORCH = get_alignment("caffe"), get_alignment("pytorch")


# -- sizes, positions and resizing by hand --------------------------------------------------------
def test_caffe_interp_sizes_of_the_msc_prototxt():
    # Interp shrink_factor d, zoom_factor n: (H - 1) // d * n + 1
    assert CAFFE.scaled_size(321, 321, 0.75) == (241, 241)  # 320 // 4 * 3 + 1
    assert CAFFE.scaled_size(321, 321, 0.5) == (161, 161)  # 320 // 2 + 1
    assert CAFFE.scaled_size(513, 513, 0.75) == (385, 385)
    assert CAFFE.scaled_size(512, 1024, 0.75) == (382, 766)  # 511 // 4 * 3 + 1, 1023 // 4 * 3 + 1
    assert CAFFE.scaled_size(512, 1024, 1.5) == (766, 1534)  # 511 // 2 * 3 + 1
    # kazuto1011: F.interpolate(scale_factor) -> floor
    assert PYTORCH.scaled_size(321, 513, 0.75) == (240, 384)
    assert PYTORCH.scaled_size(321, 513, 0.5) == (160, 256)


def test_network_cells_are_centred_on_every_8th_pixel():
    # 321 = 8 * 40 + 1 -> 41 cells on pixels 0..320; 320 -> 41 cells as well (H // 8 + 1).
    # The real ResNet-101's layers, on the meta device: shapes only, no weights or arithmetic
    # (which pixel each cell stands for is the alignment's: the label-shrink and x8
    # upsampling tests below)
    with torch.device("meta"):
        meta = deeplabv2.deeplabv2_resnet101(5).eval()
    for size, cells in [(321, 41), (320, 41), (513, 65), (512, 65), (67, 9)]:
        shape = meta.logits(torch.empty(1, 3, size, 17, device="meta")).shape
        assert shape[-2] == cells == size // 8 + 1


def test_label_shrink_samples_pixels_0_8_16():
    assert CAFFE.label_positions(321, 41) == list(range(0, 321, 8))  # a 8k+1 crop
    # 320: the last cell is centred on pixel 320, one past the border: clamped to 319
    assert CAFFE.label_positions(320, 41) == list(range(0, 320, 8)) + [319]
    assert CAFFE.label_positions(50, 7) == [0, 8, 16, 24, 32, 40, 48]
    # an MSC branch: 321 -> 241 (0.75), 31 cells on resized pixels 8j = original 8j * 320 / 240
    assert CAFFE.label_positions(321, 31, 241) == [round(8 * j * 4 / 3) for j in range(31)]
    assert CAFFE.label_positions(321, 21, 161) == list(range(0, 321, 16))
    labels = torch.arange(321 * 321).reshape(1, 321, 321)
    assert torch.equal(CAFFE.shrink_labels(labels, (41, 41)), labels[:, ::8, ::8])


def test_pytorch_label_shrink_is_pils_nearest():
    for length, cells in [(321, 41), (241, 31), (100, 13)]:
        column = np.arange(length, dtype=np.float32)[:, None].repeat(2, 1)
        pil = np.asarray(Image.fromarray(column).resize((2, cells), resample=Image.NEAREST))
        assert PYTORCH.label_positions(length, cells) == pil[:, 0].astype(int).tolist()


def test_resize_is_caffes_corner_aligned_bilinear():
    # caffe_cpu_interp2: source position p * (H1 - 1) / (H2 - 1), linear between neighbours
    x = torch.tensor([[[[0.0, 10.0, 40.0]]]])  # 1 x 3
    out = CAFFE.resize(x, (1, 5))
    assert out.flatten().tolist() == [0.0, 5.0, 10.0, 25.0, 40.0]
    # pytorch: half-pixel centres, (p + 0.5) * 3 / 5 - 0.5, clamped at 0
    out = PYTORCH.resize(x, (1, 5))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 4.0, 10.0, 28.0, 40.0]))


def test_x8_upsampling_is_interp_zoom_8_at_8k_plus_1_and_pixel_p_reads_cell_p_over_8():
    scores = torch.randn(2, 3, 9, 11)
    zoom = F.interpolate(scores, size=(65, 81), mode="bilinear", align_corners=True)
    torch.testing.assert_close(CAFFE.upsample(scores, (65, 81)), zoom)  # (9 - 1) * 8 + 1 = 65
    out = CAFFE.upsample(scores, (70, 86))  # pixels past the last centre repeat it
    torch.testing.assert_close(out[..., :65, :81], zoom)
    torch.testing.assert_close(out[..., 68, 30], zoom[..., 64, 30])
    torch.testing.assert_close(out[..., 20, 85], zoom[..., 20, 80])
    # one value by hand: pixel (12, 4) reads cell (1.5, 0.5)
    ref = scores[..., 1:3, 0:2].mean((-1, -2))
    torch.testing.assert_close(out[..., 12, 4], ref)


def test_stride8_loss_uses_the_label_under_each_cell():
    # labels: class 1 on pixels whose row and column are multiples of 8, class 0 elsewhere;
    # scores saying "1" everywhere cost nothing only if the loss reads exactly those pixels
    labels = torch.zeros(1, 321, 321, dtype=torch.long)
    labels[:, ::8, ::8] = 1
    scores = torch.zeros(1, 2, 41, 41)
    scores[:, 1] = 30.0
    assert segmentation_loss(scores, labels, "stride8") < 1e-10
    # the previous nearest-neighbour downsampling read pixels 0, 7, 15, ... and missed them
    old = F.interpolate(labels[:, None].float(), size=(41, 41), mode="nearest")[:, 0].long()
    assert (old == 0).float().mean() > 0.9
    # the pytorch convention reads PIL's pixels (3, 11, 19, ...): all class 0 here
    assert segmentation_loss(scores, labels, "stride8", "pytorch") > 20


# -- checkpoints of other code ------------------------------------------------------------------
BLOCKS, WIDTH, RATES, CLASSES = (1, 1, 1, 1), 64, (6, 12, 18, 24), 5
STAGES = [(1, 1), (2, 1), (1, 2), (1, 4)]  # (stride, dilation) of layer1..4


def _bn(g, c):
    return {"weight": torch.rand(c, generator=g) + 0.5, "bias": torch.randn(c, generator=g) * 0.1,
            "running_mean": torch.randn(c, generator=g) * 0.1,
            "running_var": torch.rand(c, generator=g) + 0.5}


def canonical(seed=0, head_in=2048, head_branches=4):
    """The tensors of a DeepLab v2 ResNet (1 block a stage, width 64) in a neutral structure."""
    g = torch.Generator().manual_seed(seed)
    def w(*shape):
        fan_in = math.prod(shape[1:])
        return torch.randn(*shape, generator=g) * (2.0 / fan_in) ** 0.5
    net = {"stem": (w(64, 3, 7, 7), _bn(g, 64)), "stages": []}
    cin = 64
    for i, _ in enumerate(STAGES):
        planes = WIDTH * 2 ** i
        block = {"w1": w(planes, cin, 1, 1), "bn1": _bn(g, planes),
                 "w2": w(planes, planes, 3, 3), "bn2": _bn(g, planes),
                 "w3": w(planes * 4, planes, 1, 1), "bn3": _bn(g, planes * 4),
                 "wd": w(planes * 4, cin, 1, 1), "bnd": _bn(g, planes * 4)}
        net["stages"].append([block])
        cin = planes * 4
    net["head"] = [(torch.randn(CLASSES, head_in, 3, 3, generator=g) * 0.01,
                    torch.randn(CLASSES, generator=g)) for _ in range(head_branches)]
    net["aux"] = [(torch.randn(CLASSES, 1024, 3, 3, generator=g) * 0.01,
                   torch.randn(CLASSES, generator=g)) for _ in range(4)]
    return net


def reference(net, x, *, layout="caffe", branches=4, features_only=False):
    """Functional forward of ``net``: the DeepLab v2 ResNet as the Caffe prototxt describes it
    (stride on the 1x1 conv, max-pool ceil mode) or torchvision's (stride on the 3x3)."""
    def bn(t, p):
        return F.batch_norm(t, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                            False, 0.0, 1e-5)
    w, p = net["stem"]
    x = F.relu(bn(F.conv2d(x, w, stride=2, padding=3), p))
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=layout == "caffe")
    for (stride, dilation), blocks in zip(STAGES, net["stages"]):
        for b in blocks:
            s1, s3 = (stride, 1) if layout == "caffe" else (1, stride)
            out = F.relu(bn(F.conv2d(x, b["w1"], stride=s1), b["bn1"]))
            out = F.relu(bn(F.conv2d(out, b["w2"], stride=s3, padding=dilation,
                                     dilation=dilation), b["bn2"]))
            out = bn(F.conv2d(out, b["w3"]), b["bn3"])
            x = F.relu(out + bn(F.conv2d(x, b["wd"], stride=stride), b["bnd"]))
    if features_only:
        return x
    return sum(F.conv2d(x, wk, bk, padding=r, dilation=r)
               for (wk, bk), r in list(zip(net["head"], RATES))[:branches])


def _bn_keys(prefix, p, tracked=True):
    d = {f"{prefix}.{k}": v for k, v in p.items()}
    if tracked:
        d[f"{prefix}.num_batches_tracked"] = torch.tensor(100)
    return d


def resnet_keys(net, prefix=""):
    """The torchvision-style names shared by isht7, AdaptSegNet, ADVENT and torchvision/timm."""
    w, p = net["stem"]
    state = {f"{prefix}conv1.weight": w, **_bn_keys(f"{prefix}bn1", p)}
    for i, blocks in enumerate(net["stages"], start=1):
        for j, b in enumerate(blocks):
            q = f"{prefix}layer{i}.{j}"
            for k in (1, 2, 3):
                state[f"{q}.conv{k}.weight"] = b[f"w{k}"]
                state.update(_bn_keys(f"{q}.bn{k}", b[f"bn{k}"]))
            state[f"{q}.downsample.0.weight"] = b["wd"]
            state.update(_bn_keys(f"{q}.downsample.1", b["bnd"]))
    return state


def head_keys(branches, name):
    return {f"{name}.conv2d_list.{k}.{kind}": t for k, (wk, bk) in enumerate(branches)
            for kind, t in (("weight", wk), ("bias", bk))}


def kazuto_keys(net, prefix=""):
    w, p = net["stem"]
    state = {f"{prefix}layer1.conv1.conv.weight": w, **_bn_keys(f"{prefix}layer1.conv1.bn", p)}
    parts = {"reduce": ("w1", "bn1"), "conv3x3": ("w2", "bn2"), "increase": ("w3", "bn3"),
             "shortcut": ("wd", "bnd")}
    for i, blocks in enumerate(net["stages"], start=2):
        for j, b in enumerate(blocks, start=1):
            for part, (wk, bnk) in parts.items():
                q = f"{prefix}layer{i}.block{j}.{part}"
                state[f"{q}.conv.weight"] = b[wk]
                state.update(_bn_keys(f"{q}.bn", b[bnk]))
    for k, (wk, bk) in enumerate(net["head"]):
        state[f"{prefix}aspp.c{k}.weight"], state[f"{prefix}aspp.c{k}.bias"] = wk, bk
    return state


def tiny_model(**kw):
    return deeplabv2.build_model({"backbone": "resnet", "blocks": list(BLOCKS), "width": WIDTH,
                                  "num_classes": CLASSES, **kw}).eval()


def close(a, b, rtol=1e-5):
    """Largest difference relative to the largest reference value."""
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


X = torch.randn(1, 3, 65, 81, generator=torch.Generator().manual_seed(9)) * 50  # 8k+1 sizes


@pytest.mark.parametrize("layout", ["isht7", "advent", "adaptsegnet"])
def test_deeplab_pytorch_ports_are_reproduced(tmp_path, layout):
    net = canonical()
    if layout == "isht7":  # DeepLab_resnet_pretrained_*.pth / isht7's port: Scale. prefix
        state = {**resnet_keys(net, "Scale."), **head_keys(net["head"], "Scale.layer5")}
    else:  # ResNetMulti: layer5 = auxiliary head on layer3, layer6 = the main head
        state = {**resnet_keys(net), **head_keys(net["aux"], "layer5"),
                 **head_keys(net["head"], "layer6")}
    path = tmp_path / f"{layout}.pth"
    torch.save(state, path)
    branches = 2 if layout == "adaptsegnet" else 4
    model = tiny_model(head_mode="adaptsegnet" if layout == "adaptsegnet" else "aspp")
    report = load_weights(model, path, head="require")
    assert len(report.loaded) + len(report.dropped) == len(state)
    with torch.no_grad():
        ref = reference(net, X, branches=branches)
        assert close(model.logits(X), ref)
        # full resolution: the Caffe Interp / AdaptSegNet's Upsample(align_corners=True)
        full = F.interpolate(ref, size=X.shape[-2:], mode="bilinear", align_corners=True)
        assert close(model(X), full)
        if layout == "adaptsegnet":  # the sum of the first two branches, and not of four
            four = reference(net, X, branches=4)
            assert not close(model.logits(X), four, rtol=0.05)
    if layout != "isht7":
        text = report.summary()
        assert "AdaptSegNet" in text and "ADVENT" in text and "head_mode='adaptsegnet'" in text


def test_torchvision_resnet_features_are_reproduced(tmp_path):
    net = canonical()
    state = resnet_keys(net)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(state, path)
    model = tiny_model()
    load_weights(model, path)
    with torch.no_grad():
        assert close(model.backbone(X), reference(net, X, layout="torchvision",
                                                 features_only=True))


@pytest.mark.parametrize("prefix", ["", "base."])
def test_kazuto1011_checkpoints_are_reproduced(tmp_path, prefix):
    net = canonical()
    state = kazuto_keys(net, prefix)
    path = tmp_path / "deeplabv2_resnet101_msc-vocaug-20000.pth"
    torch.save(state, path)
    model = tiny_model()
    report = load_weights(model, path, head="require", alignment="pytorch")
    assert report.layout == "kazuto" and report.alignment == "pytorch"
    assert len(report.loaded) + len(report.dropped) == len(state)
    x = X[..., :64, :80]  # kazuto trains and tests at any size
    with torch.no_grad():
        ref = reference(net, x)
        assert close(model.logits(x), ref)
        assert close(model(x), F.interpolate(ref, size=(64, 80), mode="bilinear",
                                             align_corners=False))
        # its MSC (eval): scales 0.5 and 0.75 by scale_factor, max with the scale-1 scores
        pyramid = [ref] + [F.interpolate(reference(net, F.interpolate(
            x, scale_factor=s, mode="bilinear", align_corners=False)), size=ref.shape[-2:],
            mode="bilinear", align_corners=False) for s in (0.5, 0.75)]
        assert close(MSC(model, [1.0, 0.5, 0.75]).eval()(x, upsample=False),
                     torch.stack(pyramid).max(0).values)
    # under the default (caffe) convention the report says how to match kazuto's
    other = tiny_model()
    assert "alignment='pytorch'" in load_weights(other, path).summary()


def test_the_file_records_the_alignment_and_resume_keeps_it(tmp_path):
    model = tiny_model()
    model.alignment = get_alignment("pytorch")
    deeplabv2.save_weights(model, tmp_path / "m.pth")
    assert deeplabv2.load_model(tmp_path / "m.pth").alignment.name == "pytorch"
    raw = torch.load(tmp_path / "m.pth", weights_only=True)
    assert raw["alignment"] == "pytorch" and raw["version"] == 2
    raw.pop("alignment")  # a file of format 1 was trained with align_corners=False
    raw.pop("sha256")  # nor did it record a digest of its contents (edited, it would not match)
    raw["version"] = 1
    torch.save(raw, tmp_path / "v1.pth")
    assert deeplabv2.load_model(tmp_path / "v1.pth").alignment.name == "pytorch"
    deeplabv2.save_weights(tiny_model(), tmp_path / "c.safetensors")
    assert deeplabv2.load_model(tmp_path / "c.safetensors").alignment.name == "caffe"


def test_training_from_an_init_file_starts_a_fresh_head(tmp_path):
    from deeplabv2.config import load_config
    from deeplabv2.train import _build_model
    net = canonical()
    path = tmp_path / "MS_DeepLab_resnet_pretrained_COCO_init.pth"
    torch.save({**resnet_keys(net, "Scale."), **head_keys(net["head"], "Scale.layer5")}, path)
    over = [f"model.weights={path}", "model.blocks=[1,1,1,1]", "model.width=64",
            f"model.num_classes={CLASSES}"]
    model = _build_model(load_config("voc12_aug", over), CLASSES)
    assert not model.load_report.head_loaded
    assert all((c.bias == 0).all() and 0.005 < c.weight.std() < 0.015 for c in model.head.convs)
    kept = _build_model(load_config("voc12_aug", over + ["model.init_head=true"]), CLASSES)
    assert kept.load_report.head_loaded
    assert torch.equal(kept.head.convs[2].bias, net["head"][2][1])


def test_multi_level_files_load_the_auxiliary_head(tmp_path):
    """AdaptSegNet/ADVENT multi-level files: layer5 (on layer3) is the auxiliary head of a model
    built with aux_head, and the model's aux output is that head's scores; without aux_head the
    file's layer5 is dropped and said so."""
    net = canonical()
    state = {**resnet_keys(net), **head_keys(net["aux"], "layer5"),
             **head_keys(net["head"], "layer6")}
    path = tmp_path / "GTA2Cityscapes_multi.pth"
    torch.save(state, path)
    model = tiny_model(aux_head=True)
    report = load_weights(model, path, head="require")
    assert not report.dropped or all("num_batches" in k for k in report.dropped)
    with torch.no_grad():
        main, aux = model(X, upsample=False, aux=True)
        assert close(main, reference(net, X))
        # the auxiliary head on layer3 features, computed from the file's tensors
        x3 = reference({**net, "stages": net["stages"][:3]}, X, features_only=True)
        ref_aux = sum(F.conv2d(x3, w, b, padding=r, dilation=r)
                      for (w, b), r in zip(net["aux"], RATES))
        assert close(aux, ref_aux)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.param_groups(1e-3)}
    assert id(model.aux_head.convs[0].weight) in groups["head"]
    plain = tiny_model()
    dropped = load_weights(plain, path).dropped
    assert "layer5.conv2d_list.0.weight" in dropped and "aux_head" in dropped[
        "layer5.conv2d_list.0.weight"]
    deeplabv2.save_weights(model, tmp_path / "ours.pth")
    again = deeplabv2.load_model(tmp_path / "ours.pth")
    assert again.aux_head is not None and torch.equal(again.aux_head.convs[1].bias,
                                                      model.aux_head.convs[1].bias)

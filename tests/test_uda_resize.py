"""Training data as the released domain adaptation codes load it: a fixed-size resize (PIL
bicubic or bilinear image, nearest label) before the crop (``data.resize``,
``adapt.target_resize``), the packaged configs' sizes, and FDA's entropy divisor."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from deeplabv2 import memory
from deeplabv2.adapt.methods import FDA, Step
from deeplabv2.checkpoint import changed_settings
from deeplabv2.config import AdaptConfig, ConfigError, load_config
from deeplabv2.data.transforms import TrainTransform
from deeplabv2.model.preprocessing import Preprocessing
from deeplabv2.train import _batches

# The network input is the RGB image as floats, so outputs compare with PIL's uint8 results.
RGB = Preprocessing("RGB", 1.0, (0.0, 0.0, 0.0))


def random_pair(h, w, seed=0, values=(0, 1, 2, 3, 255)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array(values, dtype=np.uint8), (h, w))
    return image, label


def as_uint8(image: torch.Tensor) -> np.ndarray:
    """A (3, h, w) float image of whole numbers back to (h, w, 3) uint8."""
    out = image.permute(1, 2, 0).numpy()
    assert np.array_equal(out, np.round(out))
    return out.astype(np.uint8)


def find_window(big: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (y0, x0) where ``crop`` equals ``big[y0:y0+h, x0:x0+w]``: a search, independent of
    how the transform draws its offset."""
    h, w = crop.shape[:2]
    corner = crop[:4, :4].transpose(2, 0, 1)  # as the windows' trailing axes: (3, 4, 4)
    windows = np.lib.stride_tricks.sliding_window_view(
        big[:big.shape[0] - h + 4, :big.shape[1] - w + 4], (4, 4), axis=(0, 1))
    hits = np.argwhere((windows == corner).all(axis=(2, 3, 4)))
    return [(int(y), int(x)) for y, x in hits
            if np.array_equal(big[y:y + h, x:x + w], crop)]


# -- the fixed resize ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, pil_filter", [("bicubic", Image.BICUBIC),
                                              ("bilinear", Image.BILINEAR)])
def test_fixed_resize_is_pils_resize_of_the_uint8_image_and_nearest_of_the_label(name,
                                                                                   pil_filter):
    image, label = random_pair(53, 97)
    t = TrainTransform(crop_size=(31, 56), resize=(31, 56), resize_filter=name,
                       scale_range=(1, 1), flip=False, preprocessing=RGB)
    out = t(image, label, np.random.default_rng(0))
    assert out["image"].shape == (3, 31, 56) and out["label"].shape == (31, 56)
    expected = np.asarray(Image.fromarray(image).resize((56, 31), pil_filter))
    assert np.array_equal(as_uint8(out["image"]), expected)
    expected_label = np.asarray(Image.fromarray(label).resize((56, 31), Image.NEAREST))
    assert np.array_equal(out["label"].numpy(), expected_label)
    assert set(np.unique(out["label"].numpy())) <= {0, 1, 2, 3, 255}  # no invented values
    # the two filters really differ (the test would see a wrong one)
    other = Image.BILINEAR if pil_filter == Image.BICUBIC else Image.BICUBIC
    assert not np.array_equal(expected, np.asarray(Image.fromarray(image).resize((56, 31),
                                                                                  other)))


def test_a_random_crop_after_the_fixed_resize_lies_inside_it_and_moves():
    image, label = random_pair(47, 83, seed=1, values=(0, 1, 2, 3, 4))  # no ignored pixels
    resized = np.asarray(Image.fromarray(image).resize((64, 36), Image.BICUBIC))
    resized_label = np.asarray(Image.fromarray(label).resize((64, 36), Image.NEAREST))
    t = TrainTransform(crop_size=(20, 40), resize=(36, 64), resize_filter="bicubic",
                       scale_range=(1, 1), flip=False, preprocessing=RGB)
    offsets = set()
    for seed in range(24):
        out = t(image, label, np.random.default_rng(seed))
        crop = as_uint8(out["image"])
        hits = find_window(resized, crop)
        assert len(hits) == 1, seed
        y0, x0 = hits[0]
        assert 0 <= y0 <= 36 - 20 and 0 <= x0 <= 64 - 40
        assert np.array_equal(out["label"].numpy(), resized_label[y0:y0 + 20, x0:x0 + 40])
        offsets.add((y0, x0))
    assert len(offsets) > 10  # a random window, not a fixed one


def test_no_resize_is_the_previous_transform():
    image, label = random_pair(40, 60, seed=2)
    for off in (None, []):
        a = TrainTransform(crop_size=(24, 24), resize=off, preprocessing=RGB)
        b = TrainTransform(crop_size=(24, 24), preprocessing=RGB)
        x, y = a(image, label, np.random.default_rng(5)), b(image, label, np.random.default_rng(5))
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    with pytest.raises(ValueError, match="resize_filter"):
        TrainTransform(crop_size=8, resize=(8, 8), resize_filter="nearest")
    with pytest.raises(ValueError, match="resize must be positive"):
        TrainTransform(crop_size=8, resize=(0, 8))


# -- the configuration --------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("data.resize=[720]", r"data.resize must be \[height, width\]"),
    ("data.resize=[0, 1280]", r"data.resize must be \[height, width\].*\[0, 1280\]"),
    ("data.resize=[7.5, 12]", r"data.resize must be \[height, width\]"),
    ("data.resize=big", r"data.resize must be \[height, width\].*'big'"),
    ("data.resize_filter=lanczos", r"data.resize_filter='lanczos'; valid values: bicubic, "
                                   r"bilinear"),
    ("adapt.target_resize=[512, 1024, 3]", r"adapt.target_resize must be \[height, width\]"),
    ("adapt.target_resize_filter=nearest", r"adapt.target_resize_filter='nearest'; valid "
                                           r"values: bicubic, bilinear"),
])
def test_resize_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_resize_keys_accept_off_and_sizes():
    assert load_config(None, ["data.resize=[]"]).data.resize == []
    assert load_config(None, ["data.resize=null"]).data.resize is None
    cfg = load_config(None, ["data.resize=[720, 1280]", "data.resize_filter=bicubic",
                             "adapt.target_resize=[512, 1024]"])
    assert cfg.data.resize == [720, 1280] and cfg.adapt.target_resize == [512, 1024]
    assert cfg.adapt.target_resize_filter == "bilinear"  # the default, as data.resize_filter


def test_a_changed_resize_is_a_changed_run():
    old = load_config(None, ["data.resize=[720, 1280]"]).to_dict()
    new = load_config(None, ["data.resize=[720, 1280]", "data.resize_filter=bicubic",
                             "adapt.target_resize=[512, 1024]"]).to_dict()
    changes = changed_settings(old, new)
    assert "data.resize_filter 'bilinear' -> 'bicubic'" in changes
    assert "adapt.target_resize None -> [512, 1024]" in changes


def test_crop_warnings_see_the_resized_size():
    ds = SimpleNamespace(checked_sizes={(1052, 1914): 3})
    cfg = load_config(None, ["data.crop_size=[800, 1024]", "data.scale_range=[1, 1]"])
    assert memory.crop_warnings(cfg, ds) == []  # 1052x1914 holds the crop
    cfg = load_config(None, ["data.crop_size=[800, 1024]", "data.scale_range=[1, 1]",
                             "data.resize=[720, 1280]"])
    (line,) = memory.crop_warnings(cfg, ds)  # 720x1280 does not
    assert "data.crop_size=[800, 1024]" in line and "720x1280" in line


# -- the packaged configs, through the loop's loaders -------------------------------------------
class Frames:
    """Sized frames for the loaders: ``images[i]``, ``labels[i]``."""

    seed = 0

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def load(self, index):
        return self.images[index], self.labels[index]


def coordinate_frame(h, w):
    """An image whose pixels name their own position (R: x mod 256, G: x // 256 * 4 + y // 256,
    B: y mod 256) and a label of 16 valid classes."""
    y, x = np.mgrid[:h, :w]
    image = np.stack([x % 256, x // 256 * 4 + y // 256, y % 256], -1).astype(np.uint8)
    return image, ((x + y) % 16).astype(np.uint8)


def loaders(name, source, target):
    cfg = load_config(name, ["data.num_workers=0"])
    info = SimpleNamespace(rank=0, world_size=1)
    return cfg, _batches(cfg, source, target, RGB, 0, info, torch.device("cpu"))


def test_synthia_fda_crops_1024x512_inside_the_1280x760_frame_without_padding():
    image, label = coordinate_frame(760, 1280)
    target = random_pair(1024, 2048, seed=3)
    cfg, (batches, target_batches) = loaders("synthia_to_cityscapes_fda",
                                             Frames([image] * 4, [label] * 4),
                                             Frames([target[0]], [target[1]]))
    assert cfg.data.resize == [760, 1280] and cfg.data.crop_size == [512, 1024]
    offsets = set()
    for _ in range(6):
        batch = next(batches)
        assert batch["image"].shape == (1, 3, 512, 1024)
        crop = as_uint8(batch["image"][0]).astype(np.int64)
        ys = (crop[..., 1] % 4) * 256 + crop[..., 2]
        xs = (crop[..., 1] // 4) * 256 + crop[..., 0]
        y0, x0 = int(ys[0, 0]), int(xs[0, 0])
        # every pixel is the frame's own pixel of one window, fully inside the frame
        assert np.array_equal(ys, y0 + np.arange(512)[:, None] + 0 * xs)
        assert np.array_equal(xs, x0 + np.arange(1024)[None, :] + 0 * ys)
        assert 0 <= y0 <= 760 - 512 and 0 <= x0 <= 1280 - 1024
        assert (batch["label"] != 255).all()  # no ignored padding
        assert torch.equal(batch["label"][0], torch.from_numpy(label[y0:y0 + 512,
                                                                     x0:x0 + 1024]).long())
        offsets.add((y0, x0))
    assert len(offsets) > 1
    # the target: the whole Cityscapes frame resized bicubically to 1024x512
    t = next(target_batches)["image"][0]
    expected = np.asarray(Image.fromarray(target[0]).resize((1024, 512), Image.BICUBIC))
    assert np.array_equal(as_uint8(t), expected)


@pytest.mark.parametrize("name, target_filter", [("gta5_to_cityscapes_dacs", Image.BILINEAR),
                                                 ("gta5_to_cityscapes_fda", Image.BICUBIC)])
def test_gta5_configs_resize_to_1280x720_bicubic_then_crop(name, target_filter):
    source = random_pair(1052, 1914, seed=4, values=tuple(range(19)))
    target = random_pair(1024, 2048, seed=5)
    cfg, (batches, target_batches) = loaders(name, Frames([source[0]], [source[1]]),
                                             Frames([target[0]], [target[1]]))
    ch, cw = cfg.data.crop_size
    resized = np.asarray(Image.fromarray(source[0]).resize((1280, 720), Image.BICUBIC))
    resized_label = np.asarray(Image.fromarray(source[1]).resize((1280, 720), Image.NEAREST))
    batch = next(batches)
    (y0, x0), = find_window(resized, as_uint8(batch["image"][0]))
    assert np.array_equal(batch["label"][0].numpy(), resized_label[y0:y0 + ch, x0:x0 + cw])
    # the target: resized to 1024x512 with its own filter, then cropped as the source
    t = as_uint8(next(target_batches)["image"][0])
    assert t.shape == (ch, cw, 3)
    target_resized = np.asarray(Image.fromarray(target[0]).resize((1024, 512), target_filter))
    assert len(find_window(target_resized, t)) == 1


@pytest.mark.parametrize("name", ["gta5_to_cityscapes_adaptsegnet", "gta5_to_cityscapes_advent",
                                  "gta5_to_cityscapes_fda", "gta5_to_cityscapes_dacs",
                                  "synthia_to_cityscapes_adaptsegnet",
                                  "synthia_to_cityscapes_advent", "synthia_to_cityscapes_fda",
                                  "synthia_to_cityscapes_dacs"])
def test_packaged_configs_use_the_released_sizes(name):
    cfg = load_config(name)
    d, a = cfg.data, cfg.adapt
    source = [720, 1280] if name.startswith("gta5") else [760, 1280]
    assert d.resize == source and d.resize_filter == "bicubic"
    assert a.target_resize == [512, 1024]
    assert a.target_resize_filter == ("bilinear" if name.endswith("dacs") else "bicubic")
    assert d.scale_range == [1.0, 1.0] and a.target_scale_range == [1.0, 1.0] and not d.flip
    crops = {"adaptsegnet": (source, [512, 1024]), "advent": (source, [512, 1024]),
             "fda": ([512, 1024], [512, 1024]), "dacs": ([512, 512], [512, 512])}
    assert (d.crop_size, a.target_crop_size) == crops[a.method]
    # every crop lies inside its resized image: no padding
    for crop, size in ((d.crop_size, d.resize), (a.target_crop_size, a.target_resize)):
        assert crop[0] <= size[0] and crop[1] <= size[1]


# -- FDA's entropy ------------------------------------------------------------------------------
def fda_released_entropy(x: torch.Tensor, ita: float) -> torch.Tensor:
    """YanchaoYang/FDA model/deeplab.py, written out: the entropy divided by 2.9444 whatever
    the number of classes, squared plus 1e-8, to the power ita, averaged."""
    p = torch.softmax(x, dim=1)
    log_p = torch.log_softmax(x, dim=1)
    ent = -1.0 * (p * log_p).sum(dim=1)
    ent = ent / 2.9444
    ent = ent ** 2.0 + 1e-8
    ent = ent ** ita
    return ent.mean()


def fda_entropy_term(logits: torch.Tensor, settings: AdaptConfig) -> torch.Tensor:
    """The FDA method's target pass (k = 1) on a network that answers ``logits``."""
    def net(x, upsample=True):
        assert upsample is False  # the entropy of the stride-8 scores, as released
        return logits
    method = FDA(settings, torch.nn.Identity())
    step = Step(net=net, model=SimpleNamespace(preprocessing=RGB), images=None, labels=None,
                target=torch.zeros(logits.shape[0], 3, 8, 8), iteration=0, seg_loss=None)
    return method.loss(step, 1)


@pytest.mark.parametrize("classes", [16, 19])
def test_fda_entropy_divides_by_the_released_constant(classes):
    torch.manual_seed(classes)
    logits = torch.randn(2, classes, 5, 7, dtype=torch.float64) * 2
    settings = AdaptConfig(method="fda", fda_lambda_ent=0.005, fda_eta=2.0, fda_ent_start=0)
    got = fda_entropy_term(logits, settings)
    expected = 0.005 * fda_released_entropy(logits, 2.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    # ln C normalisation: the same for 19 classes up to (ln 19 / 2.9444) ** 4 = 1 + 5.3e-5
    # (2.9444 is ln 19 to five digits), 0.79 of it for 16
    p = torch.softmax(logits, 1)
    by_ln_c = -(p * torch.log_softmax(logits, 1)).sum(1) / np.log(classes)
    ln_c_term = 0.005 * ((by_ln_c ** 2 + 1e-8) ** 2).mean()
    if classes == 19:
        assert got.item() == pytest.approx(ln_c_term.item() * (np.log(19) / 2.9444) ** 4,
                                           rel=1e-6)
        assert got.item() == pytest.approx(ln_c_term.item(), rel=1e-4)
    else:
        assert got.item() == pytest.approx(ln_c_term.item() * (np.log(16) / 2.9444) ** 4,
                                           rel=1e-6)
        assert abs(got.item() / ln_c_term.item() - 1) > 0.15


# -- end to end, on the official layouts --------------------------------------------------------
def test_synthia_fda_config_trains_on_the_official_layouts(tmp_path, monkeypatch):
    """The packaged SYNTHIA -> Cityscapes FDA config (a tiny network) on 1280x760 SYNTHIA frames
    and 2048x1024 Cityscapes frames in their official folders: the amplitude swap sees two
    1024x512 crops with no padding, and the entropy pass runs."""
    from test_uda_data import write_png16

    from deeplabv2.train import train

    rng = np.random.default_rng(7)
    synthia, cityscapes = tmp_path / "synthia", tmp_path / "cityscapes"
    for i in range(2):
        (synthia / "RGB").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (760, 1280, 3), dtype=np.uint8)).save(
            synthia / f"RGB/000000{i}.png")
        ids = rng.choice(np.array([3, 4, 2, 8, 1], np.uint16), (760, 1280))  # no void
        write_png16(synthia / f"GT/LABELS/000000{i}.png", np.stack([ids, ids * 0, ids * 0], -1))
    for split, (h, w) in (("train", (1024, 2048)), ("val", (256, 512))):  # a small val frame
        frame = cityscapes / f"leftImg8bit/{split}/aachen/aachen_000000_000019_leftImg8bit.png"
        frame.parent.mkdir(parents=True)
        patch = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # tiled: a fast PNG
        Image.fromarray(np.tile(patch, (h // 64, w // 64, 1))).save(frame)
    label = cityscapes / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png"
    label.parent.mkdir(parents=True)
    Image.fromarray(rng.choice(np.array([7, 8, 11, 26, 0], np.uint8), (256, 512))).save(label)

    cfg = load_config("synthia_to_cityscapes_fda", [
        f"data.root={synthia}", f"adapt.target_root={cityscapes}", "model.weights=null",
        "model.blocks=[1, 1, 1, 1]", "model.width=8", "data.num_workers=0", "data.check=all",
        "train.iterations=2", "train.stop_at=2", "adapt.fda_ent_start=1", "adapt.fda_beta=0.05",
        f"train.out_dir={tmp_path / 'run'}", "train.tensorboard=false", "train.progress=false",
        "train.threads=1", "train.check_memory=false", "train.val_limit=1"])
    seen = []
    original = FDA.loss

    def spy(self, step, k):
        if k == 0:
            seen.append((step.images.shape, step.target.shape, bool((step.labels == 255).any())))
        return original(self, step, k)

    logs = []
    monkeypatch.setattr(FDA, "loss", spy)
    train(cfg, on_iteration=lambda it, log: logs.append(log))
    assert seen == [((1, 3, 512, 1024), (1, 3, 512, 1024), False)] * 2
    assert len(logs) == 2 and "adapt/ent" in logs[1]

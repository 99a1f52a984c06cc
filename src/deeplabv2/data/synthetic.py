"""A street-like synthetic segmentation set, generated on the fly: the embedded demo data.

Each sample is a pure function of ``(seed, split, index)``; no files are read or written.
Train and val draw from disjoint seed streams, so val scenes are never seen in training.

The classes are designed so that colour alone is a poor cue: every object draws its colour
from a pool of paints that several classes share (with per-object jitter, a per-image
illumination and pixel noise), so a per-pixel colour classifier scores a low mIoU (0.26 on
200 val scenes, fitted on 400 train scenes; see :mod:`deeplabv2.demo.colour_baseline`). What tells
the classes apart is what a convolutional network with a wide receptive field sees (a small
output-stride-8 dilated CNN trained from scratch for 400 iterations on 2 CPU cores: 0.85):

=============  =====================================  ==========================  ==========
class          texture                                shape                       layout
=============  =====================================  ==========================  ==========
road           fine per-pixel grain                   trapezoid                   bottom
sidewalk       checker tiles                          ground plane                middle
building       grid of windows (dots)                 tall rectangles             middle/top
vegetation     coarse blotchy noise                   blobs (unions of ellipses)  middle
sky            smooth vertical gradient               region above the horizon    top
car            horizontal stripes                     wide low rectangles         on the road
pole           flat                                   thin vertical bands         standing
=============  =====================================  ==========================  ==========

Images are RGB ``uint8`` ``(H, W, 3)`` (default 96x160), labels ``uint8`` ``(H, W)`` train ids;
every pixel is labelled (no 255).

``style="target"`` renders other scenes of the same classes and layouts as a second domain,
the kind of gap that separates GTA5 from Cityscapes (:func:`restyle`): another colour balance
(a cold cast), dimmer light with a different tone curve, softer textures (a camera's blur) and
sensor noise. It is the target domain of ``deeplabv2 demo --adapt``.
"""

from __future__ import annotations

import numpy as np

from .base import DatasetError, SegmentationDataset

CLASSES = ("road", "sidewalk", "building", "vegetation", "sky", "car", "pole")
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, POLE = range(len(CLASSES))
# Display colours borrowed from the Cityscapes classes of the same names.
PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35),
                    (70, 130, 180), (0, 0, 142), (153, 153, 153)], dtype=np.uint8)

# Paints shared between classes: an object picks one of its class's paints, then jitters it.
PAINTS = np.array([
    (125, 125, 125),  # 0 grey
    (80, 115, 185),   # 1 blue
    (85, 140, 70),    # 2 green
    (145, 105, 65),   # 3 brown
    (180, 65, 60),    # 4 red
    (195, 185, 150),  # 5 beige
    (70, 70, 80),     # 6 dark
], dtype=np.float32)
CLASS_PAINTS = {
    ROAD: (0, 3, 1, 5, 6),
    SIDEWALK: (5, 0, 4, 3),
    BUILDING: (3, 5, 4, 0, 1, 6),
    VEGETATION: (2, 3, 0, 5, 6),
    SKY: (1, 0, 5, 2),
    CAR: (4, 1, 2, 0, 5, 6),
    POLE: (6, 0, 2, 5, 1, 4),
}
PREFERRED = 0.6  # how often an object takes its class's first paint
SPLITS = ("train", "val")
STYLES = ("source", "target")


class SyntheticDataset(SegmentationDataset):
    """Street-like scenes made from a seed (see the module docstring for the classes).

    ``split`` is ``'train'`` or ``'val'`` (disjoint seed streams); ``size`` is ``(H, W)``;
    ``num_samples`` defaults to 2000 for train and 200 for val. ``seed`` selects both the
    scenes and (with the epoch) the augmentation draw.
    """

    classes = CLASSES
    palette = PALETTE

    def __init__(self, split: str = "train", size=(96, 160), num_samples: int | None = None,
                 seed: int = 0, transform=None, root=None, style: str = "source"):
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
        if style not in STYLES:
            raise ValueError(f"synthetic style must be one of {STYLES}, got {style!r}")
        self.style = style
        super().__init__(root, split, transform, seed)
        self.size = (int(size[0]), int(size[1])) if not isinstance(size, int) else (size, size)
        if min(self.size) < 32:
            raise ValueError(f"synthetic images need at least 32x32 pixels, got {self.size}")
        self.num_samples = int(num_samples if num_samples is not None
                               else (2000 if split == "train" else 200))
        if self.num_samples < 1:
            raise DatasetError(f"dataset 'synthetic', split {split!r}: num_samples="
                               f"{self.num_samples} makes no images; set num_samples to 1 or "
                               f"more (data.options, adapt.target_options)")

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"SyntheticDataset(split={self.split!r}, size={self.size}, "
                f"num_samples={self.num_samples}, seed={self.seed})")

    def name(self, index: int) -> str:
        prefix = "synthetic" if self.style == "source" else "synthetic_target"
        return f"{prefix}_{self.split}_{index:06d}"

    def source(self, index: int) -> str:
        return self.name(index)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image RGB uint8 (H, W, 3), label uint8 (H, W))`` of scene ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        # A seed sequence of a different length than the augmentation's (seed, epoch, index),
        # so scene and augmentation streams never coincide.
        if self.style == "source":
            rng = np.random.default_rng([self.seed, 0x5E6, SPLITS.index(self.split), index])
            return make_scene(rng, *self.size)
        rng = np.random.default_rng([self.seed, 0x7A6, SPLITS.index(self.split), index])
        image, label = make_scene(rng, *self.size)
        return restyle(image, rng), label


def restyle(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The target domain's look of an RGB ``uint8`` image: a cold colour cast, dimmer light and
    a gamma of 1.5, a Gaussian blur (sigma 1.2) and sensor noise (sigma 9), with a small
    per-image variation of the light."""
    x = image.astype(np.float32) / 255.0
    x = x * np.array([0.75, 0.95, 1.25], np.float32) * rng.uniform(0.65, 0.85)
    x = np.clip(x, 0, 1) ** 1.5
    r = np.arange(-4, 5, dtype=np.float32)
    k = np.exp(-0.5 * (r / 1.2) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(4, 4) if a == axis else (0, 0) for a in range(3)]
        padded = np.pad(x, pad, mode="edge")
        x = sum(k[i] * np.take(padded, np.arange(i, i + x.shape[axis]), axis=axis)
                for i in range(len(k)))
    x = x * 255 + rng.normal(0, 9, x.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


# -- scene generation ------------------------------------------------------------------------

def make_scene(rng: np.random.Generator, height: int, width: int):
    """Draw one scene; returns ``(image uint8 (H, W, 3), label uint8 (H, W))``.

    Objects are painted back to front; each is drawn inside its bounding box only (``yy``,
    ``xx`` are the pixel coordinates of that box).
    """
    H, W = height, width
    image = np.zeros((H, W, 3), np.float32)
    label = np.zeros((H, W), np.uint8)
    grid_y, grid_x = np.mgrid[0:H, 0:W].astype(np.float32)

    def box(y0, y1, x0, x1):
        """Slices of the image rows/columns ``[y0, y1) x [x0, x1)`` clipped to the image, or
        None when empty."""
        ys = slice(max(0, int(np.floor(y0))), min(H, int(np.ceil(y1))))
        xs = slice(max(0, int(np.floor(x0))), min(W, int(np.ceil(x1))))
        return (ys, xs) if ys.start < ys.stop and xs.start < xs.stop else None

    def paint(region, mask, cls, pattern, amplitude):
        colour = _paint(rng, cls)
        image[region][mask] = colour + amplitude * pattern[mask][:, None]
        label[region][mask] = cls

    everything = (slice(0, H), slice(0, W))

    # Horizon (slightly tilted): sky above, ground plane (sidewalk) below.
    horizon = rng.uniform(0.3, 0.5) * H + rng.uniform(-0.1, 0.1) * (grid_x[0] - W / 2)
    sky = grid_y < horizon
    paint(everything, sky, SKY, (grid_y / H - 0.25) * 2.0, rng.uniform(20, 40))
    paint(everything, ~sky, SIDEWALK, _checker(rng, grid_y, grid_x, 4, 7), rng.uniform(25, 45))

    # Road: a trapezoid from its top edge down to the bottom of the image.
    top = min(float(horizon.max()) + rng.uniform(0.08, 0.25) * H, H - 12.0)
    region = box(top, H, 0, W)
    yy, xx = grid_y[region], grid_x[region]
    t = (yy - top) / (H - top)
    centre = W * rng.uniform(0.35, 0.65)
    half = 0.5 * W * (rng.uniform(0.2, 0.5) + (rng.uniform(1.0, 1.8) - 0.3) * t)
    road = (yy >= top) & (np.abs(xx - centre) <= half)
    paint(region, road, ROAD, 0.8 * rng.standard_normal(yy.shape, dtype=np.float32),
          rng.uniform(30, 45))

    # Buildings standing on the horizon, reaching into the sky.
    for _ in range(rng.integers(2, 6)):
        w = rng.uniform(0.12, 0.35) * W
        x0 = rng.uniform(-0.1 * W, W - 0.5 * w)
        base = float(np.interp(x0 + w / 2, grid_x[0], horizon)) + rng.uniform(0, 0.12) * H
        height_b = rng.uniform(0.2, 0.5) * H
        region = box(base - height_b, base, x0, x0 + w)
        if region is not None:
            pattern = _windows(rng, grid_y[region], grid_x[region], x0, base)
            paint(region, np.ones(pattern.shape, bool), BUILDING, pattern, rng.uniform(35, 55))

    # Vegetation: blobs made of a few ellipses around the horizon.
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, W), float(horizon.mean()) + rng.uniform(-0.15, 0.15) * H
        ellipses = [(cx + rng.uniform(-12, 12), cy + rng.uniform(-8, 8), rng.uniform(6, 16),
                     rng.uniform(5, 13)) for _ in range(rng.integers(2, 5))]
        region = box(cy - 21, cy + 21, cx - 28, cx + 28)  # holds every ellipse
        if region is None:
            continue
        yy, xx = grid_y[region], grid_x[region]
        mask = np.zeros(yy.shape, bool)
        for ex, ey, rx, ry in ellipses:
            mask |= ((xx - ex) / rx) ** 2 + ((yy - ey) / ry) ** 2 <= 1
        paint(region, mask, VEGETATION, _blotches(rng, *yy.shape), rng.uniform(35, 55))

    # Poles: thin vertical bands standing on the ground.
    for _ in range(rng.integers(0, 4)):
        x0, w = rng.uniform(0, W - 8), float(rng.integers(5, 9))
        foot = rng.uniform(horizon.mean() + 0.05 * H, min(top + 0.1 * H, H - 1))
        head = foot - rng.uniform(0.35, 0.65) * H
        region = box(head, foot, x0, x0 + w)
        if region is not None:
            shape = grid_y[region].shape
            paint(region, np.ones(shape, bool), POLE, np.zeros(shape, np.float32), 0.0)

    # Cars on the road, bigger when nearer (lower in the image).
    for _ in range(rng.integers(0, 4)):
        bottom = rng.uniform(top + 8, H + 4)
        near = (bottom - top) / (H - top)
        w = (0.15 + 0.2 * near) * W * rng.uniform(0.8, 1.2)
        h = w * rng.uniform(0.4, 0.6)
        x0 = centre + rng.uniform(-0.6, 0.6) * W * 0.3 - w / 2
        region = box(bottom - h, bottom, x0, x0 + w)
        if region is not None:
            pattern = _stripes(rng, grid_y[region], 3, 6)
            paint(region, np.ones(pattern.shape, bool), CAR, pattern, rng.uniform(30, 50))

    # Per-image illumination and sensor noise blur what colour alone could tell.
    image *= rng.uniform(0.75, 1.25, size=3).astype(np.float32)
    image += 6 * rng.standard_normal((H, W, 3), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _paint(rng, cls) -> np.ndarray:
    """A jittered paint for class ``cls``: its first paint half of the time, else any of its
    others."""
    paints = CLASS_PAINTS[cls]
    base = PAINTS[paints[0] if rng.random() < PREFERRED else rng.choice(paints[1:])]
    return base * rng.uniform(0.8, 1.2) + rng.uniform(-25, 25, size=3).astype(np.float32)


def _checker(rng, yy, xx, lo, hi):
    """Checker tiles with a random tile size in ``[lo, hi]`` pixels; values in {-1, 1}."""
    s = rng.uniform(lo, hi)
    oy, ox = rng.uniform(0, 2 * s, size=2)
    return np.where((np.floor((yy + oy) / s) + np.floor((xx + ox) / s)) % 2 == 0, 1.0,
                    -1.0).astype(np.float32)


def _stripes(rng, yy, lo, hi):
    """Horizontal stripes with a random period in ``[lo, hi]`` pixels; values in {-1, 1}."""
    period = rng.uniform(lo, hi)
    return np.where(((yy + rng.uniform(0, period)) % period) < period / 2, 1.0,
                    -1.0).astype(np.float32)


def _windows(rng, yy, xx, x0, y0):
    """Dark window squares on a regular grid anchored at the building's corner: -1 / +0.3."""
    sy, sx = rng.uniform(6, 10), rng.uniform(6, 10)
    size = rng.uniform(0.35, 0.55)
    inside = (((yy - y0) % sy) < size * sy) & (((xx - x0) % sx) < size * sx)
    return np.where(inside, -1.0, 0.3).astype(np.float32)


def _blotches(rng, H, W):
    """Coarse noise: a 4-pixel grid of random values, smoothly upsampled; roughly in [-1, 1]."""
    g = rng.standard_normal((H // 4 + 2, W // 4 + 2), dtype=np.float32)
    ys = np.arange(H, dtype=np.float32) / 4
    xs = np.arange(W, dtype=np.float32) / 4
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    b = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    return np.clip((a * (1 - fy) + b * fy), -1.5, 1.5)

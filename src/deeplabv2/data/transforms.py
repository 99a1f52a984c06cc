"""Per-sample transforms: ``t(image, label, rng) -> {"image", "label"}``.

Input: RGB ``uint8`` ``(H, W, 3)`` image and ``uint8`` ``(H, W)`` label (train ids, 255 =
ignore), plus an ``np.random.Generator`` that the dataset seeds by ``(seed, epoch, index)``.
Output: ``"image"`` a ``float32`` ``(3, h, w)`` tensor already normalised by the given
:class:`~deeplabv2.model.preprocessing.Preprocessing`, ``"label"`` an ``int64`` ``(h, w)`` tensor.

Resizing uses PIL on ``uint8`` arrays (fast, and runs inside DataLoader workers): the image
bilinearly (or bicubically, for the fixed ``resize`` of the adaptation codes), the label with
NEAREST only, so no label value is ever invented by interpolation.
Both use PIL's pixel-centre convention, so image and label stay aligned at any scale. On one
core (what a DataLoader worker gets) a 375x500 VOC image -> 321x321 crop takes about 7 ms, a
1024x2048 Cityscapes frame -> 513x1025 crop about 50 ms.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..model.preprocessing import CAFFE_BGR, Preprocessing
from .base import IGNORE_INDEX


def _pair(size, name: str = "crop_size") -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {size}")
    return h, w


# mmseg RandomCrop: how many windows are checked against cat_max_ratio ("Repeat 10 times").
CAT_MAX_CHECKS = 10

# The image filters of a fixed resize (``TrainTransform(resize_filter=...)``); labels: NEAREST.
RESIZE_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize_pair(image: np.ndarray, label: np.ndarray, height: int, width: int,
                image_filter=Image.BILINEAR):
    """Resize an RGB ``uint8`` image (``image_filter``, a PIL filter: bilinear unless given)
    and its ``uint8`` label (nearest) to ``height x width``; both stay ``uint8`` numpy arrays.
    Nothing is resampled when the size is already right (PIL returns such an image as is)."""
    if image.shape[:2] == (height, width) and label.shape == (height, width):
        return image, label
    im = Image.fromarray(image).resize((width, height), image_filter)
    lb = Image.fromarray(label).resize((width, height), Image.NEAREST)
    return np.asarray(im), np.asarray(lb)


class TrainTransform:
    """DeepLab v2 training augmentation: random scale, pad, random crop, horizontal flip, after
    an optional resize to a fixed size.

    0. when ``resize`` ``(h, w)`` is given, resize to exactly that size first (image with
       ``resize_filter``, "bicubic" or "bilinear"; label nearest), as the released domain
       adaptation codes load their training images: ``Image.resize(size, Image.BICUBIC)``
       for the image and ``Image.NEAREST`` for the label, e.g. GTA5 to 1280x720 and
       Cityscapes to 1024x512 (AdaptSegNet ``dataset/gta5_dataset.py``, ADVENT
       ``advent/dataset/base_dataset.py``, FDA ``data/gta5_dataset.py``, DACS
       ``data/gta5_dataset.py``; DACS's Cityscapes ``RandomCrop_city`` halves bilinearly);
    1. scale by ``s`` drawn uniformly from the discrete set ``scales`` when given (the released
       DeepLab v2 recipe: {0.5, 0.75, 1, 1.25, 1.5}), else ``s ~ U(scale_range)`` (image
       bilinear, label nearest);
    2. flip left-right with probability 0.5 when ``flip``;
    3. pad at the bottom/right up to ``crop_size`` where the scaled image is smaller: the
       image with the preprocessing's mean pixel (exactly 0 after normalisation), the label
       with ``ignore_index``;
    4. take a random ``crop_size`` window; with ``cat_max_ratio`` < 1, draw the window again
       while its label has fewer than two classes or one class covers ``cat_max_ratio`` or
       more of its labelled pixels (ignored pixels not counted), at most
       :data:`CAT_MAX_CHECKS` times, the last window kept unchecked: mmseg's ``RandomCrop``
       (``cat_max_ratio``, 0.75 in DAFormer's and HRDA's source pipelines,
       ``configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py``; its re-draws move the
       window only, as here). The default 1 draws nothing more, so the rest is unchanged.

    Cf. the DeepLab v2 Caffe ``ImageSegData`` layer (``crop_size``, ``mirror``, mean-value
    padding) and the random scaling of the paper (Sec. 4.1, scales 0.5 to 1.5).
    ``crop_size`` is ``(h, w)`` or an int; returns ``{"image": float32 (3, h, w),
    "label": int64 (h, w)}``, and with ``crop_box`` also ``"crop_box"``: an ``int64`` ``(5,)``
    tensor ``(top, left, height, width, flipped)``, the window's corner in the scaled image it
    was cut from (after the flip when ``flipped`` is 1) and that image's size, so that a region
    of the whole image (HRDA's pseudo-label margins) can be found in the crop.
    """

    def __init__(self, crop_size, scale_range=(0.5, 1.5), flip: bool = True,
                 preprocessing: Preprocessing = CAFFE_BGR, ignore_index: int = IGNORE_INDEX,
                 scales=None, resize=None, resize_filter: str = "bilinear",
                 cat_max_ratio: float = 1.0, crop_box: bool = False):
        self.crop_size = _pair(crop_size)
        self.crop_box = bool(crop_box)
        if not 0 < float(cat_max_ratio) <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1: off), got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.resize = None if resize is None or len(resize) == 0 else _pair(resize, "resize")
        if resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"resize_filter must be one of {', '.join(RESIZE_FILTERS)}, got "
                             f"{resize_filter!r}")
        self.resize_filter = resize_filter
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)
        self.scales = tuple(float(s) for s in scales) if scales else None
        if self.scales and not all(s > 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {list(self.scales)}")
        self.flip = bool(flip)
        self.preprocessing = preprocessing
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, resize={self.resize}, "
                f"resize_filter={self.resize_filter!r}, scale_range={self.scale_range}, "
                f"scales={self.scales}, "
                f"flip={self.flip}, "
                + (f"cat_max_ratio={self.cat_max_ratio}, " if self.cat_max_ratio < 1 else "")
                + ("crop_box=True, " if self.crop_box else "")
                + f"preprocessing={self.preprocessing}, "
                f"ignore_index={self.ignore_index})")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> dict:
        ch, cw = self.crop_size
        # Draw everything first, in a fixed order, so a sample depends only on the rng seed.
        s = self.scales[rng.integers(len(self.scales))] if self.scales else \
            rng.uniform(*self.scale_range)
        do_flip = self.flip and rng.random() < 0.5
        u_y, u_x = rng.random(2)

        if self.resize is not None:
            image, label = resize_pair(image, label, *self.resize,
                                       image_filter=RESIZE_FILTERS[self.resize_filter])
        h, w = label.shape
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        image, label = resize_pair(image, label, sh, sw)
        if do_flip:
            image, label = image[:, ::-1], label[:, ::-1]

        # Crop window in the padded (max(sh, ch) x max(sw, cw)) canvas; only its overlap with
        # the real image needs normalising, the rest stays 0 (= mean pixel) / ignore.
        y0 = int(u_y * (max(sh, ch) - ch + 1))
        x0 = int(u_x * (max(sw, cw) - cw + 1))
        if self.cat_max_ratio < 1:  # mmseg RandomCrop's re-draws
            for _ in range(CAT_MAX_CHECKS):
                if self._mixed(label[y0:y0 + ch, x0:x0 + cw]):
                    break
                u_y, u_x = rng.random(2)
                y0 = int(u_y * (max(sh, ch) - ch + 1))
                x0 = int(u_x * (max(sw, cw) - cw + 1))
        img_crop = np.array(image[y0:y0 + ch, x0:x0 + cw])  # a writable copy for torch
        lbl_crop = label[y0:y0 + ch, x0:x0 + cw]
        vh, vw = lbl_crop.shape

        out_image = torch.zeros(3, ch, cw, dtype=torch.float32)
        out_image[:, :vh, :vw] = self.preprocessing(img_crop)[0]
        out_label = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
        out_label[:vh, :vw] = torch.from_numpy(lbl_crop.astype(np.int64))
        if self.crop_box:
            return {"image": out_image, "label": out_label,
                    "crop_box": torch.tensor([y0, x0, sh, sw, int(do_flip)], dtype=torch.int64)}
        return {"image": out_image, "label": out_label}


    def _mixed(self, label: np.ndarray) -> bool:
        """At least two classes, none covering ``cat_max_ratio`` of the labelled pixels."""
        counts = np.bincount(label.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio


class EvalTransform:
    """The whole image, normalised; no randomness (``rng`` is ignored and may be ``None``).

    Returns ``{"image": float32 (3, H, W), "label": int64 (H, W)}``.
    """

    def __init__(self, preprocessing: Preprocessing = CAFFE_BGR):
        self.preprocessing = preprocessing

    def __repr__(self) -> str:
        return f"EvalTransform(preprocessing={self.preprocessing})"

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None) -> dict:
        return {"image": self.preprocessing(np.array(image))[0],  # writable copy for torch
                "label": torch.from_numpy(label.astype(np.int64))}

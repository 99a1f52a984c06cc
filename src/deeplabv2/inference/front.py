"""Inference: class probabilities of preprocessed images. No training imports here.

One entry point, :func:`infer`, runs every test-time mode the paper reports (Sec. 4):

* ``mode="whole"``: the image in one pass (``predict_probs``);
* ``mode="sliding"``: overlapping ``crop_size`` windows every ``stride`` pixels, for images
  too large for memory in one pass (the paper's Cityscapes runs, Sec. 4.4); where windows
  overlap, ``window_fuse="probs"`` averages their probabilities, ``"logits"`` their scores
  before one softmax (mmseg's ``slide_inference``: HRDA and MIC);
* ``msc_scales``: the paper's test-time multi-scale inputs (Sec. 3.3/4.1, "MSC"): the image
  at each scale (``(1, 0.75, 0.5)``) through the network, the stride-8 *scores* fused by
  element-wise max (``Eltwise MAX`` in the released test prototxt), one softmax;
* ``avg_scales``: a later, different protocol (DeepLab v3 and most PyTorch code): one whole
  pass per scale and the softmax *probabilities* averaged;
* ``flip``: adds the mirrored image to every pass.

Resizing follows the model's alignment convention (:mod:`deeplabv2.model.alignment`). The
probabilities of all passes are brought to the input size and averaged. :class:`InferenceConfig`
holds a mode as a value.

:func:`segment` is the front every command runs (``evaluate``, ``crf-search``, ``predict``,
``serve``, the accuracy of ``bench``'s modes): RGB images -> the network's preprocessing ->
probabilities in a test-time mode -> the optional dense CRF -> labels. How the network itself
runs (device, precision, runtime) is chosen before, by
:func:`deeplabv2.deploy.runtime.prepare_network`.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields

import torch
from torch.nn import functional as F

from ..model.alignment import get_alignment, window_starts
from ..model.msc import MSC, check_scales
from ..precision import autocast_context

MODES = ("whole", "sliding")
WINDOW_FUSES = ("probs", "logits")


@torch.no_grad()
def predict_probs(model, images: torch.Tensor, *, amp: str = "none",
                  channels_last: bool = False) -> torch.Tensor:
    """Whole-image inference: ``(N, 3, H, W)`` preprocessed input -> ``(N, C, H, W)`` float32
    softmax probabilities at the input size (scores upsampled bilinearly before the softmax)."""
    return F.softmax(_logits(model, images, amp, channels_last), dim=1)


def _logits(model, images: torch.Tensor, amp: str, channels_last: bool) -> torch.Tensor:
    """The model's float32 scores at the input size, in ``amp`` and the memory format asked."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_context(images.device, amp):
        return model(images).float()


# -- argument checks ----------------------------------------------------------------------------
def _pair(value, name: str) -> tuple[int, int] | None:
    """``None``, an int or ``(h, w)`` -> ``None`` or a pair of positive ints."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, (int, float)) or int(v) != v or v < 1
                             for v in pair):
        raise ValueError(f"{name} must be a positive int or [height, width], got {value!r}")
    return int(pair[0]), int(pair[1])


def _window(mode: str, crop_size, stride) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Checked ``(crop_size, stride)``; the stride defaults to 2/3 of the crop (513 -> 342)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    crop, step = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    if mode == "sliding" and crop is None:
        raise ValueError("mode='sliding' needs crop_size (e.g. 513 or [513, 513])")
    if crop is not None and step is None:
        step = (max(1, 2 * crop[0] // 3), max(1, 2 * crop[1] // 3))
    if crop is not None and (step[0] > crop[0] or step[1] > crop[1]):
        raise ValueError(f"stride {list(step)} is larger than crop_size {list(crop)}: the "
                         f"windows would leave pixels unseen")
    return crop, step


# -- the passes ---------------------------------------------------------------------------------
def _sliding_probs(model, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
                   amp: str, channels_last: bool, fuse: str = "probs") -> torch.Tensor:
    """Window-averaged ``(N, C, H, W)`` probabilities of one preprocessed ``(N, 3, H, W)``.

    The input is padded at the bottom/right with zeros to at least one window: after
    preprocessing zero is the mean pixel, the value the network saw as "nothing" in training.
    Each window's probabilities (``fuse="probs"``) or float32 scores (``"logits"``, then one
    softmax of the average) are added into a sum and a count map, whose ratio is returned with
    the padding cropped off.
    """
    n, _, height, width = x.shape
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    padded_h, padded_w = x.shape[-2:]
    total = None
    count = torch.zeros(1, 1, padded_h, padded_w, device=x.device)
    for top in window_starts(padded_h, crop[0], stride[0]):
        for left in window_starts(padded_w, crop[1], stride[1]):
            window = x[:, :, top:top + crop[0], left:left + crop[1]]
            out = _logits(model, window, amp, channels_last)
            if fuse == "probs":
                out = F.softmax(out, dim=1)
            if total is None:
                total = torch.zeros(n, out.shape[1], padded_h, padded_w, device=x.device)
            total[:, :, top:top + crop[0], left:left + crop[1]] += out
            count[:, :, top:top + crop[0], left:left + crop[1]] += 1
    mean = (total / count)[:, :, :height, :width]
    return F.softmax(mean, dim=1) if fuse == "logits" else mean


def _check_fuse(window_fuse) -> None:
    if window_fuse not in WINDOW_FUSES:
        raise ValueError(f"window_fuse must be one of {', '.join(WINDOW_FUSES)}; got "
                         f"{window_fuse!r}")


def _alignment(model):
    return get_alignment(getattr(model, "alignment", None))


def msc_model(model, scales):
    """``model`` wrapped for the paper's test-time MSC (eval mode): scores of every scale fused
    by max, then upsampled."""
    return MSC(model, scales).eval()


@torch.no_grad()
def infer(model, x: torch.Tensor, *, mode: str = "whole", msc_scales=None, avg_scales=(1.0,),
          flip: bool = False, crop_size=None, stride=None, window_fuse: str = "probs",
          amp: str = "none", channels_last: bool = False) -> torch.Tensor:
    """Class probabilities of a preprocessed ``(N, 3, H, W)`` batch: ``(N, C, H, W)`` float32.

    ``mode``: ``"whole"`` (one pass) or ``"sliding"`` (``crop_size`` windows every ``stride``
    pixels, an int or ``[height, width]`` each; ``stride`` defaults to 2/3 of the crop and must
    not exceed it; ``crop_size``/``stride`` are not used by ``"whole"``; ``window_fuse``: what
    overlapping windows average, ``"probs"`` or ``"logits"``). ``msc_scales``: every
    pass runs the paper's MSC (the scores of each scale fused by max; None or ``[]``: off).
    ``avg_scales``: the input is resized by each scale, run in ``mode``, and its probabilities
    resized back to ``H x W`` and averaged (scale 1 is run on ``x`` itself). ``flip``: each scale
    is also run mirrored left-right and the result mirrored back. All passes are averaged with
    equal weight. The model is called as given: put it in eval mode first.
    """
    crop, step = _window(mode, crop_size, stride)
    _check_fuse(window_fuse)
    avg_scales = check_scales(avg_scales)
    align = _alignment(model)
    if msc_scales:
        model = msc_model(model, msc_scales)
    height, width = x.shape[-2:]
    total = None
    passes = 0
    for scale in avg_scales:
        xs = align.rescale(x, scale)
        for mirrored in ((False, True) if flip else (False,)):
            xi = xs.flip(-1) if mirrored else xs
            if mode == "sliding":
                probs = _sliding_probs(model, xi, crop, step, amp, channels_last, window_fuse)
            else:
                probs = predict_probs(model, xi, amp=amp, channels_last=channels_last)
            if mirrored:
                probs = probs.flip(-1)
            probs = align.resize(probs, (height, width))
            total = probs if total is None else total + probs
            passes += 1
    return total if passes == 1 else total / passes


@dataclass(frozen=True)
class InferenceConfig:
    """A test-time mode of :func:`infer` as a value; ``config(model, x)`` runs it (``(N, C, H,
    W)`` probabilities), and :func:`segment` takes it as its ``settings``.

    ``InferenceConfig()`` is whole-image, single-scale inference; ``InferenceConfig(
    msc_scales=(1, 0.75, 0.5))`` the paper's test-time MSC.
    """

    mode: str = "whole"
    msc_scales: tuple[float, ...] | None = None
    avg_scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    window_fuse: str = "probs"

    def __post_init__(self):
        crop, step = _window(self.mode, self.crop_size, self.stride)
        _check_fuse(self.window_fuse)
        object.__setattr__(self, "avg_scales", check_scales(self.avg_scales))
        object.__setattr__(self, "msc_scales",
                           check_scales(self.msc_scales) if self.msc_scales else None)
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "stride", step)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: dict | None) -> "InferenceConfig":
        """From plain values (e.g. a config's ``eval`` section restricted to :meth:`keys`)."""
        d = dict(d or {})
        if "scales" in d:
            raise ValueError("'scales' is now 'avg_scales' (probabilities averaged); the "
                             "paper's multi-scale inputs with max fusion are 'msc_scales'")
        unknown = set(d) - set(cls.keys())
        if unknown:
            raise ValueError(f"unknown inference keys {sorted(unknown)}; valid: "
                             f"{', '.join(cls.keys())}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``sliding 513x513 / 342x342, scales 0.5,1, flip``."""
        text = "whole image" if self.mode == "whole" else (
            f"sliding {self.crop_size[0]}x{self.crop_size[1]} / "
            f"{self.stride[0]}x{self.stride[1]}"
            + (", window logits averaged" if self.window_fuse == "logits" else ""))
        if self.msc_scales:
            text += ", MSC max-fused " + ",".join(f"{s:g}" for s in self.msc_scales)
        if self.avg_scales != (1.0,):
            text += ", averaged scales " + ",".join(f"{s:g}" for s in self.avg_scales)
        return text + (", flip" if self.flip else "")

    def __call__(self, model, x: torch.Tensor, *, amp: str = "none",
                 channels_last: bool = False) -> torch.Tensor:
        return infer(model, x, mode=self.mode, msc_scales=self.msc_scales,
                     avg_scales=self.avg_scales, flip=self.flip,
                     crop_size=self.crop_size, stride=self.stride,
                     window_fuse=self.window_fuse, amp=amp,
                     channels_last=channels_last)


@dataclass(frozen=True)
class Segmentation:
    """What :func:`segment` found for a batch: ``probs`` ``(N, C, H, W)`` float32, the dense
    CRF's where one ran, else the network's; ``network_probs`` the network's (before the CRF;
    the same tensor without one); ``labels`` ``(N, H, W)`` their argmax."""

    probs: torch.Tensor
    network_probs: torch.Tensor

    @functools.cached_property
    def labels(self) -> torch.Tensor:
        return self.probs.argmax(1)

    def refined(self, crf, rgb) -> "Segmentation":
        """These probabilities refined by ``crf`` (a :class:`deeplabv2.inference.crf.DenseCRF`;
        None: unchanged) with the images' ``(N, H, W, 3)`` uint8 pixels ``rgb``."""
        if crf is None:
            return self
        rgb = torch.as_tensor(rgb).to(self.network_probs.device)
        return Segmentation(crf(self.network_probs, rgb), self.network_probs)


@torch.no_grad()
def segment(net, images, settings: InferenceConfig | None = None, *, device=None,
            amp: str = "none", channels_last: bool = False, crf=None) -> Segmentation:
    """Segment a batch of RGB ``uint8`` ``(N, H, W, 3)`` images (NumPy or tensor): ``net``'s
    preprocessing, class probabilities in the test-time mode ``settings`` (an
    :class:`InferenceConfig`; default whole image) on ``device`` (default: the images'),
    then, with ``crf``, the dense CRF on those probabilities and the images' pixels.

    ``net`` is any network here (a model, an optimized copy, another runtime, an
    :class:`deeplabv2.inference.ensemble.Ensemble`), called as given: eval mode first.
    ``amp``/``channels_last`` run it under autocast / channels-last (an eager network in
    reduced precision). Returns a :class:`Segmentation`.
    """
    x = net.preprocess(images)
    if device is not None:
        x = x.to(device)
    probs = (settings or InferenceConfig())(net, x, amp=amp, channels_last=channels_last)
    result = Segmentation(probs, probs)
    if crf is None:
        return result
    rgb = torch.as_tensor(images)
    return result.refined(crf, rgb[None] if rgb.dim() == 3 else rgb)

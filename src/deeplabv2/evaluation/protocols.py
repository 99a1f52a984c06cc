"""Named evaluation protocols: each adaptation paper's released evaluation script as a value.

The domain-adaptation papers do not evaluate Cityscapes val alike, and a protocol changes the
mIoU by a point or more, so a number is only comparable to a paper's under that paper's steps.
Each :class:`Protocol` below writes out one released script (file names cited per protocol):

1. the RGB ``uint8`` image is resized with PIL ``Image.resize`` to ``image_size`` with
   ``image_filter`` (PIL's bicubic/bilinear, which antialias when shrinking);
2. the network's preprocessing (ours: DeepLab's BGR mean subtraction, as all four scripts do)
   and one forward pass giving the stride-8 scores (no test-time scales, flip or CRF);
3. ``upsample="scores"``: the stride-8 scores (logits) are resized bilinearly to
   ``label_size`` with ``align_corners`` (``nn.Upsample`` of PyTorch >= 0.4 with
   ``align_corners=True``, as every script sets it), then argmax; ``upsample="probs"``: their
   softmax is resized instead (FDA). This is :meth:`deeplabv2.model.alignment.Alignment.resize`
   (corners aligned: the ``"caffe"`` alignment's resize), straight from the stride-8 map to
   the labels, not the model's own x8 upsampling to its input;
4. the labels are resized with PIL nearest to ``label_size`` (the identity for Cityscapes'
   1024x2048 labels, except DACS, which scores at 512x1024);
5. one confusion matrix over the split; ``class_subsets`` adds the mIoU over subsets of the
   network's classes (FDA prints mIoU over 16 and 13 of its 19 classes).

An ensemble (:class:`deeplabv2.inference.ensemble.Ensemble`) fuses where the script does:
``ensemble="probs"`` averages the members' stride-8 softmax before the upsampling (FDA's
``evaluation_multi.py``); ``ensemble="scores"`` averages their stride-8 logits, which, the
upsampling being linear, is the equal-weight sum of upsampled logits of ADVENT's
``eval_UDA.py`` (``cfg.TEST.MODEL_WEIGHT``) under the same argmax.

``none`` is this project's own front (:func:`deeplabv2.inference.front.segment`, with the
config's ``eval`` test-time mode and the model's alignment convention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ..data.cityscapes_labels import SYNTHIA13_TRAIN_IDS, SYNTHIA16_TRAIN_IDS
from ..model.alignment import get_alignment

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
           # OpenCV's INTER_LINEAR (mmcv.imresize's default): half-pixel bilinear without
           # antialiasing, rounded half up to uint8 (see _cv2_bilinear)
           "cv2_bilinear": None}
UPSAMPLE = ("scores", "probs")


@dataclass(frozen=True)
class Protocol:
    """One released evaluation (see the module docstring). Sizes are ``(height, width)``;
    ``image_size``/``label_size`` None keep the size as loaded."""

    name: str
    image_size: tuple[int, int] | None
    image_filter: str = "bicubic"
    label_size: tuple[int, int] | None = None
    label_filter: str = "nearest"
    align_corners: bool = True
    upsample: str = "scores"
    ensemble: str = "scores"
    class_subsets: dict = field(default_factory=dict)  # {name: 19-class train ids}
    source: str = ""  # the released files it follows
    # mmseg: the logits are first resized to the network's input (encode_decode), then to the
    # labels (whole_inference's rescale), both bilinear with align_corners
    via_input: bool = False

    def __post_init__(self):
        for key in ("image_filter", "label_filter"):
            if getattr(self, key) not in FILTERS:
                raise ValueError(f"protocol {self.name}: {key} must be one of "
                                 f"{', '.join(FILTERS)}, got {getattr(self, key)!r}")
        for key in ("upsample", "ensemble"):
            if getattr(self, key) not in UPSAMPLE:
                raise ValueError(f"protocol {self.name}: {key} must be one of "
                                 f"{', '.join(UPSAMPLE)}, got {getattr(self, key)!r}")
        for key in ("image_size", "label_size"):
            size = getattr(self, key)
            if size is not None:
                size = tuple(int(s) for s in size)
                if len(size) != 2 or min(size) < 1:
                    raise ValueError(f"protocol {self.name}: {key} must be [height, width], "
                                     f"got {getattr(self, key)!r}")
                object.__setattr__(self, key, size)

    def with_sizes(self, image_size=None, label_size=None) -> "Protocol":
        """This protocol at other sizes (tests, other datasets); None keeps a size."""
        return replace(self, image_size=image_size or self.image_size,
                       label_size=label_size or self.label_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("image_size", "label_size"):
            d[key] = None if d[key] is None else list(d[key])
        d["class_subsets"] = {k: list(v) for k, v in self.class_subsets.items()}
        return d

    def describe(self) -> str:
        """One line for logs and reports."""
        def size(s):
            return "as loaded" if s is None else f"{s[1]}x{s[0]}"
        return (f"{self.name} protocol: image {self.image_filter} to {size(self.image_size)}, "
                f"stride-8 {self.upsample} upsampled (align_corners={self.align_corners}) to "
                f"labels {size(self.label_size)}")

    # -- the steps ----------------------------------------------------------------------------
    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> the network's input, resized by PIL."""
        return _pil_resize(image, self.image_size, self.image_filter)

    def resize_label(self, label: np.ndarray) -> np.ndarray:
        return _pil_resize(label, self.label_size, self.label_filter)

    @torch.no_grad()
    def predict(self, net, image: np.ndarray, label_size, *, device=None, amp: str = "none",
                channels_last: bool = False) -> torch.Tensor:
        """Class indices ``(label_size)`` of one RGB ``uint8`` image by this protocol
        (``net``: a model or an :class:`~deeplabv2.inference.ensemble.Ensemble`, eval mode)."""
        from ..precision import autocast_context
        x = net.preprocess(self.resize_image(image)[None])
        if device is not None:
            x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(x.device, amp):
            scores = self._stride8(net, x)
        if self.upsample == "probs":
            scores = F.softmax(scores, dim=1)
        # Alignment.resize: bilinear F.interpolate to a size, corners aligned for "caffe"
        resize = get_alignment("caffe" if self.align_corners else "pytorch").resize
        if self.via_input:
            scores = resize(scores, x.shape[-2:])
        return resize(scores, label_size).argmax(1)[0]

    def _stride8(self, net, x) -> torch.Tensor:
        """Stride-8 scores of ``x``; an ensemble is fused as this protocol's script fuses it,
        with the ensemble's weights: ``"scores"`` the weighted sum of the members' logits
        (ADVENT's ``MODEL_WEIGHT``), ``"probs"`` the log of their weighted softmax average
        (FDA), whatever ``fuse`` the ensemble was built with."""
        if getattr(net, "members", None) is None:
            return net(x, upsample=False).float()
        return net(x, upsample=False, fuse="logits" if self.ensemble == "scores" else "probs")

    def subset_mious(self, results: dict, num_classes: int) -> dict:
        """``miou_<name>`` for each of ``class_subsets`` (on a 19-class network); the mean
        over the subset as the released script takes it (``np.mean``: a class absent from
        prediction and labels makes it NaN)."""
        if num_classes != 19:
            return results
        for name, ids in self.class_subsets.items():
            values = [results["iou"][i] for i in ids]
            results[f"miou_{name}"] = float(np.mean(values))
        return results


def _pil_resize(array: np.ndarray, size, filter_name: str) -> np.ndarray:
    if size is None or tuple(array.shape[:2]) == tuple(size):
        return array
    if array.dtype != np.uint8:
        raise ValueError(f"PIL resizing needs uint8 arrays, got {array.dtype}")
    if filter_name == "cv2_bilinear":
        return _cv2_bilinear(array, size)
    img = Image.fromarray(array)
    return np.array(img.resize((size[1], size[0]), FILTERS[filter_name]))


def _cv2_bilinear(image: np.ndarray, size) -> np.ndarray:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` of a uint8 image: each
    output pixel samples the input at ``(i + 0.5) * scale - 0.5`` bilinearly, with no
    antialiasing (PyTorch's ``align_corners=False`` bilinear, the same sampling), rounded half
    up. OpenCV computes in 11-bit fixed point: exact for Cityscapes' 0.5 scale (weights 1/2),
    possibly one grey level apart at other scales."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    x = x.permute(2, 0, 1)[None] if x.dim() == 3 else x[None, None]
    y = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    y = torch.floor(y + 0.5).clamp(0, 255).to(torch.uint8)
    return (y[0].permute(1, 2, 0) if image.ndim == 3 else y[0, 0]).numpy()


CITYSCAPES_LABELS = (1024, 2048)

#: the released protocols (sizes ``(height, width)``)
PROTOCOLS = {
    # evaluate_cityscapes.py: cityscapesDataSet(crop_size=(1024, 512)) -> Image.BICUBIC
    # (dataset/cityscapes_dataset.py), nn.Upsample((1024, 2048), align_corners=True) on the
    # main output's logits, argmax; compute_iou.py on the full-size gtFine labels
    "adaptsegnet": Protocol(
        "adaptsegnet", image_size=(512, 1024), image_filter="bicubic",
        label_size=CITYSCAPES_LABELS, align_corners=True, upsample="scores",
        source="wasidennis/AdaptSegNet evaluate_cityscapes.py, dataset/cityscapes_dataset.py, "
               "compute_iou.py"),
    # eval_UDA.py: INPUT_SIZE_TARGET (1024, 512) with Image.BICUBIC, labels
    # OUTPUT_SIZE_TARGET (2048, 1024) with Image.NEAREST (base_dataset.py), the main output's
    # logits nn.Upsample(align_corners=True), weighted sum over models, argmax
    "advent": Protocol(
        "advent", image_size=(512, 1024), image_filter="bicubic",
        label_size=CITYSCAPES_LABELS, align_corners=True, upsample="scores",
        ensemble="scores",
        source="valeoai/ADVENT advent/domain_adaptation/eval_UDA.py, "
               "advent/dataset/base_dataset.py, advent/domain_adaptation/config.py"),
    # evaluation_multi.py: cs_size_test (1344, 576) with Image.BICUBIC (data/__init__.py,
    # data/cityscapes_dataset.py), each model's stride-8 softmax averaged, interpolate to
    # (1024, 2048) align_corners=True, argmax; mIoU19/16/13 from the 19x19 histogram
    "fda": Protocol(
        "fda", image_size=(576, 1344), image_filter="bicubic",
        label_size=CITYSCAPES_LABELS, align_corners=True, upsample="probs", ensemble="probs",
        class_subsets={"16": SYNTHIA16_TRAIN_IDS, "13": SYNTHIA13_TRAIN_IDS},
        source="YanchaoYang/FDA evaluation_multi.py, data/__init__.py, "
               "data/cityscapes_dataset.py"),
    # evaluateUDA.py: cityscapesLoader(img_size=(512, 1024)): scipy.misc.imresize (PIL
    # bilinear) of the image, labels imresize "nearest" (data/cityscapes_loader.py);
    # nn.Upsample((512, 1024), align_corners=True) on the logits, argmax, scored at 512x1024
    "dacs": Protocol(
        "dacs", image_size=(512, 1024), image_filter="bilinear",
        label_size=(512, 1024), align_corners=True, upsample="scores",
        source="vikolss/DACS evaluateUDA.py, data/cityscapes_loader.py"),
    # DAFormer/HRDA/MIC's DeepLab v2 through mmseg: test_pipeline Resize(img_scale (1024, 512),
    # keep_ratio) by mmcv.imresize (cv2 INTER_LINEAR), EncoderDecoder.encode_decode resizes the
    # logits to the input, whole_inference to the original 2048x1024 (align_corners False, the
    # DLV2Head's), argmax against the full-size labels
    "mmseg": Protocol(
        "mmseg", image_size=(512, 1024), image_filter="cv2_bilinear",
        label_size=CITYSCAPES_LABELS, align_corners=False, upsample="scores",
        ensemble="scores", via_input=True,
        source="lhoyer/DAFormer configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py "
               "(test_pipeline), mmseg/models/segmentors/encoder_decoder.py"),
}

NAMES = ("none", *PROTOCOLS)


def get_protocol(name) -> Protocol | None:
    """A protocol by name (None for ``"none"``/None: this project's own front); an unknown
    name is a ``ValueError`` listing the valid ones."""
    if name is None or isinstance(name, Protocol):
        return name if isinstance(name, Protocol) else None
    if name == "none":
        return None
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; valid: {', '.join(NAMES)}")
    return PROTOCOLS[name]


def describe(protocol: Protocol | None) -> dict:
    """What evaluation outputs record: ``{"name": "none"}`` or the protocol's settings."""
    return {"name": "none"} if protocol is None else protocol.to_dict()

"""HRDA on DeepLab v2: a low-resolution context crop, a high-resolution detail crop inside it,
and a learned class-wise scale attention that fuses the two predictions.

Written from the released code (lhoyer/HRDA), not copied from it:

* :func:`detail_crop_box`: ``get_crop_bbox`` of mmseg/models/segmentors/hrda_encoder_decoder.py:
  the detail crop's top-left corner is drawn uniformly from ``randint(0, (margin + 1) //
  divisible) * divisible`` per side, ``margin = size - crop`` (numpy's ``randint`` excludes the
  upper end, so with 1024/512/8 the offsets are 0, 8, ..., 504: the last position 512 is never
  drawn, as released). ``crop_coord_divisible = 8`` in experiments.py for every HRDA row. Here
  the draw comes from a ``torch.Generator``, so the box is a pure function of the generator's
  state. A side the detail crop fills (a crop as high as the context crop) has offset 0 there
  (the released ``randint(0, 0)`` would fail), still one draw per side.
* :func:`scale_box`: ``scale_box`` of mmseg/models/decode_heads/hrda_head.py (integer
  truncation of every coordinate divided by the factor).
* :func:`fuse_scales`: ``HRDAHead.forward``: the attention ``a = sigmoid(attention head(context
  features))`` is zeroed outside the detail box on the context grid (box / (output stride /
  context scale), truncated), the context scores become ``(1 - a) * context``, both are
  upsampled bilinearly (``align_corners=False``, mmseg ``resize``) by ``1 / context scale`` to
  the detail grid, and ``fused = a_up * detail_inserted + ((1 - a) * context)_up`` where
  ``detail_inserted`` is the detail scores placed at box / output stride, zero elsewhere.
* :class:`HRDA`: ``HRDAEncoderDecoder`` + ``HRDAHead`` with ``single_scale_head='DLV2Head'``:
  one network (backbone and ASPP head) runs on both crops, and a second ASPP head of the same
  form (``scale_attention``, built from the same head config, ``num_classes`` outputs since
  ``attention_classwise=True``) reads the context features. Scales ``[1, 0.5]``, detail crop
  512, ``hr_loss_weight`` 0.1, ``lr_loss_weight`` 0 when the detail crop is smaller than the
  context crop (experiments.py).
* :func:`hrda_losses`: ``HRDAHead.losses``: the fused scores against the whole crop's labels
  weighted ``1 - hr_loss_weight`` (0.9), the detail scores against the labels cropped to the
  detail box weighted ``hr_loss_weight`` (0.1); each is mmseg's ``BaseDecodeHead.losses``: the
  scores resized bilinearly to the label size, per-pixel cross-entropy (255 ignored) times the
  optional per-pixel weight, averaged over all pixels.
* inference (:meth:`HRDA.forward` in eval mode): ``HRDAEncoderDecoder.encode_decode`` with
  ``hr_slide_inference=True``: the context is the whole window at scale 0.5, the detail scores
  come from overlapping detail-size windows (stride half the detail crop,
  ``extract_slide_feat``) at full resolution averaged on the detail grid, and the attention is
  not masked. The outer 1024-window / 512-stride sliding of the test protocol is the inference
  front's ``mode: sliding`` (:mod:`deeplabv2.inference.front`) around this forward.
  The teacher's pseudo-labels of a target training crop are this same forward on the whole
  crop (uda/dacs.py ``generate_pseudo_label`` -> ``encode_decode``).
  Any input size: the forward needs ``H`` and ``W`` multiples of 16 (8 / context scale: the
  context grid at scale 0.5). The release never meets another size (its Cityscapes test
  pipeline resizes every image to 2048x1024, and ``mode: slide`` windows are 1024x1024; at
  other sizes its context and detail grids differ by a cell and the fusion fails), so here
  :meth:`HRDA.predict` pads the input at the bottom/right with zeros (the mean pixel after
  preprocessing: the front's sliding-window and the training crops' padding) to the next
  multiple, and crops the logits back to the input: a multiple-of-16 input is run as is.
* DAFormer's feature distance on HRDA (``feature_scale = 0.5`` in experiments.py): on the
  context pass's backbone features (``forward_train``'s ``"context_features"``), against the
  frozen ImageNet backbone on the same half-size image, the crop's labels downscaled by
  ``crop width // feature width`` (16) (uda/dacs.py ``calc_feat_dist``).

Training: :class:`deeplabv2.adapt.methods.HRDA` (``adapt.method: hrda``) wraps the run's
network in :class:`HRDA` and calls ``net(x, hrda_train=True)`` (:meth:`HRDA.forward_train`
through DDP's forward); checkpoints record the wrapper's settings under the model config's
``hrda`` key, so :func:`deeplabv2.weights.load_model` rebuilds it.

Grid convention. mmseg's ResNet gives ``H / 8`` cells for an ``H`` input; this project's caffe
layout gives ``H // 8 + 1`` (cell ``i`` on pixel ``8 i``). The score maps are trimmed to their
first ``H / 8`` cells, the cells on pixels ``0, 8, ..., H - 8``, so both layouts share one grid
and the crop boxes (multiples of 8) land on cell boundaries. Every resize (the context input,
the fusion, the scores to pixels, the scores to the label size in the loss) is the released
bilinear ``align_corners=False``, whatever the wrapped network's own alignment.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from .alignment import window_starts
from .aspp import ASPP

IGNORE_INDEX = 255
#: experiments.py: ``scales = [1, 0.5]`` (detail at full resolution, context at half)
CONTEXT_SCALE = 0.5
#: experiments.py ``hrda1-512-0.1``: detail crop 512, detail loss weight 0.1
DETAIL_CROP = 512
DETAIL_LOSS_WEIGHT = 0.1
#: experiments.py: ``crop_coord_divisible = 8``
CROP_DIVISIBLE = 8


def _check_pair(value, name):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair


def detail_crop_box(height: int, width: int, crop, divisible: int = CROP_DIVISIBLE,
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """``(y1, y2, x1, x2)`` of a ``crop`` (int or ``(h, w)``) detail crop inside a
    ``height x width`` image, the corner on multiples of ``divisible``; the whole image when it
    has the crop's size. One ``torch.randint`` per side (rows first) from ``generator``."""
    ch, cw = _check_pair(crop, "detail crop")
    if not isinstance(divisible, int) or divisible < 1:
        raise ValueError(f"crop divisible must be a positive int, got {divisible!r}")
    if ch > height or cw > width:
        raise ValueError(f"detail crop {ch}x{cw} is larger than the context crop "
                         f"{height}x{width}")
    if (ch, cw) == (height, width):
        return 0, height, 0, width
    # A side the crop fills has the one position 0 (numpy's randint(0, 0) would fail there);
    # still one draw per side, so that the draws that follow do not shift.
    n_h = (height - ch + 1) // divisible if ch < height else 1
    n_w = (width - cw + 1) // divisible if cw < width else 1
    if n_h < 1 or n_w < 1:
        raise ValueError(f"no detail crop position on the {divisible}-pixel grid: context "
                         f"{height}x{width}, detail {ch}x{cw}")
    top = int(torch.randint(0, n_h, (1,), generator=generator)) * divisible
    left = int(torch.randint(0, n_w, (1,), generator=generator)) * divisible
    return top, top + ch, left, left + cw


def scale_box(box, factor: float) -> tuple[int, int, int, int]:
    """Every coordinate divided by ``factor`` and truncated (hrda_head.py ``scale_box``)."""
    return tuple(int(v / factor) for v in box)


def crop_box(x: torch.Tensor, box) -> torch.Tensor:
    """The ``(y1, y2, x1, x2)`` region of the last two dimensions."""
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def fuse_scales(context: torch.Tensor, detail: torch.Tensor, attention: torch.Tensor,
                box=None, output_stride: int = 8, context_scale: float = CONTEXT_SCALE
                ) -> torch.Tensor:
    """Fused scores on the detail (full-resolution) grid.

    ``context``: ``(N, C, h, w)`` scores of the context crop (the crop at ``context_scale``);
    ``attention``: ``(N, C or 1, h, w)`` attention in [0, 1] on the same grid; ``detail``: the
    detail crop's scores, ``box``: the detail crop in full-resolution pixels of the context crop
    (``None``: the detail covers the whole crop, as in inference). The output grid is
    ``(h / context_scale, w / context_scale)``.
    """
    if context.dim() != 4 or attention.dim() != 4 or detail.dim() != 4:
        raise ValueError("context, detail and attention must be (N, C, h, w) tensors")
    if attention.shape[-2:] != context.shape[-2:]:
        raise ValueError(f"attention grid {tuple(attention.shape[-2:])} differs from the "
                         f"context grid {tuple(context.shape[-2:])}")
    h, w = context.shape[-2:]
    out_size = (int(h / context_scale), int(w / context_scale))
    if box is not None:
        mask = context.new_zeros(context.shape[0], 1, h, w)
        y1, y2, x1, x2 = scale_box(box, output_stride / context_scale)
        mask[:, :, y1:y2, x1:x2] = 1
        attention = attention * mask
    low = _resize((1 - attention) * context, out_size)
    attention = _resize(attention, out_size)
    if box is None:
        if detail.shape[-2:] != tuple(out_size):
            raise ValueError(f"detail grid {tuple(detail.shape[-2:])} differs from the fused "
                             f"grid {out_size}")
        inserted = detail
    else:
        y1, y2, x1, x2 = scale_box(box, output_stride)
        if detail.shape[-2:] != (y2 - y1, x2 - x1) or y2 > out_size[0] or x2 > out_size[1]:
            raise ValueError(f"detail grid {tuple(detail.shape[-2:])} does not fill the box "
                             f"{(y1, y2, x1, x2)} of the fused grid {out_size}")
        inserted = F.pad(detail, (x1, out_size[1] - x2, y1, out_size[0] - y2))
    return attention * inserted + low


def weighted_ce(scores: torch.Tensor, labels: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """mmseg ``BaseDecodeHead.losses``: scores resized bilinearly (``align_corners=False``) to
    the ``(N, H, W)`` labels, per-pixel cross-entropy (255: zero), times the per-pixel
    ``weight``, mean over all pixels."""
    scores = _resize(scores, labels.shape[-2:])
    loss = F.cross_entropy(scores.float(), labels.long(), ignore_index=IGNORE_INDEX,
                           reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def hrda_losses(outputs: dict, labels: torch.Tensor, weight: torch.Tensor | None = None,
                detail_weight: float = DETAIL_LOSS_WEIGHT) -> dict:
    """``{"fused": (1 - detail_weight) * CE(fused), "detail": detail_weight * CE(detail on the
    detail box's labels)}`` for one :meth:`HRDA.forward_train` output; ``labels`` ``(N, H, W)``
    of the context crop at full resolution, ``weight`` (optional) of the same shape."""
    if not 0 <= detail_weight < 1:
        raise ValueError(f"hrda detail loss weight must be in [0, 1), got {detail_weight!r}")
    box = outputs["box"]
    losses = {"fused": (1 - detail_weight) * weighted_ce(outputs["fused"], labels, weight)}
    if detail_weight > 0:
        cropped_w = None if weight is None else crop_box(weight, box)
        losses["detail"] = detail_weight * weighted_ce(outputs["detail"], crop_box(labels, box),
                                                       cropped_w)
    return losses


class HRDA(nn.Module):
    """A DeepLab v2 (``network``: backbone + ASPP head) run on a context and a detail crop, with
    a scale-attention ASPP head of the same form as the network's head.

    Training: :meth:`forward_train` on a full-resolution crop (1024x1024). Eval: ``forward(x)``
    returns logits at the input size (context = ``x`` at 0.5, detail by sliding windows), so
    every inference mode of :mod:`deeplabv2.inference.front` runs it unchanged.
    """

    def __init__(self, network: nn.Module, detail_crop=DETAIL_CROP,
                 context_scale: float = CONTEXT_SCALE, divisible: int = CROP_DIVISIBLE):
        super().__init__()
        if not isinstance(network.head, ASPP):
            raise ValueError("HRDA needs a ResNet DeepLab v2 (an ASPP head); got head "
                             f"{type(network.head).__name__}")
        if not 0 < context_scale <= 1:
            raise ValueError(f"hrda context scale must be in (0, 1], got {context_scale!r}")
        self.network = network
        head = network.head
        self.scale_attention = ASPP(head.convs[0].in_channels, head.convs[0].out_channels,
                                    head.atrous_rates, head_mode=head.head_mode)
        self.detail_crop = _check_pair(detail_crop, "hrda detail crop")
        self.context_scale = float(context_scale)
        self.divisible = int(divisible)
        self.output_stride = 8
        for d in self.detail_crop:
            if d % self.output_stride:
                raise ValueError(f"hrda detail crop {d} is not a multiple of the output stride 8")

    #: what the loaders, the weights code and the methods test for (no import of this class)
    is_hrda = True

    # -- facts the rest of the toolkit reads from a model --------------------------------------
    @property
    def num_classes(self) -> int:
        return self.network.num_classes

    @property
    def alignment(self):
        return self.network.alignment

    @alignment.setter
    def alignment(self, value):
        self.network.alignment = value

    @property
    def preprocessing(self):
        return self.network.preprocessing

    @preprocessing.setter
    def preprocessing(self, value):
        self.network.preprocessing = value

    @property
    def layout(self) -> str:
        return self.network.layout

    def hrda_config(self) -> dict:
        """The wrapper's own settings, as :func:`~deeplabv2.model.deeplab.build_model` reads
        them under the model config's ``hrda`` key."""
        return {"detail_crop": list(self.detail_crop), "context_scale": self.context_scale,
                "divisible": self.divisible}

    @property
    def config(self) -> dict:
        """The network's model config plus ``hrda``: what a checkpoint records, so that
        :func:`~deeplabv2.weights.load_model` rebuilds this wrapper."""
        return {**self.network.config, "hrda": self.hrda_config()}

    def preprocess(self, images):
        return self.network.preprocess(images)

    def param_groups(self, lr: float, weight_decay: float = 5e-4,
                     style: str = "deeplab") -> list[dict]:
        """The network's groups (:meth:`DeepLabV2.param_groups`) with the scale-attention head
        in the head's: ``mmseg`` style puts every parameter whose name holds ``head`` at the
        head's lr (HRDA's ``decode_head.scale_attention.*``, so all of it); ``deeplab`` style
        its weights in ``head`` (10x) and biases in ``head_bias`` (20x, no decay), as the ASPP
        classifier's."""
        groups = self.network.param_groups(lr, weight_decay, style=style)
        by_name = {g["name"]: g for g in groups}
        settings = {"head": (10.0, weight_decay), "head_bias": (20.0, 0.0)}
        for p in self.scale_attention.parameters():
            if not p.requires_grad:
                continue
            name = "head" if style == "mmseg" or p.ndim > 1 else "head_bias"
            if name not in by_name:
                mult, wd = settings[name]
                by_name[name] = {"name": name, "params": [], "lr": lr * mult, "lr_mult": mult,
                                 "weight_decay": wd}
                groups.append(by_name[name])
            by_name[name]["params"].append(p)
        return groups

    # -- pieces ---------------------------------------------------------------------------------
    def _grid(self, scores: torch.Tensor, size) -> torch.Tensor:
        """Scores trimmed to the ``size // 8`` cells (caffe layout: one more cell)."""
        h, w = size[0] // self.output_stride, size[1] // self.output_stride
        if scores.shape[-2] < h or scores.shape[-1] < w:
            raise ValueError(f"score grid {tuple(scores.shape[-2:])} smaller than {h}x{w}")
        return scores[..., :h, :w]

    def _scores(self, x: torch.Tensor):
        feats = self.network.backbone(x)
        return feats, self._grid(self.network.head(feats), x.shape[-2:])

    def context_input(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution ``x`` at the context scale (bilinear, ``align_corners=False``,
        as mmseg's ``resize``)."""
        if self.context_scale == 1:
            return x
        size = (int(x.shape[-2] * self.context_scale), int(x.shape[-1] * self.context_scale))
        return _resize(x, size)

    def context(self, x: torch.Tensor, features: bool = False):
        """Context scores and sigmoid attention of the full-resolution ``x`` (and the context
        backbone features with ``features=True``)."""
        small = self.context_input(x)
        feats, scores = self._scores(small)
        attention = torch.sigmoid(self._grid(self.scale_attention(feats), small.shape[-2:]))
        return (scores, attention, feats) if features else (scores, attention)

    def forward_train(self, x: torch.Tensor, generator: torch.Generator | None = None,
                      box=None) -> dict:
        """``{"fused", "context", "detail", "attention", "box"}`` for a full-resolution crop
        ``x``; the detail box is drawn from ``generator`` unless given."""
        height, width = x.shape[-2:]
        if height % self.output_stride or width % self.output_stride:
            raise ValueError(f"hrda crop {height}x{width} is not a multiple of 8")
        if box is None:
            box = detail_crop_box(height, width, self.detail_crop, self.divisible, generator)
        context, attention, feats = self.context(x, features=True)
        _, detail = self._scores(crop_box(x, box))
        fused = fuse_scales(context, detail, attention, box, self.output_stride,
                            self.context_scale)
        return {"fused": fused, "context": context, "detail": detail, "attention": attention,
                "box": tuple(box), "context_features": feats}

    def detail_sliding(self, x: torch.Tensor) -> torch.Tensor:
        """Detail scores of the whole ``x`` on its ``/ 8`` grid: detail-crop windows every half
        crop (``extract_slide_feat`` with ``hr_slide_overlapping``), averaged per cell."""

        height, width = x.shape[-2:]
        ch, cw = self.detail_crop
        ch, cw = min(ch, height), min(cw, width)
        s = self.output_stride
        total = count = None
        for top in window_starts(height, ch, max(ch // 2, 1)):
            for left in window_starts(width, cw, max(cw // 2, 1)):
                _, scores = self._scores(x[..., top:top + ch, left:left + cw])
                if total is None:
                    total = scores.new_zeros(*scores.shape[:2], height // s, width // s)
                    count = scores.new_zeros(1, 1, height // s, width // s)
                total[..., top // s:top // s + ch // s, left // s:left // s + cw // s] += scores
                count[..., top // s:top // s + ch // s, left // s:left // s + cw // s] += 1
        return total / count

    def fused_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Inference scores on the ``/ 8`` grid of ``x`` (attention not masked)."""
        height, width = x.shape[-2:]
        if height % 16 or width % 16:
            raise ValueError(f"hrda inference input {height}x{width} is not a multiple of 16 "
                             "(the context grid at scale 0.5)")
        context, attention = self.context(x)
        return fuse_scales(context, self.detail_sliding(x), attention, None,
                           self.output_stride, self.context_scale)

    @property
    def input_multiple(self) -> int:
        """What :meth:`fused_logits` needs ``H`` and ``W`` to be multiples of: the output
        stride over the context scale, made whole (16 at scale 0.5, 32 at 0.75)."""
        q = Fraction(self.context_scale).limit_denominator(1000).denominator
        return self.output_stride * q

    def predict(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """The inference pass whatever the mode (a teacher predicting with batch statistics
        runs it in train mode) at any size: ``(N, C, H, W)`` fused logits, or with
        ``upsample=False`` the first ``ceil(H / 8) x ceil(W / 8)`` cells of the ``/ 8`` grid.
        An input that is no multiple of :attr:`input_multiple` is padded at the bottom/right
        with zeros (the mean pixel) to one, and the logits (upsampled at the padded size)
        cropped back to ``H x W``."""
        height, width = x.shape[-2:]
        m = self.input_multiple
        pad_h, pad_w = (-height) % m, (-width) % m
        padded = F.pad(x, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else x
        scores = self.fused_logits(padded)
        if not upsample:
            s = self.output_stride
            return scores[..., :math.ceil(height / s), :math.ceil(width / s)] \
                if pad_h or pad_w else scores
        logits = _resize(scores, padded.shape[-2:])
        return logits[..., :height, :width] if pad_h or pad_w else logits

    def forward(self, x: torch.Tensor, upsample: bool = True, *, hrda_train: bool = False,
                box=None, generator: torch.Generator | None = None):
        """Eval mode: :meth:`predict`. Train mode with ``hrda_train=True``:
        :meth:`forward_train` (how the training methods call it, through DDP's forward);
        plain ``model(x)`` in train mode is an error, so that no caller gets the dict by
        mistake."""
        if self.training:
            if hrda_train:
                return self.forward_train(x, generator, box)
            raise RuntimeError("HRDA trains through forward_train(x, generator) (or "
                               "model(x, hrda_train=True)); forward(x) is the inference pass "
                               "(model.eval())")
        return self.predict(x, upsample)

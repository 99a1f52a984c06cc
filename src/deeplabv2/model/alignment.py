"""Where a stride-8 score sits in the image, and how images and score maps are resized.

DeepLab v2 is a Caffe network, and Caffe fixes one geometry (paper Sec. 3-4; the released
``train.prototxt``/``test.prototxt``; Caffe's ``Interp`` layer, ``caffe_cpu_interp2``):

* **score cell ``i`` <-> pixel ``8 i``.** The atrous ResNet's stride-2 layers are centred
  (7x7/2 pad 3, 3x3/2 max-pool pad 1, 1x1/2), so cell ``i`` of the output sees the receptive
  field centred on input pixel ``8 i``; a 321 crop gives 41 cells on pixels 0, 8, ..., 320.
* **label shrink** (``label_shrink``, ``Interp shrink_factor: 8`` on a 8k+1 crop) therefore
  samples the label at pixels ``0, 8, 16, ...``;
* **the x8 upsampling** (``Interp zoom_factor: 8``) maps ``h`` cells onto ``8 (h - 1) + 1``
  pixels with corners aligned: pixel ``p`` reads cell position ``p / 8``;
* **resizing** (MSC's input shrink and the fusion of the 0.75/0.5 score maps, ``Interp``) is
  bilinear with corners aligned (``align_corners=True``), and the scaled input size is
  Caffe's ``(H - 1) / shrink * zoom + 1`` (321 at 0.75 -> 241, at 0.5 -> 161).

Those are the ``"caffe"`` conventions, this project's default and what every checkpoint we
write records. Code written later with ``F.interpolate`` defaults does something else, and a
checkpoint trained with it is only reproduced under its own convention:

* ``"pytorch"`` (kazuto1011/deeplab-pytorch): ``align_corners=False`` everywhere (score cell
  ``i`` read at pixel ``8 i + 3.5``), MSC input sizes rounded down (``scale_factor``), labels
  shrunk by PIL's nearest neighbour (pixel ``floor((i + 0.5) H / h)``).

:func:`get_alignment` turns a name into an :class:`Alignment`; a model carries one as
``model.alignment``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch.nn import functional as F

ALIGNMENTS = ("caffe", "pytorch")
OUTPUT_STRIDE = 8


@dataclass(frozen=True)
class Alignment:
    """One resizing convention (see the module docstring); ``name`` is ``"caffe"`` or
    ``"pytorch"``."""

    name: str = "caffe"

    def __post_init__(self):
        if self.name not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got "
                             f"{self.name!r}")

    @property
    def align_corners(self) -> bool:
        return self.name == "caffe"

    # -- sizes ---------------------------------------------------------------------------------
    def scaled_length(self, length: int, scale: float) -> int:
        """One side of the input resized by ``scale``.

        caffe: ``Interp`` with ``shrink_factor`` d and ``zoom_factor`` n for ``scale = n/d``:
        ``(length - 1) // d * n + 1`` (321 at 0.75 = 3/4 -> 241, at 0.5 -> 161; 513 -> 385, 257).
        pytorch: ``F.interpolate(scale_factor=scale)``: ``floor(length * scale)`` (321 -> 240, 160).
        """
        if scale == 1.0:
            return length
        if self.name == "caffe":
            frac = Fraction(scale).limit_denominator(64)
            return max(1, (length - 1) // frac.denominator * frac.numerator + 1)
        return max(1, math.floor(length * scale + 1e-9))

    def scaled_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        return self.scaled_length(height, scale), self.scaled_length(width, scale)

    # -- resizing ------------------------------------------------------------------------------
    def resize(self, x: torch.Tensor, size) -> torch.Tensor:
        """Bilinear resize of an ``(N, C, H, W)`` image or score map to ``size`` (MSC inputs,
        MSC fusion, probabilities brought back to the input size)."""
        size = tuple(int(s) for s in size)
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def rescale(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """An ``(N, C, H, W)`` input resized by ``scale`` (an MSC branch, a test scale):
        caffe: to :meth:`scaled_size` with corners aligned; pytorch: ``F.interpolate(
        scale_factor=scale, align_corners=False)``, which also samples with the ratio ``scale``
        itself rather than that of the rounded sizes (as kazuto1011's MSC does)."""
        if scale == 1.0:
            return x
        if self.name == "caffe":
            return self.resize(x, self.scaled_size(*x.shape[-2:], scale))
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)

    def upsample(self, scores: torch.Tensor, size, stride: int = OUTPUT_STRIDE) -> torch.Tensor:
        """Stride-``stride`` scores ``(N, C, h, w)`` -> ``(N, C, *size)`` at the input's pixels.

        caffe: pixel ``p`` reads cell position ``p / stride`` bilinearly (cell ``i`` on pixel
        ``stride * i``), clamped to the last cell. Computed as Caffe's ``Interp`` with
        ``zoom_factor: stride`` (``stride * (n - 1) + 1`` pixels for ``n`` cells, corners
        aligned) on the scores with their last row and column repeated once, then cut to
        ``size`` (``size`` may be at most ``stride * h + 1`` by ``stride * w + 1``; the network
        gives ``h = floor(H / stride) + 1``, whose last cell is on pixel ``8 floor(H / 8)``). No branch depends on the sizes, so a traced or exported
        model stays exact at every input size.
        pytorch: ``F.interpolate(size, align_corners=False)``.
        """
        size = tuple(size)  # kept as given: under tracing these are the input's traced sizes
        if self.name != "caffe":
            return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        h, w = scores.shape[-2:]
        extended = F.pad(scores, (0, 1, 0, 1), mode="replicate")
        out = F.interpolate(extended, size=(stride * h + 1, stride * w + 1), mode="bilinear",
                            align_corners=True)
        return out[..., :size[0], :size[1]]

    # -- labels --------------------------------------------------------------------------------
    def label_positions(self, length: int, cells: int, input_length: int | None = None,
                        stride: int = OUTPUT_STRIDE) -> list[int]:
        """The label pixel (along one side of ``length`` pixels) each of ``cells`` score cells
        is trained against.

        caffe: the pixel under the cell's centre. For a network run on the labels' own image
        that is ``stride * i`` (0, 8, 16, ...); for one run on the image resized to
        ``input_length`` (an MSC branch) it is ``stride * i`` mapped back through the
        corner-aligned resize, ``round(stride * i * (length - 1) / (input_length - 1))``.
        Positions past the border are clamped to the last pixel.
        pytorch: PIL's nearest neighbour resize to ``cells``: ``floor((i + 0.5) * length / cells)``.
        """
        if self.name == "caffe":
            ratio = 1.0 if not input_length or input_length == length or input_length < 2 \
                else (length - 1) / (input_length - 1)
            return [min(int(math.floor(stride * i * ratio + 0.5)), length - 1)
                    for i in range(cells)]
        return [min(int(math.floor((i + 0.5) * length / cells)), length - 1)
                for i in range(cells)]

    def shrink_labels(self, labels: torch.Tensor, size, input_size=None,
                      stride: int = OUTPUT_STRIDE) -> torch.Tensor:
        """``(N, H, W)`` integer labels -> ``(N, h, w)`` labels of the score cells (no
        interpolation: each cell takes one pixel's label, see :meth:`label_positions`).
        ``input_size`` is the size of the image the network ran on when it was not the labels'
        own (an MSC branch)."""
        height, width = labels.shape[-2:]
        in_h, in_w = input_size if input_size is not None else (height, width)
        rows = self.label_positions(height, int(size[0]), in_h, stride)
        cols = self.label_positions(width, int(size[1]), in_w, stride)
        rows_t = torch.tensor(rows, device=labels.device)
        cols_t = torch.tensor(cols, device=labels.device)
        return labels.index_select(-2, rows_t).index_select(-1, cols_t)


CAFFE = Alignment("caffe")
PYTORCH = Alignment("pytorch")


def get_alignment(value) -> Alignment:
    """``"caffe"``/``"pytorch"``/an :class:`Alignment`/None (caffe) -> :class:`Alignment`."""
    if value is None:
        return CAFFE
    if isinstance(value, Alignment):
        return value
    return Alignment(str(value))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Offsets of the windows along one side: every ``stride`` pixels, the last one moved back
    to end exactly at the border (``length`` >= ``crop``; 10, 4, 3 -> [0, 3, 6])."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]

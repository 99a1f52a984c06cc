"""Dilated 3x3 convolutions as one undilated Winograd convolution (CPU inference).

A 3x3 convolution with dilation ``d`` (padding ``d``, stride 1) reads, for the output pixel
``(i, j)``, only input pixels congruent to ``(i, j)`` modulo ``d``. It is therefore ``d * d``
independent *undilated* 3x3 convolutions, one per sub-grid ``x[..., a::d, b::d]``: the
"space to batch" of the original DeepLab (``atrous`` in Caffe, Sec. 3.1 of the paper). Each
sub-grid, in a border of zeros one pixel wide (the zeros its own padding would read), goes
through one undilated Winograd convolution, and the outputs are put back in place. Winograd
F(6x6, 3x3) on 8x8 tiles needs 64 multiplications per output tile and channel pair where the
direct convolution needs 324 (the transforms take back part of that). oneDNN, which runs the
direct convolutions, has no Winograd kernel for these CPUs. Two implementations:

* :func:`atrous_conv3x3`: the sub-grids side by side in one image, through NNPACK's kernels
  (AVX2 only);
* :func:`atrous_conv3x3_gemm`: Winograd F(6x6, 3x3) (or F(4x4, 3x3)) written as torch
  operations (Lavin & Gray, 2016): the 64 points of every 8x8 input tile are transformed,
  multiplied by the transformed weights in 64 batched matrix products (torch's GEMM, AVX-512
  where the CPU has it) and transformed back; the transforms are small matrix products over
  the tiles, read in place.

Only fp32, CPU, stride 1, groups 1 and ``padding == dilation`` ("same" size) are handled:
:func:`winograd_eligible` says which convolutions qualify, and :func:`use_atrous_winograd`
replaces those in a model. The results agree with ``F.conv2d`` to about 1e-5 relative
(Winograd's rounding; tests), and the layout of the input (NCHW or channels-last) is kept.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import nn


def nnpack_available() -> bool:
    """Whether this torch has NNPACK (the call also initialises it, which NNPACK needs)."""
    try:
        return bool(torch.backends.nnpack.is_available())
    except (AttributeError, RuntimeError):
        return False


def winograd_eligible(conv: nn.Module, min_channels: int = 128) -> bool:
    """A dilated 3x3 fp32 convolution of stride 1 with "same" padding and enough channels
    (below ``min_channels`` the direct oneDNN kernels win on their own)."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.dilation[0] == conv.dilation[1] > 1
            and conv.padding == conv.dilation and conv.padding_mode == "zeros"
            and conv.weight.dtype == torch.float32
            and min(conv.in_channels, conv.out_channels) >= min_channels)


BACKENDS = ("nnpack", "gemm")
#: the smallest map (height x width) each backend is used on by default: NNPACK's 8x8 tiles
#: do not pay below 64x64 on AVX2; the GEMM form beat the direct convolution of layer3 at
#: 33x33 and 41x41 on an AVX-512 Xeon
MIN_PIXELS = {"nnpack": 64 * 64, "gemm": 32 * 32}
#: the GEMM form's default output tile: on ResNet-101 F(6x6, 3x3) measured 1.26-1.27x the direct
#: convolutions at 512x1024 where F(4x4, 3x3) gave 1.17-1.20x (benchmarks/winograd_results.md)
GEMM_TILE = 6


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def worth_tiling(height: int, width: int, dilation: int, min_pixels: int = 64 * 64,
                 max_overhead: float = 1.5, tile: int | None = None) -> bool:
    """Whether the Winograd path should pay on a ``height x width`` map: large enough, and the
    tiling adds at most ``max_overhead`` times the work. NNPACK (``tile=None``): the zero
    borders around the sub-grids (at 512x1024, rate 2 adds 9% and rate 4 19%; the VGG head's
    rate 24 would add 120%); the GEMM form: the sub-grids rounded up to whole ``tile x tile``
    output tiles (F(6x6, 3x3) at 512x1024: rate 2 adds 11%, rate 4 16%)."""
    h, w = -(-height // dilation), -(-width // dilation)
    if tile is None:
        tiled = (h + 2) * (w + 2)
    else:
        tiled = (-(-h // tile) * tile) * (-(-w // tile) * tile)
    return height * width >= min_pixels and tiled <= max_overhead * h * w


def atrous_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   dilation: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for a 3x3 ``weight``,
    computed as one undilated NNPACK (Winograd) convolution over the tiled sub-grids."""
    if not nnpack_available():
        raise RuntimeError("atrous_conv3x3 needs NNPACK, which this torch build lacks")
    n, c, height, width = x.shape
    d = int(dilation)
    h, w = -(-height // d), -(-width // d)  # the largest sub-grid (the first row/column)
    # Tiled input: sub-grid (a, b) at rows a*(h+2)+1 .. and columns b*(w+2)+1 .., zeros around
    # (a sub-grid shorter than h or w keeps zeros where the padding would be read); two extra
    # zero rows/columns at the end make the valid output exactly d*(h+2) x d*(w+2).
    tiled = x.new_zeros(n, c, d * (h + 2) + 2, d * (w + 2) + 2)
    blocks = tiled[:, :, :d * (h + 2), :d * (w + 2)].view(n, c, d, h + 2, d, w + 2)
    for a in range(d):
        for b in range(d):
            sub = x[:, :, a::d, b::d]
            blocks[:, :, a, 1:1 + sub.shape[2], b, 1:1 + sub.shape[3]] = sub
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    y = torch._nnpack_spatial_convolution(tiled, weight.contiguous(), bias, [0, 0], [1, 1])
    y = y.view(n, y.shape[1], d, h + 2, d, w + 2)  # (n, co, a, p, b, q)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty(n, y.shape[1], height, width, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else
                      torch.contiguous_format)
    for a in range(d):
        for b in range(d):
            sub = out[:, :, a::d, b::d]
            sub.copy_(y[:, :, a, :sub.shape[2], b, :sub.shape[3]])
    return out


# Winograd F(m x m, 3x3) (Lavin & Gray, 2016): an output tile is A^T [(G g G^T) * (B^T d B)] A
# for an (m + 2) x (m + 2) input tile d and a 3x3 filter g. F(4x4, 3x3) interpolates at 0, 1,
# -1, 2, -2 and infinity; F(6x6, 3x3) also at 1/2 and -1/2 (larger constants, more rounding).
_TRANSFORMS = {
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
    6: (((1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0), (0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0),
         (0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0), (0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0),
         (0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0), (0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0),
         (0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0), (0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1)),
        ((1, 0, 0), (-2 / 9, -2 / 9, -2 / 9), (-2 / 9, 2 / 9, -2 / 9),
         (1 / 90, 1 / 45, 2 / 45), (1 / 90, -1 / 45, 2 / 45), (32 / 45, 16 / 45, 8 / 45),
         (32 / 45, -16 / 45, 8 / 45), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0),
         (0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0), (0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0),
         (0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0), (0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1))),
}
#: output tile sizes m of the Winograd F(m x m, 3x3) forms :func:`atrous_conv3x3_gemm` has
TILES = tuple(_TRANSFORMS)


def winograd_weight(weight: torch.Tensor, tile: int = GEMM_TILE) -> torch.Tensor:
    """The ``((tile + 2)^2, in, out)`` float32 Winograd weights ``G g G^T`` of a
    ``(out, in, 3, 3)`` filter (computed in float64), as :func:`atrous_conv3x3_gemm` takes them."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"winograd_weight needs an (out, in, 3, 3) weight, got "
                         f"{tuple(weight.shape)}")
    if tile not in _TRANSFORMS:
        raise ValueError(f"tile must be one of {TILES}, got {tile!r}")
    g = torch.tensor(_TRANSFORMS[tile][1], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ik,ockl,jl->ijco", g, weight.detach().double(), g)
    return u.reshape(-1, weight.shape[1], weight.shape[0]).float().contiguous()


@functools.lru_cache(maxsize=None)
def _transform_matrices(tile: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B^T, A^T kron A^T)`` of F(tile x tile, 3x3), made once per dtype and device (not
    at every call of every layer)."""
    bt, _, at = (torch.tensor(t, dtype=dtype, device=device) for t in _TRANSFORMS[tile])
    return bt, torch.kron(at, at)


_WORKSPACE = threading.local()


def _workspace(name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A contiguous ``shape`` view of this thread's reusable buffer ``name`` (grown when too
    small; uninitialised). The GEMM form's temporaries are tens of MB per layer: allocated
    afresh at every call, glibc maps new pages for each (above 32 MB always), and the page
    faults cost more than the Winograd saved (measured: ResNet-101 at 512x1024 1.3x slower
    right after ONNX Runtime or OpenVINO had run in the process, 2.4 s against 3.6 s)."""
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (name, like.dtype, like.device)
    numel = math.prod(int(size) for size in shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers[key] = buffer = None  # let the old one go first
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


def release_workspace() -> None:
    """Free this thread's Winograd buffers (they are kept between calls: ~100 MB for
    ResNet-101 at 512x1024, growing with the input)."""
    _WORKSPACE.__dict__.pop("buffers", None)


def atrous_conv3x3_gemm(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
                        dilation: int, relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for a 3x3 filter given
    as ``u = winograd_weight(weight, tile)``: Winograd F(tile x tile, 3x3) over the tiled
    sub-grids, its ``(tile + 2)^2`` products as one batched GEMM (fp32; ~1e-5 relative rounding
    on ResNet-101's layers, where the direct convolution has ~1e-6), then ``relu`` if asked.
    Output in ``x``'s layout.
    """
    n, c, height, width = x.shape
    points, k = u.shape[0], u.shape[2]
    r = round(points ** 0.5)  # the input tile's side
    m = r - 2  # the output tile's side
    if m not in _TRANSFORMS or u.shape != (r * r, c, k):
        raise ValueError(f"Winograd weights of shape {tuple(u.shape)} for {c} input channels")
    d = int(dilation)
    h, w = -(-height // d), -(-width // d)  # the largest sub-grid
    th, tw = -(-h // m), -(-w // m)  # output tiles per sub-grid
    tiles = n * d * d * th * tw
    # Sub-grid (a, b) of image i, channels last, in a zero border (its padding) at
    # padded[i, a, b]; the input tile (p, q) starts at row m * p, column m * q. Only the
    # border is zeroed: the interior is written once.
    padded = _workspace("padded", (n, d, d, m * th + 2, m * tw + 2, c), x)
    padded[:, :, :, 0] = 0
    padded[:, :, :, :, 0] = 0
    nhwc = x.permute(0, 2, 3, 1)
    for a in range(d):
        for b in range(d):
            sub = nhwc[:, a::d, b::d]
            sh, sw = sub.shape[1], sub.shape[2]
            padded[:, a, b, 1:1 + sh, 1:1 + sw] = sub
            padded[:, a, b, 1 + sh:] = 0
            padded[:, a, b, :, 1 + sw:] = 0
    bt, at_at = _transform_matrices(m, x.dtype, x.device)
    # B^T d: the rows of each tile, read in place (a tile's r rows of r * c values are a
    # matrix with the padded row stride), one matmul per row of tiles.
    rows = _workspace("a", (n * d * d, th, tw, r, r * c), x)
    grids = padded.view(n * d * d, m * th + 2, m * tw + 2, c)
    s_row, s_col = grids.stride(1), grids.stride(2)
    for g in range(n * d * d):
        for p in range(th):
            window = grids[g, m * p:].as_strided((tw, r, r * c), (m * s_col, s_row, 1))
            torch.matmul(bt, window, out=rows[g, p])
    # (B^T d) B: the columns; v[t, r i + j] is the tile t's transformed point (i, j)
    v = torch.matmul(bt, rows.view(tiles * r, r, c),
                     out=_workspace("b", (tiles * r, r, c), x)).view(tiles, r * r, c)
    prod = torch.bmm(v.transpose(0, 1), u,  # (r * r, tiles, k), over the dead rows
                     out=_workspace("a", (r * r, tiles, k), x))
    if bias is not None:  # at the point (1, 1): column 1 of A^T is all ones, so it adds the
        prod[r + 1] += bias  # bias to every output of the tile
    y = torch.mm(at_at, prod.view(r * r, tiles * k),  # A^T M A, over the dead v
                 out=_workspace("b", (m * m, tiles * k), x))
    y = y.view(m, m, n, d, d, th, tw, k).permute(2, 5, 0, 3, 6, 1, 4, 7)
    y = y.reshape(n, m * th * d, m * tw * d, k)[:, :height, :width]
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty(n, k, height, width, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else
                      torch.contiguous_format)
    target = out.permute(0, 2, 3, 1)
    if relu:
        torch.clamp_min(y, 0, out=target)
    else:
        target.copy_(y)
    return out


class AtrousWinogradConv2d(nn.Module):
    """Inference-only stand-in for a dilated 3x3 ``nn.Conv2d`` (see the module docstring),
    through NNPACK (``backend="nnpack"``, AVX2) or torch's GEMM (``"gemm"``).

    Maps smaller than ``min_pixels`` (height x width), or whose tiling would add over
    ``max_overhead`` times the work (:func:`worth_tiling`), take the direct convolution
    ``self.conv`` (the original module, which :func:`deeplabv2.deploy.fast.prepack_convolutions`
    turns into a prepacked oneDNN one). Measured on ResNet-101's layer3/layer4 shapes:
    NNPACK 0.6-0.7x the direct convolution at 41x41, 1.0-1.2x at 65x65, 1.1-1.8x at 65x129, up
    to 2x at 129x257, on a 2-core AVX2 CPU; the GEMM form on a 2-core AVX-512 Xeon in
    ``benchmarks/winograd_results.md``. ``forward(x, relu=True)`` also applies a ReLU (in the
    last pass, for the GEMM form)."""

    def __init__(self, conv: nn.Conv2d, min_pixels: int = 64 * 64, max_overhead: float = 1.5,
                 backend: str = "nnpack", tile: int | None = GEMM_TILE):
        super().__init__()
        if not winograd_eligible(conv, min_channels=1):
            raise ValueError(f"not a dilated 3x3 stride-1 fp32 convolution with same padding: "
                             f"{conv}")
        _check_backend(backend)
        self.conv = conv
        self.dilation = conv.dilation[0]
        self.backend = backend
        self.tile = None if backend == "nnpack" else int(tile)  # NNPACK's is its own
        self.min_pixels, self.max_overhead = int(min_pixels), float(max_overhead)
        # derived weights, not saved: NNPACK takes NCHW weights, the GEMM form G g G^T
        weights = conv.weight.detach().contiguous() if backend == "nnpack" else \
            winograd_weight(conv.weight, self.tile)
        self.register_buffer("winograd_weights", weights, persistent=False)

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled()
                or not worth_tiling(x.shape[-2], x.shape[-1], self.dilation, self.min_pixels,
                                    self.max_overhead, self.tile)):
            out = self.conv(x)
        elif self.backend == "gemm":
            return atrous_conv3x3_gemm(x, self.winograd_weights, self.conv.bias, self.dilation,
                                       relu=relu)
        else:
            out = atrous_conv3x3(x, self.winograd_weights, self.conv.bias, self.dilation)
        return torch.relu_(out) if relu else out

    def extra_repr(self) -> str:
        kind = "NNPACK" if self.backend == "nnpack" else f"F({self.tile}x{self.tile}, 3x3), GEMM"
        return f"dilation={self.dilation}, Winograd {kind}"


def use_atrous_winograd(model: nn.Module, min_channels: int = 128,
                        min_pixels: int | None = None, max_overhead: float = 1.5,
                        backend: str = "nnpack", tile: int | None = GEMM_TILE) -> int:
    """Replace, in place, every :func:`winograd_eligible` convolution of ``model`` by an
    :class:`AtrousWinogradConv2d` (``min_pixels``: the backend's :data:`MIN_PIXELS` unless
    given); returns how many were replaced (0 for NNPACK where this torch has none)."""
    _check_backend(backend)
    if backend == "nnpack" and not nnpack_available():
        return 0
    if min_pixels is None:
        min_pixels = MIN_PIXELS[backend]
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if winograd_eligible(child, min_channels):
                setattr(module, name, AtrousWinogradConv2d(child, min_pixels, max_overhead,
                                                           backend, tile))
                replaced += 1
    return replaced

"""Fully connected CRF post-processing (Krähenbühl & Koltun, NIPS 2011), as DeepLab v2 uses it.

Mean-field inference with a Potts compatibility and two Gaussian kernels: a smoothness kernel on
pixel position and an appearance (bilateral) kernel on position and RGB colour. One update is
(Krähenbühl & Koltun, Algorithm 1; the DeepLab v2 paper's fully connected CRF section)::

    Q <- softmax( log p  +  pos_w * K_pos(Q)  +  bi_w * K_bi(Q) )      per pixel, over classes

where ``K(Q)_i = sum_j k(f_i, f_j) Q_j``, normalised as below. The bilateral filter runs on a
permutohedral lattice (Adams, Baek & Davis, Eurographics 2010): splat each pixel onto the d+1
vertices of the lattice simplex holding its feature vector, blur along the d+1 lattice
directions, slice back. Time and memory grow linearly with the pixels: no N x N matrix, no window.

The numbers follow the reference, densecrf as wrapped by pydensecrf (``DenseCRF2D`` with
``setUnaryEnergy(-log p)``, ``addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)``,
``addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)``,
``inference(iterations)``), in every choice that changes them:

- the lattice: densecrf's feature scaling, rounding, simplex, barycentric weights, lattice
  neighbours (none where its hash table has none), ``[1/2, 1, 1/2]`` blur in direction order
  0..d and output scale, so the bilateral term agrees to float rounding;
- ``NORMALIZE_SYMMETRIC``: ``K(Q) = D^-1/2 W D^-1/2 Q`` with ``D = W 1``, a pixel's own weight
  included in both;
- the Potts term as densecrf applies it, ``+w * K(Q)_l`` on label l's logit, which is the
  textbook ``-w * sum_{l' != l} K(Q)_l'`` plus a per-pixel constant that the softmax removes;
- the unary ``log max(p, prob_clip)`` with densecrf's (pydensecrf's ``unary_from_softmax``)
  clip at ``1e-5``, so that a class the network gave zero probability can still win where the
  pairwise terms favour it, and the start ``Q = softmax(unary)``; float32 throughout.

One deliberate difference: the smoothness kernel is the exact Gaussian (cut at 4 std), applied
as two banded 1-D passes since it is separable (zero outside the image, so border pixels get
their true, smaller normaliser), where densecrf uses a 2-D lattice. With ``pos_xy_std = 1`` a
lattice cell is about as wide as the kernel, so densecrf's version is that Gaussian plus a
position-dependent error (a pixel's own weight varies by 30 %). The exact kernel is 3-4 times
cheaper per iteration and needs no lattice; it changes about 0.5 % of the refined labels
relative to densecrf (tests/test_crf.py, benchmarks/crf_results.md). Past ``pos_xy_std = 4``
the band gets wide, and the smoothness kernel uses densecrf's lattice after all (shared by the
images of a batch), matching densecrf to rounding.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DenseCRF", "PermutohedralLattice", "dense_crf", "PROB_SUM_TOLERANCE"]

PROB_SUM_TOLERANCE = 1e-3  # largest |sum_c p - 1| accepted per pixel (see DenseCRF.__call__)
_CODE_BITS = 62  # lattice keys are packed into int64
# The exact smoothness kernel up to pos_xy_std = 4 (a band of 33 pixels); wider kernels use a
# lattice as densecrf does, whose cost does not grow with the kernel.
_MAX_BAND_RADIUS = 16


class PermutohedralLattice:
    """Gaussian filter ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j``, approximated on a lattice.

    Built once from ``features`` ``(N, P, d)``: N independent sets of P points in d dimensions,
    already divided by the kernel's standard deviations; each set gets its own lattice, so
    points of different sets never interact. :meth:`filter` then applies the filter to any
    number of value tensors; a point's own value is included. The output has densecrf's scale,
    which is not the exact sum's (0.6-0.9 times it in the tests, less for larger d): normalise,
    e.g. by the filter of ones as the CRF does, where the scale matters. Like any permutohedral
    filter it is accurate where points are dense relative to the kernel (a few per cent) and
    underestimates the tails between isolated points.

    The construction is Adams et al.'s (2010) as densecrf's ``Permutohedral`` implements
    it, so outputs match densecrf's to float rounding. Where densecrf hashes vertex keys, this
    packs them into sorted int64 codes (``torch.sort`` and ``torch.searchsorted``); splat, the
    d+1 blurs and slice are sparse matrices, built once and reused by every call. Vertices are
    numbered in key order, so a blur reads its neighbours in increasing order.
    """

    def __init__(self, features: Tensor) -> None:
        if not isinstance(features, Tensor):
            raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.ndim != 3 or not features.is_floating_point():
            raise ValueError("features must be a floating point (N, P, d) tensor, got "
                             f"{features.dtype} of shape {tuple(features.shape)}")
        n, p, d = features.shape
        if min(n, p, d) == 0:
            raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        self.batch_size, self.num_points, self.dim = n, p, d
        self.device = features.device
        # One set at a time: the work arrays of a whole batch would not stay in cache (and on
        # the CPU, arrays past malloc's mmap threshold are page-faulted in afresh every time).
        self._sets = [_Lattice(features[i].detach()) for i in range(n)]

    @property
    def num_vertices(self) -> int:
        return sum(part.num_vertices for part in self._sets)

    def filter(self, values: Tensor) -> Tensor:
        """Filter ``values`` ``(N, P, C)``; returns ``(N, P, C)`` float32 on the lattice's
        device."""
        expected = (self.batch_size, self.num_points)
        if (not isinstance(values, Tensor) or values.ndim != 3
                or tuple(values.shape[:2]) != expected):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"values must be (N, P, C) with (N, P) = {expected}, got {got}")
        values = values.detach().to(device=self.device, dtype=torch.float32).contiguous()
        out = torch.zeros_like(values)
        for i, part in enumerate(self._sets):
            part.apply(values[i], out[i], part.splat, part.slice)
        return out


class _Lattice:
    """The lattice of one point set: splat ``(M, P)``, d+1 blurs ``(M, M)`` and slice
    ``(P, M)`` as CSR matrices."""

    def __init__(self, features: Tensor) -> None:
        self.num_points, self.dim = features.shape
        self.device = features.device
        # (d, P): each coordinate one long contiguous vector, so that every step below is an
        # element-wise pass instead of work on rows of d numbers.
        f = features.to(torch.float32).t().contiguous()
        self._build(*_enclosing_simplices(f))

    def apply(self, values: Tensor, out: Tensor, splat: Tensor, slice_: Tensor,
              buffers: tuple[Tensor, Tensor] | None = None) -> None:
        """``out += slice_ @ blur_d @ ... @ blur_0 @ splat @ values``, both ``(P, C)`` float32;
        ``buffers`` are two ``(>= num_vertices, C)`` tensors to work in.

        Every product writes into an existing tensor (``torch.addmm(..., out=)``): on the CPU a
        fresh output costs more than the sparse product itself.
        """
        m, c = self.num_vertices, values.shape[1]
        if buffers is None:
            buffers = (values.new_empty(m, c), values.new_empty(m, c))
        src, dst = buffers[0][:m], buffers[1][:m]
        torch.addmm(src, splat, values, beta=0, out=src)
        for blur in self.blur:
            torch.addmm(dst, blur, src, beta=0, out=dst)
            src, dst = dst, src
        torch.addmm(out, slice_, src, out=out)

    def scaled(self, before: Tensor, after: Tensor) -> tuple[Tensor, Tensor]:
        """Splat and slice for ``diag(after) @ filter @ diag(before)``; both ``(P,)``."""
        splat = _csr(self.splat.crow_indices(), self.splat.col_indices(),
                     self.splat.values() * before[self.splat.col_indices()], self.splat.shape)
        slice_ = _csr(self.slice.crow_indices(), self.slice.col_indices(),
                      (self.slice.values().view(-1, self.dim + 1) * after.unsqueeze(1)).view(-1),
                      self.slice.shape)
        return splat, slice_

    def _build(self, q: Tensor, rank: Tensor, bary: Tensor) -> None:
        d, dev = self.dim, self.device
        npts = self.num_points

        # 1. Distinct simplices, keyed by (rem0 / (d+1), rank) packed into one int64.
        #    Many points share a simplex (a patch of flat colour does), so grouping simplices
        #    first keeps the (d+1)-times larger grouping of vertices below small.
        q_min, q_max = q[:d].amin(1).tolist(), q[:d].amax(1).tolist()
        q_range = [hi - lo + 1 for lo, hi in zip(q_min, q_max)]
        _check_code_space(q_range + [d + 1] * d, "simplex")
        code = q[0] - q_min[0]
        for i in range(1, d):
            code.mul_(q_range[i]).add_(q[i]).sub_(q_min[i])
        for i in range(d):
            code.mul_(d + 1).add_(rank[i])
        simplex_code, point_simplex = _unique(code)
        num_simplices = simplex_code.numel()
        del code
        # Unpack each simplex's digits.
        s_rank, s_q = [None] * d, [None] * d
        rest = simplex_code
        for i in reversed(range(d)):
            s_rank[i] = rest % (d + 1)
            rest = torch.div(rest, d + 1, rounding_mode="floor")
        for i in reversed(range(d)):
            s_q[i] = rest % q_range[i] + q_min[i]
            rest = torch.div(rest, q_range[i], rounding_mode="floor")

        # 2. Lattice vertices. Vertex r of a simplex has key rem0 + canonical_r[rank], with
        #    canonical_r[k] = r for k <= d - r and r - (d+1) otherwise; d of the d+1 coordinates
        #    are kept (they sum to zero), as in densecrf. Keys are packed into one int64 with a
        #    margin of 2d on each coordinate, so that a blur neighbour (key - 1 on every axis and
        #    + d + 1 on one, or the opposite) packs without carries: code + delta_j.
        k_min = [(d + 1) * lo - 2 * d for lo in q_min]
        k_range = [(d + 1) * (hi - lo) + 4 * d + 1 for lo, hi in zip(q_min, q_max)]
        _check_code_space(k_range, "lattice vertex")
        mult = [1] * d
        for i in range(d - 2, -1, -1):
            mult[i] = mult[i + 1] * k_range[i + 1]
        base = torch.zeros_like(s_q[0])
        for i in range(d):
            base += (s_q[i] * (d + 1) - k_min[i]) * mult[i]
        r = torch.arange(d + 1, device=dev)
        vertex_code = base.unsqueeze(1) + r * sum(mult)  # (S, d+1): canonical_r = r, ...
        for i in range(d):  # ... but r - (d+1) where rank > d - r
            vertex_code -= (s_rank[i].unsqueeze(1) > d - r).to(torch.int64) * ((d + 1) * mult[i])
        del base, s_q, s_rank, rest, simplex_code
        codes, simplex_vertex = _unique(vertex_code.view(-1))  # codes increasing
        num_vertices = codes.numel()
        del vertex_code
        index_dtype = torch.int32 if (d + 1) * npts < 2**31 else torch.int64
        offsets = simplex_vertex.to(index_dtype).view(num_simplices, d + 1)[point_simplex]
        del simplex_vertex, point_simplex

        # 3. Slice (points x vertices): each point's d+1 vertices, weighted barycentrically and
        #    by densecrf's output scale (Adams' alpha). Splat: the transpose, without alpha.
        cols = offsets.view(-1)
        weights = bary.t().reshape(-1)
        alpha = 1.0 / (1.0 + 2.0 ** -d)
        self.slice = _csr(torch.arange(0, cols.numel() + 1, d + 1, device=dev), cols,
                          weights * alpha, (npts, num_vertices))
        order = torch.argsort(cols, stable=True)
        rows = torch.zeros(num_vertices + 1, dtype=torch.int64, device=dev)
        torch.cumsum(torch.bincount(cols, minlength=num_vertices), 0, out=rows[1:])
        self.splat = _csr(rows, torch.div(order, d + 1, rounding_mode="floor"), weights[order],
                          (num_vertices, npts))
        del cols, weights, order, offsets

        # 4. Blur along each lattice direction j: new_v = v + (v[n1] + v[n2]) / 2 with
        #    n1 = key - 1 + (d+1) e_j, n2 = key + 1 - (d+1) e_j (e_d: no stored axis changes).
        self.blur = []
        for j in range(d + 1):
            delta = -sum(mult) + ((d + 1) * mult[j] if j < d else 0)
            wanted = codes + delta
            found = torch.searchsorted(codes, wanted).clamp_(max=num_vertices - 1)
            n1 = torch.where(codes[found] == wanted, found, -1)
            self.blur.append(_blur_matrix(n1, increasing=delta > 0))
        self.num_vertices = num_vertices


def _enclosing_simplices(f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For features ``f`` ``(d, P)`` float32: the enclosing lattice simplex of every point as
    ``q`` (d, P) int64 (the first d coordinates of its remainder-0 vertex, divided by d+1) and
    ``rank`` (d+1, P) int16, and its barycentric weights ``bary`` (d+1, P) float32.

    float32 with densecrf's order of operations: which simplex a point falls in depends on the
    last bit.
    """
    d, count = f.shape
    dev = f.device
    # Elevate onto the hyperplane x . 1 = 0 of R^{d+1} (Adams et al., p. 5), scaled so that
    # the whole filter has standard deviation 1 in feature units (ibid. p. 6).
    inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [float(np.float32(1.0 / math.sqrt((i + 1) * (i + 2)) * float(inv_std)))
             for i in range(d)]
    elevated = torch.empty(d + 1, count, dtype=torch.float32, device=dev)
    running = torch.zeros(count, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = f[j - 1] * scale[j - 1]
        torch.sub(running, cf * float(j), out=elevated[j])
        running += cf
    elevated[0] = running
    # Closest remainder-0 point: every coordinate rounded to a multiple of d+1 (half to even,
    # as densecrf's SSE build rounds).
    down = float(np.float32(1.0 / (d + 1)))
    rounded = torch.mul(elevated, down).round_()
    rem0 = rounded * float(d + 1)
    residual = elevated - rem0
    # rank[i]: place of coordinate i in the decreasing order of elevated - rem0, ties to the
    # lower index (densecrf's pairwise count).
    rank = torch.zeros(d + 1, count, dtype=torch.int16, device=dev)
    for i in range(d):
        for j in range(i + 1, d + 1):
            less = residual[i] < residual[j]
            rank[i] += less
            rank[j] += ~less
    # rem0 off the hyperplane: shift the coordinates whose rank overflows by d+1.
    rank += rounded.sum(0).to(torch.int16)
    wrap = (rank < 0).to(torch.int16) - (rank > d).to(torch.int16)
    rank += wrap * (d + 1)
    q = rounded[:d].to(torch.int64) + wrap[:d]
    rem0 += wrap * (d + 1)
    # Barycentric weights (ibid. p. 10): with s_k the offset of the coordinate of rank d - k,
    # b_k = s_k - s_{k-1}, and b_0 = s_0 + 1 - s_d.
    step = (elevated - rem0).mul_(down)
    by_rank = torch.empty_like(step).scatter_(0, (d - rank).to(torch.int64), step)
    bary = torch.empty_like(step)
    torch.sub(by_rank[1:], by_rank[:-1], out=bary[1:])
    torch.add(by_rank[0], 1.0 - by_rank[d], out=bary[0])
    return q, rank, bary


def _unique(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.unique(keys, return_inverse=True)`` for 1-D int64 keys, by one stable sort."""
    sorted_keys, order = torch.sort(keys, stable=True)
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    inverse = torch.empty_like(order)
    inverse[order] = torch.cumsum(new, 0) - 1
    return sorted_keys[new], inverse


def _blur_matrix(n1: Tensor, increasing: bool) -> Tensor:
    """``I + (A + A^T) / 2`` as an ``(M, M)`` CSR matrix, ``A[v, n1[v]] = 1`` where
    ``n1[v] >= 0``. Vertices are numbered in key order and ``n1[v] > v`` for all v or
    ``n1[v] < v`` for all v (``increasing``), so each row's columns come out sorted."""
    m, dev = n1.numel(), n1.device
    itself = torch.arange(m, device=dev)
    n2 = torch.full((m + 1,), -1, dtype=n1.dtype, device=dev)
    n2[torch.where(n1 >= 0, n1, m)] = itself  # vertices without n1 write to the spare slot
    n2 = n2[:m]
    cols = torch.stack([n2, itself, n1] if increasing else [n1, itself, n2], 1).view(-1)
    present = cols >= 0
    keep = present.nonzero().squeeze(1)
    vals = torch.where(keep % 3 == 1, 1.0, 0.5).to(torch.float32)
    rows = torch.zeros(m + 1, dtype=torch.int64, device=dev)
    torch.cumsum(present.view(m, 3).sum(1), 0, out=rows[1:])
    return _csr(rows, cols[keep], vals, (m, m))


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix with int32 indices where they fit: MKL (CPU) and cuSPARSE take those
    without converting them on every product."""
    if col.numel() < 2**31 and max(size) < 2**31:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=tuple(size),
                                       check_invariants=False)


def _check_code_space(radices: list[int], what: str) -> None:
    bits = sum(math.log2(max(int(r), 1)) for r in radices)
    if bits > _CODE_BITS:
        raise ValueError(f"features spread over too many {what} keys to pack into 64 bits "
                         f"({bits:.0f} bits); use fewer dimensions or larger standard deviations")


class _SpatialMessage:
    """The smoothness message ``w * D^-1/2 W D^-1/2 Q``, ``W_ij = exp(-|p_i - p_j|^2 /
    (2 std^2))`` over pixel positions p, exact up to a cut at 4 std.

    W is separable and so is its normaliser D (zero outside the image), so the message is a
    vertical and a horizontal 1-D pass, each one banded sparse matrix with the normaliser (and
    the weight) folded in: ``diag(n_y) G_y diag(n_y)`` on the image's ``(H, W*C)`` rows, then
    ``w diag(n_x) G_x diag(n_x)`` on its ``(H*W, C)`` pixels.
    """

    def __init__(self, height: int, width: int, std: float, weight: float,
                 device: torch.device) -> None:
        self.vertical = _banded(1, height, std, 1.0, device)
        self.horizontal = _banded(height, width, std, weight, device)
        self.height, self.pixels = height, height * width

    def add_message(self, q: Tensor, out: Tensor, work: Tensor) -> None:
        """``out += message(q)``; all three ``(N*H*W, C)``, ``work`` overwritten."""
        for start in range(0, q.shape[0], self.pixels):
            image = slice(start, start + self.pixels)
            rows = work[image].view(self.height, -1)
            torch.addmm(rows, self.vertical, q[image].view(self.height, -1), beta=0, out=rows)
            torch.addmm(out[image], self.horizontal, work[image], out=out[image])


def _band_radius(std: float) -> int:
    return max(1, math.ceil(4.0 * std))


def _banded(blocks: int, length: int, std: float, weight: float, device: torch.device) -> Tensor:
    """``kron(I_blocks, weight * diag(n) G diag(n))`` as CSR: G the Gaussian along an axis of
    ``length`` samples, cut at 4 std, n = 1 / sqrt(G 1)."""
    radius = _band_radius(std)
    i = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    j = i + torch.arange(-radius, radius + 1, dtype=torch.float64)
    inside = (j >= 0) & (j < length)
    g = torch.exp(-0.5 * ((j - i) / std) ** 2) * inside
    norm = (g.sum(1) + 1e-20).rsqrt()
    band = weight * norm.unsqueeze(1) * g * norm[j.clamp(0, length - 1).long()]
    cols = j.long()[inside]
    vals = band[inside].to(torch.float32)
    crow = torch.zeros(length + 1, dtype=torch.int64)
    torch.cumsum(inside.sum(1), 0, out=crow[1:])
    nnz = cols.numel()
    # the same band in every block along the diagonal
    shift = torch.arange(blocks, dtype=torch.int64).unsqueeze(1)
    all_crow = torch.cat([(crow[:-1] + shift * nnz).view(-1), torch.tensor([blocks * nnz])])
    all_cols = (cols + shift * length).view(-1)
    return _csr(all_crow.to(device), all_cols.to(device), vals.repeat(blocks).to(device),
                (blocks * length, blocks * length))


class _LatticeMessage:
    """A message ``w * D^-1/2 W D^-1/2 Q`` with W a Gaussian kernel on ``features``
    ``(N, P, d)``, one lattice per image (or ``(1, P, d)``: one lattice shared by all images).
    The normalisation and the weight are folded into splat and slice."""

    def __init__(self, features: Tensor, weight: float, classes: int) -> None:
        self.lattices, self.matrices = [], []
        for f in features:
            lattice = _Lattice(f)
            ones = torch.ones(lattice.num_points, 1, device=f.device)
            norm = torch.zeros_like(ones)
            lattice.apply(ones, norm, lattice.splat, lattice.slice)
            norm = norm.squeeze(1).add_(1e-20).rsqrt_()
            self.lattices.append(lattice)
            self.matrices.append(lattice.scaled(norm, norm * weight))
        m = max(lattice.num_vertices for lattice in self.lattices)
        self.buffers = (torch.empty(m, classes, device=features.device),
                        torch.empty(m, classes, device=features.device))
        self.pixels = features.shape[1]

    def add_message(self, q: Tensor, out: Tensor, work: Tensor) -> None:
        for i, start in enumerate(range(0, q.shape[0], self.pixels)):
            k = i if len(self.lattices) > 1 else 0
            image = slice(start, start + self.pixels)
            splat, slice_ = self.matrices[k]
            self.lattices[k].apply(q[image], out[image], splat, slice_, self.buffers)


@dataclass(frozen=True)
class DenseCRF:
    """Dense CRF parameters; calling it refines a batch of class probabilities.

    The defaults are those released with DeepLab v2's ResNet-101 PASCAL VOC 2012 model (the
    ``DenseCRF`` layer of its test prototxt; the paper's VOC experiments describe the search):
    10 mean-field iterations, appearance kernel ``bi_w=4, bi_xy_std=67, bi_rgb_std=3``,
    smoothness kernel ``pos_w=3, pos_xy_std=1``. Standard deviations are in pixels and in
    0-255 intensity levels. A weight of 0 leaves its kernel out.
    """

    iterations: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    prob_clip: float = 1e-5  # unary = log(max(p, prob_clip)), as densecrf's; 0: plain log p

    def __post_init__(self) -> None:
        if not _is_real(self.prob_clip) or not 0 <= self.prob_clip < 1:
            raise ValueError(f"prob_clip must be a number in [0, 1), got {self.prob_clip!r}")
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {it!r}")
        for name in ("pos_w", "bi_w"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DenseCRF:
        """Build from a config mapping; an unknown key is an error listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in valid]
        if unknown:
            raise ValueError(f"unknown CRF parameter(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(valid)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __call__(self, probs: Tensor, images: Tensor | np.ndarray) -> Tensor:
        """Refine ``probs`` ``(N, C, H, W)`` with ``images`` ``(N, H, W, 3)`` uint8 RGB (a
        tensor or a numpy array; moved to the device of ``probs``). Returns the refined
        probabilities ``(N, C, H, W)``, in the dtype and on the device of ``probs``.

        ``probs`` must be probabilities: finite, non-negative, summing to one over C within
        ``PROB_SUM_TOLERANCE`` (or the dtype's eps, if larger: bfloat16). Within it they are
        renormalised, since the first step is ``softmax(log p)`` as in densecrf; anything else
        is rejected rather than guessed at (logits, for one, need a softmax first). The unary is
        ``log max(p, prob_clip)``: a zero probability can come back (``prob_clip=0``: it stays
        zero). Every input error is a ``ValueError`` that says what is wrong.
        The computation is float32 whatever the input dtype; no gradient flows through.
        """
        images = _check_inputs(probs, images)
        n, c, h, w = probs.shape
        dev = probs.device
        # (N*H*W, C) with the classes contiguous: the layout of every step below.
        unary = torch.empty(n * h * w, c, device=dev)
        unary.view(n, h, w, c).copy_(probs.detach().permute(0, 2, 3, 1))
        if self.prob_clip > 0:
            unary.clamp_(min=float(self.prob_clip))
        unary.log_()
        q = torch.softmax(unary, dim=1)
        if self.iterations > 0:
            messages = []
            if self.pos_w > 0 and _band_radius(self.pos_xy_std) <= _MAX_BAND_RADIUS:
                messages.append(_SpatialMessage(h, w, float(self.pos_xy_std), float(self.pos_w),
                                                dev))
            elif self.pos_w > 0:  # a wide kernel: densecrf's lattice, shared by the batch
                messages.append(_LatticeMessage(
                    _position_features(h, w, float(self.pos_xy_std), dev).unsqueeze(0),
                    float(self.pos_w), c))
            if self.bi_w > 0:
                messages.append(_LatticeMessage(
                    _bilateral_features(images, float(self.bi_xy_std), float(self.bi_rgb_std)),
                    float(self.bi_w), c))
            logits = torch.empty(n * h * w, c, device=dev)
            work = torch.empty(n * h * w, c, device=dev)
            for _ in range(self.iterations):
                logits.copy_(unary)
                for message in messages:
                    message.add_message(q, logits, work)
                torch.softmax(logits, dim=1, out=q)
        return q.view(n, h, w, c).permute(0, 3, 1, 2).to(probs.dtype).contiguous()


def dense_crf(probs: Tensor, images: Tensor | np.ndarray, *, iterations: int = 10,
              pos_w: float = 3.0, pos_xy_std: float = 1.0, bi_w: float = 4.0,
              bi_xy_std: float = 67.0, bi_rgb_std: float = 3.0,
              prob_clip: float = 1e-5) -> Tensor:
    """Refine ``(N, C, H, W)`` probabilities with ``(N, H, W, 3)`` uint8 RGB images by dense CRF
    mean-field inference; returns ``(N, C, H, W)`` probabilities. See :class:`DenseCRF`."""
    crf = DenseCRF(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                   bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std, prob_clip=prob_clip)
    return crf(probs, images)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _position_features(height: int, width: int, xy_std: float, device: torch.device) -> Tensor:
    """``(H*W, 2)`` float32 ``(x, y) / xy_std`` as densecrf's ``addPairwiseGaussian``."""
    f = torch.empty(height, width, 2, dtype=torch.float32, device=device)
    f[..., 0] = torch.arange(width, dtype=torch.float32, device=device) / xy_std
    f[..., 1] = (torch.arange(height, dtype=torch.float32, device=device) / xy_std).unsqueeze(1)
    return f.view(height * width, 2)


def _bilateral_features(images: Tensor, xy_std: float, rgb_std: float) -> Tensor:
    """``(N, H*W, 5)`` float32 ``(x, y, r, g, b) / std``, x the column and y the row, as
    densecrf's ``addPairwiseBilateral`` computes them."""
    n, h, w, _ = images.shape
    f = torch.empty(n, h, w, 5, dtype=torch.float32, device=images.device)
    f[..., :2] = _position_features(h, w, xy_std, images.device).view(h, w, 2)
    f[..., 2:] = images.to(torch.float32) / rgb_std
    return f.view(n, h * w, 5)


def _check_inputs(probs: Tensor, images: Tensor | np.ndarray) -> Tensor:
    """Raise ``ValueError`` naming what is wrong; return ``images`` as a tensor on the device
    of ``probs``."""
    if not isinstance(probs, Tensor):
        raise ValueError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim != 4 or not probs.is_floating_point():
        raise ValueError("probs must be a floating point (N, C, H, W) tensor, got "
                         f"{probs.dtype} of shape {tuple(probs.shape)}")
    n, c, h, w = probs.shape
    if min(n, c, h, w) == 0:
        raise ValueError(f"probs must be non-empty, got shape {tuple(probs.shape)}")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor or numpy array, got "
                         f"{type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 RGB (0-255), got {images.dtype}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be (N, H, W, 3) RGB, got shape {tuple(images.shape)}")
    if tuple(images.shape[:3]) != (n, h, w):
        raise ValueError(f"images of shape {tuple(images.shape)} do not match probs of shape "
                         f"{tuple(probs.shape)}: expected ({n}, {h}, {w}, 3)")
    p = probs.detach()
    sums = p.sum(dim=1, dtype=torch.float32)  # NaN and inf anywhere show in the sums
    if not torch.isfinite(sums).all():
        what = "NaN" if torch.isnan(p).any() else "infinite values"
        raise ValueError(f"probs contain {what}")
    low = p.amin().item()
    if low < 0:
        raise ValueError(f"probs contain negative values (min {low:.3g}); they must be "
                         "probabilities, e.g. softmax(logits, dim=1)")
    # bfloat16 rounds each probability by up to 0.4 %, and so their sum
    if (sums - 1).abs().amax().item() > max(PROB_SUM_TOLERANCE, torch.finfo(p.dtype).eps):
        raise ValueError("probs do not sum to 1 over the class dimension (dim 1): sums range "
                         f"from {sums.amin().item():.4g} to {sums.amax().item():.4g}; pass "
                         "softmax(logits, dim=1)")
    return images.to(probs.device)


#: The CRF parameters released with each DeepLab v2 model family (test prototxts' ``DenseCRF``
#: layers): ResNet-101 ASPP-L, and VGG-16 (DeepLab-LargeFOV's; used for both VGG heads).
CRF_PRESETS = {
    "resnet": DenseCRF(bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=1.0),
    "vgg16": DenseCRF(bi_w=4.0, bi_xy_std=121.0, bi_rgb_std=5.0, pos_w=3.0, pos_xy_std=3.0),
}

#: The paper's grid search (Sec. 4.1): w in 3..6, xy std in 30..100 step 10, rgb std in 3..6,
#: with the smoothness kernel fixed.
PAPER_GRID = {"bi_w": [3, 4, 5, 6], "bi_xy_std": list(range(30, 101, 10)),
              "bi_rgb_std": [3, 4, 5, 6]}


def crf_preset(model_config: dict | None) -> DenseCRF:
    """The released CRF parameters for a model of ``model_config`` (its ``backbone``)."""
    backbone = (model_config or {}).get("backbone", "resnet")
    return CRF_PRESETS.get(backbone, CRF_PRESETS["resnet"])

"""Fusions that need no training, and oracles that look at HR: the baselines and bounds a learned fusion is judged
against.

Every function takes the members' outputs for one image as ``cands``, a tensor (N, 3, H, W) of RGB values on the
[0, 1] scale (float32 from the cache, or any float dtype), and, for the least-squares fit and the oracles, the
ground truth ``hr`` (3, H, W) on the same scale. Everything is computed in float64 and returned in float64, not
clamped and not rounded: quantise to 8 bit (``srmodels.data.images.to_uint8``) before scoring, as for every other row.

Definitions (the scored metric is PSNR-Y / SSIM-Y; these work in RGB unless said otherwise):

* uniform mean: ``sum_i c_i / N``, per pixel and channel.
* least-squares weights: one weight per member, shared by every pixel, channel and image, minimising the RGB
  squared error ``sum ||sum_i w_i c_i - h||^2`` over every pixel and channel of every training image (minus
  ``crop_border`` pixels on each side, as the metric ignores them). Unconstrained by default: the weights need
  not be positive nor sum to one (``sum_to_one=True`` adds the affine constraint), so the fused image can leave
  [0, 1] and is clamped when quantised.
* per-image best member (oracle): the member with the best score on that image; the caller scores.
* per-pixel best member (oracle): per pixel, the member nearest to HR in Euclidean RGB distance
  ``(r - r')^2 + (g - g')^2 + (b - b')^2``; ties go to the lowest member index.
* convex oracle: per pixel, the point of the members' convex hull in RGB nearest to HR in Euclidean RGB distance,
  i.e. weights ``w >= 0, sum w = 1`` (one vector per pixel, shared by the three channels, as the learned heads'
  weights are) minimising ``||sum_i w_i c_i - h||^2``. Computed exactly (see :func:`oracle_convex`). Where several
  weightings reach the minimum (identical members, HR on a face), the one with the fewest members wins, then
  the lowest member indices.
* luma convex oracle: the same set of weightings, nearest to HR in BT.601 Y, which is what PSNR-Y scores: the
  exact per-pixel upper bound of PSNR-Y over every per-pixel convex weighting (before 8-bit rounding). The RGB
  convex oracle is not that bound, only close to it.

The oracles look at HR: they are bounds on what a fusion of these outputs could reach, never models that can be
selected or shipped. Label them as oracles wherever they are reported.

Determinism: only elementwise torch arithmetic (each operation rounded once by IEEE 754, whatever the instruction
set, thread count or tensor size), sums written out in a fixed order, and a pairwise tree of elementwise adds for
the least-squares sums over pixels. No BLAS or LAPACK call reaches an output (their kernels differ between CPUs),
which is why the tiny N x N normal equations are solved here by Gaussian elimination in Python floats. Processing
in row chunks gives the same bits as one pass.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

__all__ = ["uniform_mean", "weighted", "NormalEquations", "least_squares_weights", "per_image_best_index",
           "oracle_pixel_best", "oracle_convex", "oracle_convex_luma", "MAX_CONVEX_MEMBERS"]

# The convex oracle enumerates the faces of the members' hull: 2^N - 1 subsets. Five members give 31.
MAX_CONVEX_MEMBERS = 5
# A face whose normalised Gram determinant (det / product of its diagonal: the squared sines of its angles) is
# below this is flat: it is dropped and its own faces, which are also enumerated, stand in for it. Skipping one
# moves the minimum distance by at most its thickness, about sqrt(1e-10) of its size.
_FLAT_FACE = 1e-10
# Barycentric coordinates above this (rounding noise below zero) still count as inside a face.
_INSIDE = -1e-12
# Pixels per chunk of the per-pixel oracles: bounds their working memory to a few hundred MB at any image size.
_CHUNK_PIXELS = 1 << 18
# BT.601 luma weights on the [0, 1] scale (srmodels.metrics.rgb_to_y, without the offset, which cancels).
_LUMA = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)


# ------------------------------------------------------------------------------------------ checks and helpers
def _checked_outputs(cands: torch.Tensor) -> torch.Tensor:
    if not isinstance(cands, torch.Tensor) or cands.ndim != 4 or cands.shape[1] != 3:
        raise ValueError(f"members must be a (N, 3, H, W) tensor, got {getattr(cands, 'shape', type(cands))}")
    if cands.shape[0] < 1:
        raise ValueError("no members")
    if not cands.is_floating_point():
        raise ValueError(f"members must be floating point on the [0, 1] scale, got {cands.dtype}")
    return cands.to(device="cpu", dtype=torch.float64)


def _pair(cands: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = _checked_outputs(cands)
    if not isinstance(hr, torch.Tensor) or tuple(hr.shape) != tuple(c.shape[1:]):
        raise ValueError(f"HR must be a (3, H, W) tensor matching the members' {tuple(c.shape[1:])}, got "
                         f"{tuple(getattr(hr, 'shape', ()))}")
    if not hr.is_floating_point():
        raise ValueError(f"HR must be floating point on the [0, 1] scale (divide uint8 by 255), got {hr.dtype}")
    return c, hr.to(device="cpu", dtype=torch.float64)


def _sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` left to right: a fixed order, unlike a reduction kernel's."""
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _dot3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel dot product of two (3, ...) RGB tensors."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _tree_sum(x: torch.Tensor) -> float:
    """Sum of a 1-D float64 tensor by pairwise halving with elementwise adds.

    The order of additions depends only on the length: no reduction kernel (whose blocking varies with the
    instruction set and, for a full reduction, with the thread count) is involved. Error grows with log2(n).
    """
    x = x.reshape(-1)
    if x.numel() == 0:
        return 0.0
    while x.numel() > 1:
        n = x.numel()
        half = n // 2
        y = x[:half] + x[half:2 * half]
        x = torch.cat((y, x[2 * half:])) if n % 2 else y
    return float(x[0])


def _row_chunks(height: int, width: int, chunk_rows: int | None) -> list[tuple[int, int]]:
    rows = chunk_rows if chunk_rows is not None else max(1, _CHUNK_PIXELS // max(1, width))
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return [(r, min(height, r + rows)) for r in range(0, height, rows)]


# ------------------------------------------------------------------------------------------ fixed fusions
def uniform_mean(cands: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float64: the mean of the N members, per pixel and channel (summed in member order)."""
    c = _checked_outputs(cands)
    return _sum(list(c)) / c.shape[0]


def weighted(cands: torch.Tensor, w: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(3, H, W) float64: ``sum_i w[i] * cands[i]`` with one global weight per member (summed in member order).

    Not clamped: unconstrained least-squares weights can leave [0, 1].
    """
    c = _checked_outputs(cands)
    weights = [float(v) for v in (w.tolist() if isinstance(w, torch.Tensor) else w)]
    if len(weights) != c.shape[0]:
        raise ValueError(f"{len(weights)} weights for {c.shape[0]} members")
    return _sum([c[i] * weights[i] for i in range(c.shape[0])])


@dataclass
class NormalEquations:
    """The least-squares normal equations ``A w = b``, accumulated image by image.

    ``A[i][j] = sum c_i c_j`` and ``b[i] = sum c_i h`` over every pixel and channel (minus ``crop_border`` pixels
    per side) of every image added; float64. Each image's sums are pairwise trees (:func:`_tree_sum`), added to
    the totals in the order the images come, so streaming from disk gives the same bits as a list.
    """

    crop_border: int = 0
    num_members: int | None = None
    a: list[list[float]] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    hh: float = 0.0
    num_values: int = 0
    num_images: int = 0

    def add(self, cands: torch.Tensor, hr: torch.Tensor) -> None:
        """Accumulate one image: ``cands`` (N, 3, H, W), ``hr`` (3, H, W), both on the [0, 1] scale."""
        c, h = _pair(cands, hr)
        n = c.shape[0]
        if self.num_members is None:
            self.num_members = n
            self.a = [[0.0] * n for _ in range(n)]
            self.b = [0.0] * n
        elif n != self.num_members:
            raise ValueError(f"an image with {n} members after images with {self.num_members}")
        k = self.crop_border
        if k < 0:
            raise ValueError(f"crop_border must be >= 0, got {k}")
        if k:
            if c.shape[2] <= 2 * k or c.shape[3] <= 2 * k:
                raise ValueError(f"crop_border {k} leaves nothing of a {c.shape[3]}x{c.shape[2]} image")
            c, h = c[:, :, k:-k, k:-k], h[:, k:-k, k:-k]
        flat = [c[i].reshape(-1) for i in range(n)]
        hf = h.reshape(-1)
        for i in range(n):
            for j in range(i, n):
                self.a[i][j] += _tree_sum(flat[i] * flat[j])
            self.b[i] += _tree_sum(flat[i] * hf)
        for i in range(n):
            for j in range(i):
                self.a[i][j] = self.a[j][i]
        self.hh += _tree_sum(hf * hf)
        self.num_values += hf.numel()
        self.num_images += 1

    def solve(self, *, sum_to_one: bool = False) -> torch.Tensor:
        """(N,) float64 weights minimising the accumulated squared error; ``sum_to_one`` constrains sum(w) = 1.

        A ``ValueError`` when nothing was added or the system is singular (a member is a linear combination of
        the others on the fitting data, e.g. two identical members).
        """
        if self.num_members is None or self.num_values == 0:
            raise ValueError("no images to fit least-squares weights on")
        n = self.num_members
        a = [row[:] for row in self.a]
        b = self.b[:]
        if sum_to_one:  # Lagrange: [[A, 1], [1^T, 0]] [w; lambda] = [b; 1]
            a = [row + [1.0] for row in a] + [[1.0] * n + [0.0]]
            b = b + [1.0]
        scale = max(abs(self.a[i][i]) for i in range(n))
        try:
            x = _gauss_solve(a, b, tol=1e-12 * scale)
        except ZeroDivisionError:
            raise ValueError(
                f"least-squares weights are not determined: the {n} members' outputs are linearly dependent on "
                f"the {self.num_images} fitting image(s) (two identical members?)") from None
        return torch.tensor(x[:n], dtype=torch.float64)

    def mse(self, w: torch.Tensor | Sequence[float]) -> float:
        """Mean squared error (RGB, [0, 1] scale) of weights ``w`` on the accumulated data, from the sums."""
        ws = [float(v) for v in (w.tolist() if isinstance(w, torch.Tensor) else w)]
        n = len(ws)
        quad = sum(ws[i] * self.a[i][j] * ws[j] for i in range(n) for j in range(n))
        lin = sum(ws[i] * self.b[i] for i in range(n))
        return (quad - 2.0 * lin + self.hh) / self.num_values


def _gauss_solve(a: list[list[float]], b: list[float], *, tol: float) -> list[float]:
    """Gaussian elimination with partial pivoting in Python floats (each operation rounded once, no FMA).

    ``ZeroDivisionError`` when a pivot is at most ``tol`` in magnitude.
    """
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))  # ties: the first row
        if not abs(m[piv][col]) > tol:
            raise ZeroDivisionError
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for k in range(col, n + 1):
                    m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        s = m[r][n]
        for k in range(r + 1, n):
            s -= m[r][k] * x[k]
        x[r] = s / m[r][r]
    return x


def least_squares_weights(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, crop_border: int = 0,
                          sum_to_one: bool = False) -> torch.Tensor:
    """(N,) float64: global least-squares weights, one per member, fitted in closed form on ``pairs``.

    ``pairs`` yields ``(cands (N, 3, H, W), hr (3, H, W))`` per image, so a caller can stream images from disk;
    the fit is the RGB squared error over every pixel and channel (``crop_border`` pixels per side ignored, as
    the metric does). Unconstrained unless ``sum_to_one``: weights may be negative or sum to other than one.
    Apply with :func:`weighted`. A ``ValueError`` if there are no images or the system is singular.
    """
    eq = NormalEquations(crop_border=crop_border)
    for cands, hr in pairs:
        eq.add(cands, hr)
    return eq.solve(sum_to_one=sum_to_one)


# ------------------------------------------------------------------------------------------ oracles (look at HR)
def per_image_best_index(scores: Sequence[float]) -> int:
    """ORACLE (chooses with HR): index of the member with the highest score on one image; ties -> lowest index.

    ``scores``: one image's scores of the N members (e.g. PSNR-Y of the 8-bit outputs), higher is better.
    """
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("no scores")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"NaN among the scores {values}")
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def oracle_pixel_best(cands: torch.Tensor, hr: torch.Tensor, *, chunk_rows: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """ORACLE (looks at HR): per pixel, the member nearest to HR in Euclidean RGB distance; ties -> lowest index.

    Returns (image (3, H, W) float64, index map (H, W) int64).
    """
    c, h = _pair(cands, hr)
    n, _, height, width = c.shape
    image = torch.empty((3, height, width), dtype=torch.float64)
    index = torch.empty((height, width), dtype=torch.int64)
    for r0, r1 in _row_chunks(height, width, chunk_rows):
        cc, hc = c[:, :, r0:r1], h[:, r0:r1]
        best_d = best_i = None
        for i in range(n):
            diff = cc[i] - hc
            d = _dot3(diff, diff)
            if best_d is None:
                best_d, best_i = d, torch.zeros(d.shape, dtype=torch.int64)
            else:
                better = d < best_d  # strict: ties keep the lower index
                best_d = torch.where(better, d, best_d)
                best_i = torch.where(better, torch.full_like(best_i, i), best_i)
        index[r0:r1] = best_i
        image[:, r0:r1] = torch.gather(cc, 0, best_i.expand(1, 3, *best_i.shape)).squeeze(0)
    return image, index


class _SymmetricSolver:
    """Per-pixel solutions of an m x m (m <= 3) symmetric system by Cramer's rule, and a mask of flat systems.

    ``g[i][j]`` are (P,) tensors. Flat: det <= _FLAT_FACE * product of the diagonal (a Gram matrix of edge vectors
    is positive semi-definite, so that ratio lies in [0, 1]); for m = 1, a zero edge.
    """

    def __init__(self, g: list[list[torch.Tensor]]) -> None:
        m = len(g)
        if m == 1:
            self.det = g[0][0]
            self.cof = [[torch.ones_like(self.det)]]
            self.flat = ~(self.det > 0)
        elif m == 2:
            a, b, d = g[0][0], g[0][1], g[1][1]
            self.det = a * d - b * b
            self.cof = [[d, -b], [-b, a]]
            self.flat = ~(self.det > _FLAT_FACE * (a * d))
        elif m == 3:
            a, b, c = g[0][0], g[0][1], g[0][2]
            d, e, f = g[1][1], g[1][2], g[2][2]
            # cofactors of the symmetric matrix [[a, b, c], [b, d, e], [c, e, f]]
            k00, k01, k02 = d * f - e * e, c * e - b * f, b * e - c * d
            k11, k12, k22 = a * f - c * c, b * c - a * e, a * d - b * b
            self.det = a * k00 + b * k01 + c * k02
            self.cof = [[k00, k01, k02], [k01, k11, k12], [k02, k12, k22]]
            self.flat = ~(self.det > _FLAT_FACE * (a * d * f))
        else:
            raise ValueError(f"faces of at most 4 members in RGB, got {m + 1}")

    def solve(self, rhs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_sum([row[j] * rhs[j] for j in range(len(rhs))]) / self.det for row in self.cof]


def _convex_chunk(c: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The convex oracle on (N, 3, P) members and (3, P) HR: (image (3, P), weights (N, P))."""
    n, _, p = c.shape
    inf = torch.full((p,), math.inf, dtype=torch.float64)
    zero = torch.zeros(p, dtype=torch.float64)
    best_d = inf
    best_w = [zero] * n
    # Faces by size, then lexicographically; a later face replaces an earlier one only if strictly nearer.
    # More than 4 points in 3-D are always affinely dependent: their faces of 4 or fewer points cover them.
    for size in range(1, min(n, 4) + 1):
        for face in itertools.combinations(range(n), size):
            base = c[face[0]]
            if size == 1:
                diff = base - h
                d = _dot3(diff, diff)
                w_face = [torch.ones(p, dtype=torch.float64)]
                inside = torch.ones(p, dtype=torch.bool)
            else:
                edges = [c[j] - base for j in face[1:]]
                r = h - base
                g = [[_dot3(edges[i], edges[j]) if j >= i else None for j in range(size - 1)]
                     for i in range(size - 1)]
                for i in range(size - 1):
                    for j in range(i):
                        g[i][j] = g[j][i]
                solver = _SymmetricSolver(g)
                t = solver.solve([_dot3(e, r) for e in edges])
                # One step of iterative refinement: the normal equations square the face's condition number.
                diff = _sum([edges[j] * t[j] for j in range(size - 1)]) - r
                t = [tj - dj for tj, dj in zip(t, solver.solve([_dot3(e, diff) for e in edges]))]
                w_face = [1.0 - _sum(t), *t]
                inside = ~solver.flat
                for wj in w_face:
                    inside = inside & (wj >= _INSIDE)
                diff = _sum([base] + [edges[j] * t[j] for j in range(size - 1)]) - h
                d = _dot3(diff, diff)
            d = torch.where(inside, d, inf)
            better = d < best_d
            best_d = torch.where(better, d, best_d)
            in_face = dict(zip(face, w_face))
            best_w = [torch.where(better, in_face.get(i, zero), best_w[i]) for i in range(n)]
    # Rounding can leave a coordinate a hair below 0: clamp and renormalise, so the weights are a convex weighting.
    best_w = [w.clamp(min=0.0) for w in best_w]
    total = _sum(best_w)
    best_w = [w / total for w in best_w]
    image = _sum([c[i] * best_w[i] for i in range(n)])
    return image, torch.stack(best_w)


def oracle_convex(cands: torch.Tensor, hr: torch.Tensor, *, chunk_rows: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """ORACLE (looks at HR): per pixel, the point of the members' convex hull in RGB nearest to HR.

    Weights ``w >= 0`` with ``sum w = 1``, one vector per pixel shared by the three channels (as the learned
    heads' weights are), minimising the Euclidean RGB distance ``||sum_i w_i c_i - h||``. Exact: for every
    non-empty subset (face) of at most 4 members -- more points are affinely dependent in 3-D and covered by
    their sub-faces -- h is projected onto the face's affine hull (``p = c0 + sum_j t_j (c_j - c0)``, the normal
    equations solved per pixel by Cramer's rule); the projection counts only if the face is not flat and every
    barycentric coordinate is >= -1e-12; the nearest counted point wins (vertices always count). The optimum lies
    in the relative interior of some affinely independent face, where it is that face's projection, so the minimum
    over faces is the minimum over the hull. Ties: fewest members, then lowest indices.

    ``cands`` (N, 3, H, W) with N <= 5, ``hr`` (3, H, W), on the [0, 1] scale. Returns (image (3, H, W) float64,
    weights (N, H, W) float64; tiny negative coordinates clamped to 0 and the weights renormalised, the image is
    ``sum_i w_i c_i`` of those weights). Rows are processed in chunks of about 2^18 pixels (or ``chunk_rows``
    rows) to bound memory; the result does not depend on the chunking.
    """
    c, h = _pair(cands, hr)
    n, _, height, width = c.shape
    if n > MAX_CONVEX_MEMBERS:
        raise ValueError(f"the convex oracle supports at most {MAX_CONVEX_MEMBERS} members, got {n}")
    image = torch.empty((3, height, width), dtype=torch.float64)
    weights = torch.empty((n, height, width), dtype=torch.float64)
    for r0, r1 in _row_chunks(height, width, chunk_rows):
        img, w = _convex_chunk(c[:, :, r0:r1].reshape(n, 3, -1), h[:, r0:r1].reshape(3, -1))
        image[:, r0:r1] = img.reshape(3, r1 - r0, width)
        weights[:, r0:r1] = w.reshape(n, r1 - r0, width)
    return image, weights


def oracle_convex_luma(cands: torch.Tensor, hr: torch.Tensor, *, chunk_rows: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """ORACLE (looks at HR): per pixel, a convex weighting whose BT.601 luma is nearest to HR's.

    The luma of ``sum_i w_i c_i`` is ``sum_i w_i Y_i``, so the reachable lumas are ``[min_i Y_i, max_i Y_i]`` and
    the nearest is HR's luma clamped to that interval: the exact per-pixel bound of PSNR-Y (before 8-bit
    rounding) over every per-pixel convex weighting. The weighting is not unique; this one mixes only the members
    of lowest and highest luma (lowest indices on ties). Same arguments and returns as :func:`oracle_convex`.
    """
    c, h = _pair(cands, hr)
    n, _, height, width = c.shape
    image = torch.empty((3, height, width), dtype=torch.float64)
    weights = torch.empty((n, height, width), dtype=torch.float64)

    def luma(x: torch.Tensor) -> torch.Tensor:
        return x[0] * _LUMA[0] + x[1] * _LUMA[1] + x[2] * _LUMA[2]

    for r0, r1 in _row_chunks(height, width, chunk_rows):
        cc, hc = c[:, :, r0:r1], h[:, r0:r1]
        ys = [luma(cc[i]) for i in range(n)]
        y_h = luma(hc)
        lo_y, hi_y = ys[0], ys[0]
        lo_i = hi_i = torch.zeros(ys[0].shape, dtype=torch.int64)
        for i in range(1, n):
            below, above = ys[i] < lo_y, ys[i] > hi_y
            lo_y, lo_i = torch.where(below, ys[i], lo_y), torch.where(below, i, lo_i)
            hi_y, hi_i = torch.where(above, ys[i], hi_y), torch.where(above, i, hi_i)
        span = hi_y - lo_y
        # weight on the highest-luma member; 0 where all lumas are equal (then the lowest-luma member alone)
        t = torch.where(span > 0, ((y_h - lo_y) / torch.where(span > 0, span, 1.0)).clamp(0.0, 1.0), 0.0)
        members = torch.arange(n).view(n, 1, 1)
        w = torch.where(members == hi_i, t, 0.0) + torch.where(members == lo_i, 1.0 - t, 0.0)
        weights[:, r0:r1] = w
        image[:, r0:r1] = _sum([cc[i] * w[i] for i in range(n)])
    return image, weights

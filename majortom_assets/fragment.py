"""Algorithm 1 of the Major TOM embeddings paper: where the fragments of a cell image lie.

Per axis, with image side s_I, fragment side s_f and target overlap fraction o_t:
n = max(1, round((s_I - s_f) / (s_f - s_f*o_t))) segments, s_o = ceil(s_f - (s_I - s_f)/n) pixels of
overlap, stride = s_f - s_o, and n + 1 fragments at offsets i*stride (the paper's loop is off by one;
the published 25 / 9 fragments per cell need n + 1). With border_shift the last offset becomes
s_I - s_f so the far border is covered. ``round`` is round-half-to-even, like the reference's
``np.round``. Axes are independent, so non-square images are supported.

Fragments are either zero-copy views (``fragment_views``) or one batched copy (``gather_fragments``).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class FragmentLayout:
    """Pixel boxes of all fragments of an image, row-major over (fragment row i, fragment col j)."""

    image_size: tuple[int, int]
    fragment_size: int
    target_overlap: float
    border_shift: bool
    row_offsets: np.ndarray
    col_offsets: np.ndarray
    boxes: np.ndarray  # (N, 4) int64 [row_start, col_start, row_end, col_end]
    index: np.ndarray  # (N, 2) int64 (i, j)

    @property
    def count(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Fragments per axis: (rows, cols)."""
        return int(self.row_offsets.size), int(self.col_offsets.size)

    @property
    def central(self) -> int:
        """Position in ``boxes`` of the fragment that holds the image centre (used for PCA maps).

        Per axis it is the fragment whose own centre is nearest the image centre (the lower index on
        a tie), which always contains the centre; for an odd count it is the middle index.
        """
        s = self.fragment_size

        def nearest(offsets: np.ndarray, side: int) -> int:
            # twice the distances keeps everything in integers: |2*o + s - side|
            return int(np.argmin(np.abs(2 * offsets + s - side)))

        i = nearest(self.row_offsets, self.image_size[0])
        j = nearest(self.col_offsets, self.image_size[1])
        return i * self.col_offsets.size + j


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer number of pixels, got {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{what} must be a positive integer number of pixels, got {int(value)}")
    return int(value)


def _check_overlap(target_overlap: object) -> float:
    if isinstance(target_overlap, (bool, np.bool_)) or not isinstance(target_overlap, numbers.Real):
        raise TypeError(f"target_overlap must be a fraction in [0, 1), got {target_overlap!r}")
    o = float(target_overlap)
    if not (0.0 <= o < 1.0):
        raise ValueError(f"target_overlap must be a fraction in [0, 1), got {o}")
    return o


def _check_border_shift(border_shift: object) -> bool:
    if not isinstance(border_shift, (bool, np.bool_)):
        raise TypeError(f"border_shift must be True or False, got {border_shift!r}")
    return bool(border_shift)


@functools.lru_cache(maxsize=256)
def _offsets(image_side: int, fragment_side: int, target_overlap: float, border_shift: bool) -> np.ndarray:
    if image_side == fragment_side:
        out = np.zeros(1, dtype=np.int64)
    else:
        span = image_side - fragment_side
        segments = max(1, round(span / (fragment_side - fragment_side * target_overlap)))
        # ceil(s_f - span/n) == s_f - floor(span/n) for integer s_f, so stride = span // n exactly
        overlap_px = fragment_side - span // segments
        stride = fragment_side - overlap_px
        if stride < 1:
            raise ValueError(
                f"target_overlap {target_overlap} leaves no stride between {fragment_side} px fragments of a "
                f"{image_side} px image ({segments + 1} fragments would repeat the same offset); lower it"
            )
        out = np.arange(segments + 1, dtype=np.int64) * stride
        if border_shift:
            out[-1] = span
    out.flags.writeable = False
    return out


def fragment_offsets(
    image_side: int, fragment_side: int, target_overlap: float = 0.1, border_shift: bool = True
) -> np.ndarray:
    """Start offsets (int64, read-only) of the fragments along one image axis."""
    image_side = _positive_int(image_side, "image side")
    fragment_side = _positive_int(fragment_side, "fragment side")
    target_overlap = _check_overlap(target_overlap)
    border_shift = _check_border_shift(border_shift)
    if image_side < fragment_side:
        raise ValueError(
            f"image side {image_side} px is smaller than the fragment size {fragment_side} px; "
            "fragments cannot be cut from it"
        )
    return _offsets(image_side, fragment_side, target_overlap, border_shift)


@functools.lru_cache(maxsize=64)
def _layout(height: int, width: int, size: int, target_overlap: float, border_shift: bool) -> FragmentLayout:
    rows = fragment_offsets(height, size, target_overlap, border_shift)
    cols = fragment_offsets(width, size, target_overlap, border_shift)
    ii, jj = np.meshgrid(np.arange(rows.size), np.arange(cols.size), indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.int64)
    r0 = rows[index[:, 0]]
    c0 = cols[index[:, 1]]
    boxes = np.stack([r0, c0, r0 + size, c0 + size], axis=1).astype(np.int64)
    for arr in (index, boxes):
        arr.flags.writeable = False
    return FragmentLayout((height, width), size, target_overlap, border_shift, rows, cols, boxes, index)


def fragment_layout(
    height: int, width: int, fragment_size: int, target_overlap: float = 0.1, border_shift: bool = True
) -> FragmentLayout:
    """Layout of all fragments of a height x width image (cached; arrays are read-only)."""
    height = _positive_int(height, "image height")
    width = _positive_int(width, "image width")
    fragment_size = _positive_int(fragment_size, "fragment size")
    target_overlap = _check_overlap(target_overlap)
    border_shift = _check_border_shift(border_shift)
    if height < fragment_size or width < fragment_size:
        raise ValueError(
            f"image of {height}x{width} px is smaller than the fragment size {fragment_size} px; "
            "fragments cannot be cut from it"
        )
    return _layout(height, width, fragment_size, target_overlap, border_shift)


def _check_image(image: np.ndarray, layout: FragmentLayout) -> None:
    if image.ndim < 2 or tuple(image.shape[-2:]) != tuple(layout.image_size):
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not match the layout's image size "
            f"{layout.image_size[0]}x{layout.image_size[1]} (expected (..., H, W))"
        )


def fragment_views(image: np.ndarray, layout: FragmentLayout) -> list[np.ndarray]:
    """Each fragment of an (..., H, W) array as a view: no pixel is copied."""
    _check_image(image, layout)
    return [image[..., r0:r1, c0:c1] for r0, c0, r1, c1 in layout.boxes.tolist()]


def gather_fragments(image: np.ndarray, layout: FragmentLayout, out: np.ndarray | None = None) -> np.ndarray:
    """Copy every fragment of a (..., H, W) image into one (N, ..., s, s) array (``out`` if given).

    ``out`` may have another dtype reachable by numpy's ``same_kind`` casting (e.g. float32 for
    uint16 pixels), which saves a second pass for the conversion.
    """
    image = np.asarray(image)
    _check_image(image, layout)
    s = layout.fragment_size
    shape = (layout.count, *image.shape[:-2], s, s)
    if out is None:
        out = np.empty(shape, dtype=image.dtype)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape} for {layout.count} fragments")
    elif not np.can_cast(image.dtype, out.dtype, casting="same_kind"):
        raise ValueError(f"cannot copy {image.dtype} pixels into an out array of dtype {out.dtype}")
    # one strided block copy per fragment: memory-bound, no slower than fancy indexing (see benchmarks)
    for k, (r0, c0, r1, c1) in enumerate(layout.boxes.tolist()):
        np.copyto(out[k], image[..., r0:r1, c0:c1], casting="same_kind")
    return out


def coverage(layout: FragmentLayout) -> np.ndarray:
    """How many fragments cover each pixel (H, W int32); zero anywhere means pixels are left out."""
    counts = np.zeros(layout.image_size, dtype=np.int32)
    for r0, c0, r1, c1 in layout.boxes.tolist():
        counts[r0:r1, c0:c1] += 1
    return counts


def overlap_pixels(image_side: int, fragment_side: int, target_overlap: float = 0.1) -> int:
    """The adjusted overlap s_o in pixels (0 for a single fragment); for logs and docs."""
    offsets = fragment_offsets(image_side, fragment_side, target_overlap, border_shift=False)
    if offsets.size < 2:
        return 0
    return int(fragment_side - offsets[1])


__all__ = [
    "FragmentLayout",
    "coverage",
    "fragment_layout",
    "fragment_offsets",
    "fragment_views",
    "gather_fragments",
    "overlap_pixels",
]

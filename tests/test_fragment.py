"""Fragment tests: expected offsets come from Algorithm 1 (STANDARD.md §3) evaluated here by hand,
coverage from a numpy accumulator, and gathered pixels from plain slicing."""

import math

import numpy as np
import pytest

from majortom_assets.fragment import (
    FragmentLayout,
    coverage,
    fragment_layout,
    fragment_offsets,
    fragment_views,
    gather_fragments,
    overlap_pixels,
)


def algorithm1(s_i: int, s_f: int, o_t: float, border_shift: bool) -> list[int]:
    """STANDARD.md §3 written out literally (float ceil, n + 1 offsets)."""
    if s_i == s_f:
        return [0]
    n = max(1, round((s_i - s_f) / (s_f - s_f * o_t)))
    s_o = math.ceil(s_f - (s_i - s_f) / n)
    stride = s_f - s_o
    offsets = [i * stride for i in range(n + 1)]
    if border_shift:
        offsets[-1] = s_i - s_f
    return offsets


def test_published_counts_224():
    offsets = fragment_offsets(1068, 224, 0.1)
    assert offsets.tolist() == [0, 211, 422, 633, 844]
    layout = fragment_layout(1068, 1068, 224, 0.1)
    assert layout.count == 25 and layout.grid_shape == (5, 5)
    assert overlap_pixels(1068, 224, 0.1) == 13


def test_published_counts_384():
    assert fragment_offsets(1068, 384, 0.1).tolist() == [0, 342, 684]
    layout = fragment_layout(1068, 1068, 384, 0.1)
    assert layout.count == 9
    assert overlap_pixels(1068, 384, 0.1) == 42


SIDES = [
    (s_i, s_f)
    for s_f in (224, 384)
    for s_i in (224, 225, 300, 447, 448, 500, 777, 1000, 1001, 1068, 2000)
    if s_i >= s_f
]


@pytest.mark.parametrize("s_i, s_f", SIDES)
@pytest.mark.parametrize("o_t", [0.0, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("shift", [True, False])
def test_offsets_follow_algorithm1(s_i, s_f, o_t, shift):
    assert fragment_offsets(s_i, s_f, o_t, shift).tolist() == algorithm1(s_i, s_f, o_t, shift)


@pytest.mark.parametrize("size, frag", [(1068, 224), (1068, 384), (1001, 224), (700, 256), (512, 512)])
def test_every_pixel_is_covered(size, frag):
    layout = fragment_layout(size, size, frag, 0.1)
    acc = np.zeros((size, size), dtype=np.int64)
    for r0, c0, r1, c1 in layout.boxes:
        assert 0 <= r0 < r1 <= size and 0 <= c0 < c1 <= size
        assert r1 - r0 == frag and c1 - c0 == frag
        acc[r0:r1, c0:c1] += 1
    assert acc.min() >= 1
    assert np.array_equal(coverage(layout), acc)


def test_whole_image_is_one_fragment():
    layout = fragment_layout(224, 224, 224)
    assert layout.count == 1
    assert layout.boxes.tolist() == [[0, 0, 224, 224]]
    assert layout.central == 0
    img = np.arange(3 * 224 * 224, dtype=np.uint16).reshape(3, 224, 224)
    (view,) = fragment_views(img, layout)
    assert np.shares_memory(view, img) and np.array_equal(view, img)


def test_image_smaller_than_fragment_names_both_sizes():
    with pytest.raises(ValueError, match=r"image side 100 px is smaller than the fragment size 224 px"):
        fragment_offsets(100, 224)
    with pytest.raises(ValueError, match=r"1068x200 px is smaller than the fragment size 224"):
        fragment_layout(1068, 200, 224)


def test_border_shift_matters_when_stride_does_not_divide():
    # 1001 / 224: n = 4, stride = floor(777 / 4) = 194, so unshifted fragments end at 776 + 224 = 1000
    assert fragment_offsets(1001, 224, 0.1, border_shift=False).tolist() == [0, 194, 388, 582, 776]
    assert fragment_offsets(1001, 224, 0.1, border_shift=True).tolist() == [0, 194, 388, 582, 777]
    unshifted = coverage(fragment_layout(1001, 1001, 224, 0.1, border_shift=False))
    shifted = coverage(fragment_layout(1001, 1001, 224, 0.1, border_shift=True))
    assert unshifted[-1, :].max() == 0 and unshifted[:, -1].max() == 0  # last row and column left out
    assert shifted.min() >= 1
    # where the stride divides evenly both agree
    assert np.array_equal(fragment_offsets(1068, 224, 0.1, False), fragment_offsets(1068, 224, 0.1, True))


def test_non_square_images_use_independent_axes():
    layout = fragment_layout(600, 1068, 224, 0.1)
    assert layout.row_offsets.tolist() == algorithm1(600, 224, 0.1, True)
    assert layout.col_offsets.tolist() == algorithm1(1068, 224, 0.1, True)
    n_rows, n_cols = len(layout.row_offsets), len(layout.col_offsets)
    assert layout.count == n_rows * n_cols and layout.grid_shape == (n_rows, n_cols)
    # row-major (i, j) order and boxes built from the per-axis offsets
    for k, (i, j) in enumerate(layout.index.tolist()):
        assert k == i * n_cols + j
        r0, c0 = layout.row_offsets[i], layout.col_offsets[j]
        assert layout.boxes[k].tolist() == [r0, c0, r0 + 224, c0 + 224]
    assert coverage(layout).min() >= 1
    # one axis may equal the fragment size
    tall = fragment_layout(224, 1068, 224)
    assert tall.row_offsets.tolist() == [0] and tall.count == 5


def test_layout_fields_and_dtypes():
    layout = fragment_layout(1068, 1068, 224, 0.1)
    assert isinstance(layout, FragmentLayout)
    assert layout.image_size == (1068, 1068) and layout.fragment_size == 224
    assert layout.target_overlap == 0.1 and layout.border_shift is True
    for arr in (layout.row_offsets, layout.col_offsets, layout.boxes, layout.index):
        assert arr.dtype == np.int64 and not arr.flags.writeable
    assert layout.boxes.shape == (25, 4) and layout.index.shape == (25, 2)


@pytest.mark.parametrize(
    "h, w, frag, expected_ij", [(1068, 1068, 224, (2, 2)), (1068, 1068, 384, (1, 1)), (600, 1068, 224, None)]
)
def test_central_fragment_contains_the_centre(h, w, frag, expected_ij):
    layout = fragment_layout(h, w, frag, 0.1)
    r0, c0, r1, c1 = layout.boxes[layout.central]
    assert r0 <= h / 2 <= r1 and c0 <= w / 2 <= c1
    if expected_ij is not None:
        assert tuple(layout.index[layout.central]) == expected_ij
        assert layout.central == layout.count // 2


def test_views_share_memory_and_match_slices():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 10_000, size=(4, 1068, 1068), dtype=np.uint16)
    layout = fragment_layout(1068, 1068, 224)
    views = fragment_views(img, layout)
    assert len(views) == 25
    for view, (r0, c0, r1, c1) in zip(views, layout.boxes.tolist()):
        assert np.shares_memory(view, img)
        assert view.base is not None
        assert np.array_equal(view, img[:, r0:r1, c0:c1])
    # 2-D images too
    assert np.shares_memory(fragment_views(img[0], layout)[7], img)


def test_gather_equals_slicing_and_can_cast_into_out():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 10_000, size=(13, 1068, 1068), dtype=np.uint16)
    layout = fragment_layout(1068, 1068, 224)
    batch = gather_fragments(img, layout)
    assert batch.shape == (25, 13, 224, 224) and batch.dtype == np.uint16
    assert not np.shares_memory(batch, img)
    for k, (r0, c0, r1, c1) in enumerate(layout.boxes.tolist()):
        assert np.array_equal(batch[k], img[:, r0:r1, c0:c1])
    out = np.full((25, 13, 224, 224), -1.0, dtype=np.float32)
    returned = gather_fragments(img, layout, out=out)
    assert returned is out
    assert np.array_equal(out, batch.astype(np.float32))


def test_gather_and_views_reject_mismatched_arrays():
    layout = fragment_layout(1068, 1068, 224)
    img = np.zeros((3, 1000, 1068), dtype=np.uint16)
    with pytest.raises(ValueError, match=r"\(3, 1000, 1068\).*1068x1068"):
        gather_fragments(img, layout)
    with pytest.raises(ValueError, match="1068x1068"):
        fragment_views(img, layout)
    good = np.zeros((3, 1068, 1068), dtype=np.float32)
    with pytest.raises(ValueError, match=r"out has shape \(25, 3, 224, 223\)"):
        gather_fragments(good, layout, out=np.empty((25, 3, 224, 223), dtype=np.float32))
    with pytest.raises(ValueError, match="float32 pixels into an out array of dtype uint8"):
        gather_fragments(good, layout, out=np.empty((25, 3, 224, 224), dtype=np.uint8))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_side": 1068, "fragment_side": 0}, ValueError, "fragment side must be a positive integer"),
        ({"image_side": -5, "fragment_side": 224}, ValueError, "image side must be a positive integer"),
        ({"image_side": 1068.0, "fragment_side": 224}, TypeError, "image side must be a positive integer"),
        ({"image_side": True, "fragment_side": 224}, TypeError, "image side"),
        (
            {"image_side": 1068, "fragment_side": 224, "target_overlap": 1.0},
            ValueError,
            r"fraction in \[0, 1\)",
        ),
        ({"image_side": 1068, "fragment_side": 224, "target_overlap": -0.1}, ValueError, "target_overlap"),
        ({"image_side": 1068, "fragment_side": 224, "target_overlap": "0.1"}, TypeError, "target_overlap"),
        (
            {"image_side": 1068, "fragment_side": 224, "border_shift": 1},
            TypeError,
            "border_shift must be True",
        ),
        ({"image_side": 234, "fragment_side": 10, "target_overlap": 0.99}, ValueError, "no stride"),
    ],
)
def test_argument_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        fragment_offsets(**kwargs)


def test_numpy_integer_sizes_are_accepted_and_layouts_are_cached():
    a = fragment_layout(np.int64(1068), np.int32(1068), np.int16(224))
    assert a is fragment_layout(1068, 1068, 224)

"""Turning three PCA scores per cell into colours and an equirectangular world map (paper Fig. 4).

Kept free of I/O on embeddings: inputs are per-cell score arrays, outputs are pixels and files.

The map is drawn on a light neutral background with a faint 30° graticule (no coastline data is
available offline, so the graticule is the only geographic reference). A 10 km cell is about half a
pixel wide on a 2048 px world, so cells are drawn as square markers that grow when there are few of
them; where a cell's true footprint is larger than its marker (zoomed views) the footprint is painted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from majortom_assets import geoparquet
from majortom_assets.grid import EARTH_RADIUS_KM

BACKGROUND = (236, 236, 232)
GRATICULE = (212, 212, 207)
GRATICULE_MAJOR = (190, 190, 185)  # equator and prime meridian
OUTLINE = (60, 60, 60)
_KM_PER_DEG = EARTH_RADIUS_KM * math.pi / 180.0
_MAX_RECT_PIXELS = 1 << 22  # pixels painted per vectorised batch (bounds temporary memory)


def colour_scale(scores: np.ndarray, low_pct: float = 2.0, high_pct: float = 98.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, gain) per component that `apply_colour_scale` turns scores into colours with.

    Each component is scaled robustly (its [low_pct, high_pct] percentile range maps to [0, 1], so
    a few outliers cannot wash out the map), then every channel gets a gain so its mean intensity
    equals the mean over the three channels, as the paper does so no colour dominates the map.
    Kept apart from applying it so a global map can fix the scale once and colour rows later.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 3:
        raise ValueError(f"expected (N, 3) scores, got shape {s.shape}")
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}")
    if len(s) == 0:
        return np.zeros(3), np.ones(3), np.ones(3)
    lo, hi = np.percentile(s, [low_pct, high_pct], axis=0)
    v = _unit(s, lo, hi)
    means = v.mean(axis=0)
    target = means.mean()
    gain = np.divide(target, means, out=np.ones(3), where=means > 0)
    return lo, hi, gain


def _unit(s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    span = np.where(hi > lo, hi - lo, 1.0)
    v = np.clip((s - lo) / span, 0.0, 1.0)
    v[:, hi <= lo] = 0.5
    return v


def apply_colour_scale(scores: np.ndarray, lo: np.ndarray, hi: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """(N, 3) scores -> (N, 3) uint8 with a fixed scale from `colour_scale`."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1, 3)
    v = np.clip(_unit(s, np.asarray(lo, np.float64), np.asarray(hi, np.float64)) * np.asarray(gain), 0.0, 1.0)
    return np.rint(v * 255.0).astype(np.uint8)


def scores_to_rgb(scores: np.ndarray, low_pct: float = 2.0, high_pct: float = 98.0) -> np.ndarray:
    """(N, 3) scores -> (N, 3) uint8, scaled by their own `colour_scale`."""
    s = np.asarray(scores, dtype=np.float64)
    lo, hi, gain = colour_scale(s, low_pct, high_pct)
    if len(s) == 0:
        return np.zeros((0, 3), np.uint8)
    return apply_colour_scale(s, lo, hi, gain)


def lonlat_to_pixel(lon: np.ndarray, lat: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Equirectangular pixel (x, y) of each point; the map spans [-180, 180] × [-90, 90]."""
    x = np.floor((np.asarray(lon, dtype=np.float64) + 180.0) / 360.0 * width).astype(np.int64)
    y = np.floor((90.0 - np.asarray(lat, dtype=np.float64)) / 180.0 * height).astype(np.int64)
    return np.clip(x, 0, width - 1), np.clip(y, 0, height - 1)


@dataclass(frozen=True)
class Window:
    """A lon/lat rectangle drawn equirectangularly; `east` may exceed 180 to cross the antimeridian."""

    west: float
    south: float
    east: float
    north: float

    def __post_init__(self) -> None:
        if not (self.east > self.west and self.east - self.west <= 360.0):
            raise ValueError(f"window needs west < east <= west + 360, got {self.west}, {self.east}")
        if not (-90.0 <= self.south < self.north <= 90.0):
            raise ValueError(f"window needs -90 <= south < north <= 90, got {self.south}, {self.north}")

    @property
    def is_world(self) -> bool:
        return (self.west, self.south, self.east, self.north) == (-180.0, -90.0, 180.0, 90.0)

    @property
    def display_aspect(self) -> float:
        """Width / height that keeps shapes undistorted at the window's middle latitude."""
        mid = math.radians((self.south + self.north) / 2.0)
        return (self.east - self.west) * max(math.cos(mid), 0.05) / (self.north - self.south)

    def unwrap(self, lon: np.ndarray) -> np.ndarray:
        """Longitudes moved into [west, west + 360) so windows across the antimeridian are continuous."""
        return self.west + np.mod(np.asarray(lon, dtype=np.float64) - self.west, 360.0)

    def to_pixel(self, lon: np.ndarray, lat: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Continuous (x, y) pixel coordinates; floor gives the pixel a point falls in."""
        lon = np.asarray(lon, dtype=np.float64) if self.is_world else self.unwrap(lon)
        x = (lon - self.west) / (self.east - self.west) * width
        y = (self.north - np.asarray(lat, dtype=np.float64)) / (self.north - self.south) * height
        return x, y


WORLD = Window(-180.0, -90.0, 180.0, 90.0)


def cell_half_extent_deg(lat: np.ndarray, spacing_km: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(half width, half height) in degrees of a grid cell of `spacing_km` at each latitude."""
    half_lat = spacing_km / 2.0 / _KM_PER_DEG
    coslat = np.maximum(np.cos(np.radians(np.asarray(lat, dtype=np.float64))), 1e-3)
    return np.minimum(half_lat / coslat, 180.0), np.full(np.shape(lat), half_lat)


def marker_size(n_cells: int, width: int, minimum: int = 3) -> int:
    """Side in px of a cell's marker: about width / (60 * n^(1/4)), between `minimum` and ~1% of width.

    A handful of cells on a 2048 px world get 20 px squares, a thousand ~6 px, a dense global map
    the minimum (cells are then adjacent anyway).
    """
    if minimum < 1:
        raise ValueError(f"marker size must be >= 1, got {minimum}")
    largest = max(minimum, width // 100)
    ideal = width / (60.0 * max(n_cells, 1) ** 0.25)
    return int(min(max(round(ideal), minimum), largest))


def _fill_rects(image: np.ndarray, x0, y0, x1, y1, colours: np.ndarray, wrap: bool,
                mask: np.ndarray | None = None) -> None:
    """Paint half-open pixel rectangles [x0, x1) × [y0, y1), later ones over earlier ones.

    Every pixel of every rectangle is enumerated with repeat/arange (no per-cell Python loop), in
    batches of at most _MAX_RECT_PIXELS. With `wrap`, x runs modulo the width (antimeridian).
    """
    h, w = image.shape[:2]
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    if wrap:
        x1 = np.minimum(x1, x0 + w)
    else:
        x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    rw, rh = np.maximum(x1 - x0, 0), np.maximum(y1 - y0, 0)
    area = rw * rh
    colours = np.broadcast_to(np.asarray(colours, np.uint8), (len(area), 3))
    ends = np.cumsum(area)
    first = 0
    while first < len(area):
        last = int(np.searchsorted(ends, (ends[first - 1] if first else 0) + _MAX_RECT_PIXELS, "right"))
        last = max(last, first + 1)
        part = slice(first, last)
        counts = area[part]
        total = int(counts.sum())
        if total:
            owner = np.repeat(np.arange(first, last), counts)
            local = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            xs = x0[owner] + local % rw[owner]
            ys = y0[owner] + local // rw[owner]
            if wrap:
                xs %= w
            image[ys, xs] = colours[owner]
            if mask is not None:
                mask[ys, xs] = True
        first = last


def _graticule_lines(lo: float, hi: float, step: float) -> np.ndarray:
    return np.arange(math.ceil(lo / step), math.floor(hi / step) + 1) * step


def nice_step(span_deg: float, lines: int = 3) -> float:
    """A round graticule spacing (1, 2 or 5 × 10^k degrees, at most 30) giving about `lines` lines."""
    raw = span_deg / max(lines, 1)
    base = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return min(step, 30.0)


def _canvas(window: Window, width: int, height: int, graticule_deg: float | None,
            background: tuple[int, int, int]) -> np.ndarray:
    """Background with a faint graticule (equator and prime meridian a little darker), via Pillow."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), background)
    if graticule_deg:
        draw = ImageDraw.Draw(canvas)
        lons = _graticule_lines(window.west, window.east, graticule_deg)
        lats = _graticule_lines(window.south, window.north, graticule_deg)
        xs, _ = window.to_pixel(lons, np.zeros_like(lons), width, height) if len(lons) else ([], [])
        _, ys = window.to_pixel(np.full_like(lats, window.west), lats, width, height) if len(lats) else ([], [])
        for value, x in zip(lons, xs):
            px = min(math.floor(x), width - 1)
            major = math.isclose(math.remainder(value, 360.0), 0.0, abs_tol=1e-9)
            draw.line([(px, 0), (px, height - 1)], fill=GRATICULE_MAJOR if major else GRATICULE)
        for value, y in zip(lats, ys):
            py = min(math.floor(y), height - 1)
            draw.line([(0, py), (width - 1, py)], fill=GRATICULE_MAJOR if value == 0 else GRATICULE)
    return np.asarray(canvas).copy()


def render_window(
    lon: np.ndarray, lat: np.ndarray, rgb: np.ndarray, window: Window, width: int, height: int,
    marker_px: int = 3, *, adaptive: bool = True, spacing_km: float = 10.0,
    graticule_deg: float | None = 30.0, background: tuple[int, int, int] = BACKGROUND,
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image of `window` and (H, W) mask of the pixels painted with a cell's colour.

    Each cell is the larger of its marker (side `marker_size(...)` when `adaptive`, else
    `marker_px`) and its true footprint at this scale. Markers of 4 px or more get a dark 1 px
    outline (not in the mask) so pale colours stand out from the background. The `marker_px`
    square on the cell's own pixel is painted last, so a cell whose pixel no other cell shares
    always shows its own colour there, however much the grown markers overlap.
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    rgb = np.asarray(rgb)
    if lon.shape != lat.shape or lon.ndim != 1 or rgb.shape != (len(lon), 3):
        raise ValueError(f"expected lon, lat of shape (N,) and rgb (N, 3), got {lon.shape}, {lat.shape}, {rgb.shape}")
    if marker_px < 1:
        raise ValueError(f"marker_px must be >= 1, got {marker_px}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rgb = rgb.astype(np.uint8, copy=False)
    image = _canvas(window, width, height, graticule_deg, background)
    mask = np.zeros((height, width), bool)
    if len(lon) == 0:
        return image, mask
    wrap = window.is_world
    fx, fy = window.to_pixel(lon, lat, width, height)
    if wrap:  # the exact pixel convention of lonlat_to_pixel (clipped at the map's edges)
        px, py = lonlat_to_pixel(lon, lat, width, height)
    else:
        px, py = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    side = marker_size(len(lon), width, marker_px) if adaptive else marker_px
    half_w, half_h = cell_half_extent_deg(lat, spacing_km)
    # footprint relative to the centre, so a cell straddling a window edge is not split by unwrapping
    dx = half_w * width / (window.east - window.west)
    dy = half_h * height / (window.north - window.south)
    ex0, ex1 = np.floor(fx - dx).astype(np.int64), np.ceil(fx + dx).astype(np.int64)
    ey0, ey1 = np.floor(fy - dy).astype(np.int64), np.ceil(fy + dy).astype(np.int64)
    mx0, my0 = px - side // 2, py - side // 2
    use_x, use_y = (ex1 - ex0) > side, (ey1 - ey0) > side
    x0, x1 = np.where(use_x, ex0, mx0), np.where(use_x, ex1, mx0 + side)
    y0, y1 = np.where(use_y, ey0, my0), np.where(use_y, ey1, my0 + side)
    big = ((x1 - x0) >= 4) & ((y1 - y0) >= 4)
    if big.any():
        _fill_rects(image, x0[big] - 1, y0[big] - 1, x1[big] + 1, y1[big] + 1, OUTLINE, wrap)
    _fill_rects(image, x0, y0, x1, y1, rgb, wrap, mask)
    if side > marker_px or use_x.any() or use_y.any():  # otherwise the fills above were the cores
        cx0, cy0 = px - marker_px // 2, py - marker_px // 2
        _fill_rects(image, cx0, cy0, cx0 + marker_px, cy0 + marker_px, rgb, wrap, mask)
    return image, mask


def render_map(
    lon: np.ndarray, lat: np.ndarray, rgb: np.ndarray, width: int = 2048, height: int = 1024,
    marker_px: int = 3, *, adaptive: bool = True, spacing_km: float = 10.0,
    graticule_deg: float | None = 30.0, background: tuple[int, int, int] = BACKGROUND,
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 equirectangular world and (H, W) bool mask of the cells' pixels.

    `marker_px` is the smallest marker (the cell's own pixel block); with `adaptive` the marker
    grows for sparse maps (`marker_size`) so a few cells stay visible. Markers wrap across the
    antimeridian. See `render_window` for the drawing rules.
    """
    return render_window(lon, lat, rgb, WORLD, width, height, marker_px, adaptive=adaptive,
                         spacing_km=spacing_km, graticule_deg=graticule_deg, background=background)


def data_window(lon: np.ndarray, lat: np.ndarray, spacing_km: float = 10.0, pad: float = 0.15,
                min_cells: float = 6.0, aspect: tuple[float, float] = (1.0, 2.0)) -> Window:
    """Smallest window around the points (plus margin), crossing the antimeridian when that is shorter.

    The longitude span is the circle minus its largest gap between consecutive points, so cells at
    179.9°E and 179.9°W give a 0.2° window, not 360°. The window is padded by `pad` of its size and at
    least one cell, spans at least `min_cells` cells, and is widened on its short side so its
    display aspect (width/height, see `Window.display_aspect`) lies within `aspect`.
    """
    lon = np.mod(np.asarray(lon, dtype=np.float64) + 180.0, 360.0) - 180.0
    lat = np.asarray(lat, dtype=np.float64)
    if lon.size == 0:
        raise ValueError("no cells to frame")
    order = np.sort(lon)
    gaps = np.append(np.diff(order), order[0] + 360.0 - order[-1])
    widest = int(np.argmax(gaps))
    west, east = order[(widest + 1) % len(order)], order[widest]
    if east < west:  # the widest gap is inside [-180, 180): the cells straddle the antimeridian
        east += 360.0
    south, north = float(lat.min()), float(lat.max())
    cell_h = spacing_km / _KM_PER_DEG
    mid = math.radians((south + north) / 2.0)
    cell_w = min(cell_h / max(math.cos(mid), 1e-3), 360.0)
    half_w = max((east - west) / 2.0 * (1.0 + 2.0 * pad), (east - west) / 2.0 + 1.5 * cell_w, cell_w * min_cells / 2.0)
    half_h = max((north - south) / 2.0 * (1.0 + 2.0 * pad), (north - south) / 2.0 + 1.5 * cell_h,
                 cell_h * min_cells / 2.0)
    cx, cy = (west + east) / 2.0, (south + north) / 2.0
    coslat = max(math.cos(math.radians(cy)), 0.05)
    shape = half_w * coslat / half_h
    if shape < aspect[0]:
        half_w = aspect[0] * half_h / coslat
    elif shape > aspect[1]:
        half_h = half_w * coslat / aspect[1]
    half_w, half_h = min(half_w, 180.0), min(half_h, 90.0)
    cy = min(max(cy, -90.0 + half_h), 90.0 - half_h)
    if half_w >= 180.0:  # cells all round the globe: the whole width (rounding must not exceed 360°)
        return Window(-180.0, float(cy - half_h), 180.0, float(cy + half_h))
    west = cx - half_w
    if west < -180.0:  # keep west in [-180, 180) so east > 180 marks an antimeridian crossing
        west += 360.0
    return Window(float(west), float(cy - half_h), float(west + 2.0 * half_w), float(cy + half_h))


@dataclass(frozen=True)
class Preview:
    """A small map for the UI; `inset` is the zoomed window drawn in a corner, if any."""

    image: np.ndarray
    inset: Window | None
    zoom: float

    def caption(self) -> str:
        h, w = self.image.shape[:2]
        text = f"{w}×{h} preview"
        if self.inset is not None:
            text += f"; inset ×{self.zoom:.0f}: {describe_window(self.inset)}"
        return text


def _lon_text(lon: float) -> str:
    lon = (lon + 180.0) % 360.0 - 180.0
    return f"{abs(lon):.2f}°{'E' if lon >= 0 else 'W'}"


def describe_window(window: Window) -> str:
    south, north = window.south, window.north
    return (f"{_lon_text(window.west)} to {_lon_text(window.east)}, "
            f"{abs(south):.2f}°{'N' if south >= 0 else 'S'} to {abs(north):.2f}°{'N' if north >= 0 else 'S'}")


def _box_on_world(window: Window, width: int, height: int, min_px: int = 10) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of a window on the world map, at least `min_px` wide and high."""
    x0, y0 = WORLD.to_pixel(np.array([window.west]), np.array([window.north]), width, height)
    x1 = x0 + (window.east - window.west) / 360.0 * width
    y1 = y0 + (window.north - window.south) / 180.0 * height
    cx, cy = (x0[0] + x1[0]) / 2.0, (y0[0] + y1[0]) / 2.0
    hw, hh = max((x1[0] - x0[0]) / 2.0, min_px / 2.0), max((y1[0] - y0[0]) / 2.0, min_px / 2.0)
    return int(cx - hw), int(cy - hh), math.ceil(cx + hw), math.ceil(cy + hh)


def render_preview(
    lon: np.ndarray, lat: np.ndarray, rgb: np.ndarray, width: int = 960, height: int = 480,
    marker_px: int = 3, *, min_zoom: float = 3.0, inset_fraction: tuple[float, float] = (0.42, 0.5),
    spacing_km: float = 10.0,
) -> Preview:
    """A world map small enough for the UI, with a zoomed inset when the cells are clustered.

    The world is rendered afresh at the preview size (resampling the full map would shrink 3 px
    markers to blurry sub-pixel dots). The inset frames the cells' extent (`data_window`, across the
    antimeridian if that is shorter) and is added only if it magnifies at least `min_zoom` times,
    i.e. when the cells occupy a small part of the world; a global map gets no inset. It goes in the
    corner that hides the fewest cells, framed, with the framed area outlined on the world and
    joined to it by a line, and is labelled with its bounds.
    """
    from PIL import Image, ImageDraw

    world, _ = render_map(lon, lat, rgb, width, height, marker_px, spacing_km=spacing_km)
    if len(lon) == 0:
        return Preview(world, None, 1.0)
    window = data_window(lon, lat, spacing_km)
    max_w, max_h = int(width * inset_fraction[0]), int(height * inset_fraction[1])
    shape = window.display_aspect
    iw, ih = (max_w, max(round(max_w / shape), 1)) if shape >= max_w / max_h else (
        max(round(max_h * shape), 1), max_h)
    zoom = iw / ((window.east - window.west) / 360.0 * width)
    if zoom < min_zoom:
        return Preview(world, None, 1.0)
    inset, _ = render_window(lon, lat, rgb, window, iw, ih, marker_px, spacing_km=spacing_km,
                             graticule_deg=nice_step(min(window.east - window.west, window.north - window.south)))
    box = _box_on_world(window, width, height, marker_size(len(lon), width, marker_px) + 8)
    margin = 8
    corners = {  # (x, y) of the inset's top-left; southern corners first (least land there)
        "bottom-left": (margin, height - ih - margin), "bottom-right": (width - iw - margin, height - ih - margin),
        "top-left": (margin, margin), "top-right": (width - iw - margin, margin),
    }
    px, py = lonlat_to_pixel(lon, lat, width, height)

    def hidden(corner: tuple[int, int]) -> int:
        x, y = corner
        cells = int(((px >= x) & (px < x + iw) & (py >= y) & (py < y + ih)).sum())
        overlaps_box = box[0] < x + iw and box[2] > x and box[1] < y + ih and box[3] > y
        return cells + (len(lon) + 1) * overlaps_box

    ox, oy = min(corners.values(), key=hidden)
    canvas = Image.fromarray(world, mode="RGB")
    draw = ImageDraw.Draw(canvas)
    links = []
    for shift in (0, -width, width):  # the box may wrap across the antimeridian: join the nearest copy
        x0, x1 = box[0] + shift, box[2] + shift
        draw.rectangle([x0, box[1], x1, box[3]], outline=OUTLINE, width=2)
        target = (ox + iw if x0 >= ox + iw else ox, oy + ih if box[1] >= oy + ih else oy)
        anchor = (min(max(target[0], x0), x1), min(max(target[1], box[1]), box[3]))
        links.append((math.dist(anchor, target), anchor, target))
    _, anchor, target = min(links)
    draw.line([anchor, target], fill=OUTLINE, width=1)
    canvas.paste(Image.fromarray(inset, mode="RGB"), (ox, oy))
    draw.rectangle([ox - 1, oy - 1, ox + iw, oy + ih], outline=OUTLINE, width=2)
    label = describe_window(window)
    text_box = draw.textbbox((ox + 4, oy + ih - 16), label)
    draw.rectangle([text_box[0] - 2, text_box[1] - 2, text_box[2] + 2, text_box[3] + 2], fill=BACKGROUND)
    draw.text((ox + 4, oy + ih - 16), label, fill=OUTLINE)
    return Preview(np.asarray(canvas).copy(), window, zoom)


def write_preview(values_parquet: Path, out_png: Path, width: int = 960, height: int = 480,
                  marker_px: int = 3) -> Preview:
    """Render the UI preview from the values GeoParquet (cell centres and their r, g, b) to a PNG."""
    import pyarrow.parquet as pq

    table = pq.read_table(values_parquet, columns=["centre_lon", "centre_lat", "r", "g", "b"])
    rgb = np.stack([table.column(c).to_numpy() for c in ("r", "g", "b")], axis=1).astype(np.uint8)
    preview = render_preview(table.column("centre_lon").to_numpy(), table.column("centre_lat").to_numpy(),
                             rgb, width, height, marker_px)
    write_png(preview.image, out_png)
    return preview


def write_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with geoparquet.atomic_output(path) as tmp:
        Image.fromarray(image, mode="RGB").save(tmp, format="PNG")
    return path


def write_geotiff(image: np.ndarray, mask: np.ndarray, path: Path) -> Path:
    """EPSG:4326 RGBA GeoTIFF of the map; alpha marks painted pixels, which alone keep their colour.

    Background, graticule and outlines are decoration of the PNG; they are written as 0 so the
    raster holds only cell values (as it did when the map was drawn on black).
    """
    import rasterio
    from affine import Affine

    height, width = mask.shape
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 4, "dtype": "uint8",
        "crs": "EPSG:4326", "transform": Affine(360.0 / width, 0.0, -180.0, 0.0, -180.0 / height, 90.0),
        "compress": "deflate", "photometric": "RGB",
    }
    values = np.where(mask[..., None], image, 0).astype(np.uint8)  # data only: no background or graticule
    with geoparquet.atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(np.moveaxis(values, -1, 0), indexes=[1, 2, 3])
        dst.write(np.where(mask, 255, 0).astype(np.uint8), 4)
        dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                           rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.alpha]
    return path


def write_points_geoparquet(frame, path: Path) -> Path:
    """Cell centres as GeoParquet 1.1 points (OGC:CRS84) with the frame's columns."""
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(
        frame, geometry=gpd.points_from_xy(frame["centre_lon"], frame["centre_lat"]), crs="OGC:CRS84"
    )
    with geoparquet.atomic_output(path) as tmp:
        gdf.to_parquet(tmp, index=False, schema_version="1.1.0", write_covering_bbox=False)
    return path


#: Degrees per pixel of the archive-scale raster: 7,200 × 3,600, so a 10 km cell (0.09° of
#: latitude) covers about two pixels in latitude and more towards the poles.
COG_DEG_PER_PIXEL = 0.05


class CellRaster:
    """An EPSG:4326 world raster of cell colours painted batch by batch (one grid row at a time).

    Memory is the image (4 bytes per pixel: 104 MB at 0.05°), never the number of cells: callers
    stream cells in, each painted as its true 10 km footprint (at least one pixel). Paint every
    batch with `paint`, then every batch again with `paint(..., cores=True)`: the second pass puts
    each cell's colour on the pixel holding its centre, so no neighbour's footprint can hide it.
    """

    def __init__(self, deg_per_pixel: float = COG_DEG_PER_PIXEL, spacing_km: float = 10.0) -> None:
        if not 0 < deg_per_pixel <= 10:
            raise ValueError(f"deg_per_pixel must be in (0, 10], got {deg_per_pixel}")
        self.deg = float(deg_per_pixel)
        self.width, self.height = round(360.0 / self.deg), round(180.0 / self.deg)
        self.spacing_km = spacing_km
        self.image = np.zeros((self.height, self.width, 3), np.uint8)
        self.mask = np.zeros((self.height, self.width), bool)
        self.cells = 0

    def pixel(self, lon, lat) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the pixel holding each point (the GeoTIFF's own convention)."""
        return lonlat_to_pixel(lon, lat, self.width, self.height)

    def paint(self, lon: np.ndarray, lat: np.ndarray, rgb: np.ndarray, cores: bool = False) -> None:
        lon = np.asarray(lon, dtype=np.float64)
        lat = np.asarray(lat, dtype=np.float64)
        if len(lon) == 0:
            return
        px, py = self.pixel(lon, lat)
        if cores:
            self.image[py, px] = rgb
            self.mask[py, px] = True
            return
        self.cells += len(lon)
        half_w, half_h = cell_half_extent_deg(lat, self.spacing_km)
        x0 = np.floor((lon - half_w + 180.0) / self.deg).astype(np.int64)
        x1 = np.maximum(np.ceil((lon + half_w + 180.0) / self.deg).astype(np.int64), x0 + 1)
        y0 = np.floor((90.0 - lat - half_h) / self.deg).astype(np.int64)
        y1 = np.maximum(np.ceil((90.0 - lat + half_h) / self.deg).astype(np.int64), y0 + 1)
        _fill_rects(self.image, x0, y0, x1, y1, np.asarray(rgb, np.uint8), True, self.mask)

    def write_cog(self, path: Path, resampling: str = "average") -> Path:
        """Cloud-Optimised GeoTIFF (RGBA, deflate, 512 px tiles, internal overviews), atomically.

        Alpha is 255 on painted pixels and 0 elsewhere, so GDAL/QGIS show only cells; overviews
        are built by GDAL's COG driver, which GDAL and QGIS read without building their own.
        """
        import rasterio
        from affine import Affine
        from rasterio.io import MemoryFile
        from rasterio.shutil import copy as rio_copy

        profile = {
            "driver": "GTiff", "width": self.width, "height": self.height, "count": 4, "dtype": "uint8",
            "crs": "EPSG:4326", "transform": Affine(self.deg, 0.0, -180.0, 0.0, -self.deg, 90.0),
            "tiled": True, "blockxsize": 512, "blockysize": 512, "photometric": "RGB",
        }
        with geoparquet.atomic_output(Path(path)) as tmp, MemoryFile() as mem:
            with mem.open(**profile) as dst:
                for band in range(3):
                    dst.write(np.where(self.mask, self.image[..., band], 0).astype(np.uint8), band + 1)
                dst.write(np.where(self.mask, 255, 0).astype(np.uint8), 4)
                dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                                   rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.alpha]
            with mem.open() as src:
                rio_copy(src, str(tmp), driver="COG", compress="DEFLATE", blocksize=512,
                         overview_resampling=resampling, overviews="AUTO")
        return Path(path)

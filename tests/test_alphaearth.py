"""AlphaEarth (AEF) tiles pooled onto Major TOM fragments, checked against a by-hand numpy recomputation.

The tiles are small AEF-style COGs written here with rasterio: 64 int8 bands, -128 no data, one
north-up and one with a positive y step (rows running north), a cell covered by two tiles, and a
cell in another UTM zone than the tile that covers it (read through a warped VRT).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine

from majortom_assets import alphaearth, geoparquet
from majortom_assets.fragment import fragment_layout
from majortom_assets.released_fixtures import write_aef_tile
from majortom_assets.synthetic import place_cell
from majortom_assets.vectors import files

CELL = "500U_20R"          # ~45 N, one UTM zone
SIZE = alphaearth.IMAGE_SIDE


def _codes(rng, height, width):
    q = rng.integers(-127, 128, size=(64, height, width), dtype=np.int16).astype(np.int8)
    return q


def write_tile(path, codes_north_up: np.ndarray, west: float, north: float, epsg: int,
               positive_y: bool = False) -> str:
    """A 64-band int8 COG whose pixel (i, j) of ``codes_north_up`` lies at west + 10 j, north - 10 i."""
    _, h, w = codes_north_up.shape
    if positive_y:
        data = codes_north_up[:, ::-1, :]
        transform = Affine(10.0, 0.0, west, 0.0, 10.0, north - 10.0 * h)
    else:
        data = codes_north_up
        transform = Affine(10.0, 0.0, west, 0.0, -10.0, north)
    with rasterio.open(path, "w", driver="COG", width=w, height=h, count=64, dtype="int8",
                       crs=f"EPSG:{epsg}", transform=transform, nodata=-128, compress="none", overviews="NONE",
                       blocksize=256) as dst:
        dst.write(np.ascontiguousarray(data))
    return str(path)


def by_hand(codes: np.ndarray, box) -> np.ndarray | None:
    r0, c0, r1, c1 = box
    q = codes[:, r0:r1, c0:c1].astype(np.float64)
    valid = (q != -128).all(axis=0)
    if not valid.any():
        return None
    v = np.sign(q) * (q / 127.5) ** 2
    mean = v[:, valid].mean(axis=1)
    return mean / np.linalg.norm(mean)


@pytest.fixture(scope="module")
def two_tiles(tmp_path_factory):
    """The cell's image split between a north-up west tile and a positive-y east tile, with holes."""
    tmp_path = tmp_path_factory.mktemp("aef")
    rng = np.random.default_rng(7)
    place = place_cell(CELL, SIZE)
    _, _, x0, _, _, y0 = place.transform
    full = _codes(rng, SIZE + 40, SIZE + 40)          # 20 px margin around the image
    full[:, 20 + 100:20 + 180, 20 + 50:20 + 130] = -128            # a no-data patch
    full[:, 20 + 844:20 + 1068, 20 + 844:20 + 1068] = -128         # one whole fragment empty
    full[5, 20 + 300, 20 + 300] = -128                             # one band missing -> pixel invalid
    split = 20 + 600
    west_tile = write_tile(tmp_path / "aef_w.tif", full[:, :, :split], x0 - 200, y0 + 200, place.epsg)
    east_tile = write_tile(tmp_path / "aef_e.tif", full[:, :, split:], x0 - 200 + 10 * split, y0 + 200,
                           place.epsg, positive_y=True)
    index = pd.DataFrame({"path": ["aef_w.tif", "aef_e.tif"], "year": [2021, 2021]})
    index.to_parquet(tmp_path / "index.parquet")
    expected = full[:, 20:20 + SIZE, 20:20 + SIZE].copy()
    expected[:, (expected == -128).any(axis=0)] = -128   # a pixel missing any band is no data
    return tmp_path / "index.parquet", expected, (west_tile, east_tile)


def test_dequantise_matches_formula():
    q = np.arange(-128, 128, dtype=np.int16).astype(np.int8)
    got = alphaearth.dequantise(q)
    want = np.sign(q.astype(float)) * (q.astype(float) / 127.5) ** 2
    want[0] = 0.0   # -128 is no data
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cell_image_from_two_tiles_both_y_directions(two_tiles):
    index, expected, tiles = two_tiles
    found = alphaearth.read_tile_index(index)
    assert [t.path for t in found] == list(tiles) and {t.year for t in found} == {2021}
    image = alphaearth.read_cell(CELL, found, 2021)
    assert set(image.tiles) == set(tiles)
    np.testing.assert_array_equal(image.codes, expected)


def test_pooled_vectors_by_hand(two_tiles):
    index, expected, _ = two_tiles
    image = alphaearth.read_cell(CELL, alphaearth.read_tile_index(index), 2021)
    table, failures = alphaearth.cell_table(image, 2021)
    layout = fragment_layout(SIZE, SIZE, 224)
    want = [by_hand(expected, box) for box in layout.boxes]
    empty = [tuple(int(v) for v in b) for b, w in zip(layout.boxes, want, strict=True) if w is None]
    assert empty == [(844, 844, 1068, 1068)]
    assert [f.pixel_bbox for f in failures] == empty and "no valid" in failures[0].reason
    got = geoparquet.embedding_matrix(table)
    boxes = files.pixel_boxes(table.column("pixel_bbox"))
    assert len(got) == 24
    for vec, box in zip(got, boxes, strict=True):
        k = [tuple(b) for b in layout.boxes.tolist()].index(tuple(box))
        np.testing.assert_allclose(vec, want[k], atol=2e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_cell_in_other_utm_zone_is_warped(tmp_path):
    """A tile in the neighbouring zone still fills the cell (warped, nearest pixel)."""
    place = place_cell(CELL, SIZE)
    other = place.epsg + 1
    from pyproj import Transformer

    lonlat = Transformer.from_crs(f"EPSG:{place.epsg}", "EPSG:4326", always_xy=True)
    to_other = Transformer.from_crs("EPSG:4326", f"EPSG:{other}", always_xy=True)
    _, _, x0, _, _, y0 = place.transform
    xs, ys = [], []
    for x, y in [(x0, y0), (x0 + 10680, y0), (x0, y0 - 10680), (x0 + 10680, y0 - 10680)]:
        ox, oy = to_other.transform(*lonlat.transform(x, y))
        xs.append(ox)
        ys.append(oy)
    west, north = np.floor(min(xs) / 10) * 10 - 500, np.ceil(max(ys) / 10) * 10 + 500
    h = int((north - (min(ys) - 500)) / 10) + 1
    w = int((max(xs) + 500 - west) / 10) + 1
    codes = np.full((64, h, w), 50, dtype=np.int8)
    write_tile(tmp_path / "z.tif", codes, west, north, other)
    tiles = alphaearth.read_tile_index(tmp_path)
    image = alphaearth.read_cell(CELL, tiles, None)
    assert image.tiles and (image.codes == 50).all()
    table, failures = alphaearth.cell_table(image, 2021)
    assert not failures and table.num_rows == 25
    np.testing.assert_allclose(geoparquet.embedding_matrix(table), 1 / 8, atol=1e-6)   # unit (1,..,1)/8


def test_cli_writes_table2_beside_models(two_tiles, tmp_path):
    index, _, _ = two_tiles
    out = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "majortom_assets.cli", "alphaearth", "--tiles", str(index),
                          "--cells", CELL, "137U_1R", "--year", "2021", "--out", str(out)],
                         capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert "24 fragments" in res.stdout and "skipped" in res.stdout
    path = out / "embeddings" / "alphaearth" / "row=500U" / "embeddings.parquet"
    assert files.known_models(out) == ["alphaearth"]
    info = geoparquet.read_info(path)
    assert info.model == "alphaearth" and info.dim == 64 and info.extra["year"] == 2021
    assert geoparquet.verify_file(path).ok
    fail = pq.read_table(out / "failures" / "alphaearth" / "row=137U" / "failures.parquet").to_pylist()
    assert fail and "no AEF tile of 2021" in fail[0]["reason"]
    # the same products as any model: exact search finds a fragment itself first
    res = subprocess.run([sys.executable, "-m", "majortom_assets.cli", "index", "--root", str(out),
                          "--model", "alphaearth", "--no-progress"], capture_output=True, text=True,
                         env=env, check=False)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "majortom_assets.cli", "search", "--root", str(out),
                          "--model", "alphaearth", "--cell", CELL, "-k", "3", "--format", "json"],
                         capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert f'"grid_cell":"{CELL}"' in res.stdout.replace(" ", "")


def test_wrong_tile_dtype_is_named(tmp_path):
    path = tmp_path / "bad.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=Affine(10, 0, 500000, 0, -10, 5000000)) as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(alphaearth.AlphaEarthError, match="bad.tif: 3 bands of uint8"):
        alphaearth.read_tile_index(tmp_path)


def test_coarser_tile_maps_each_pixel_to_its_nearest_centre(tmp_path):
    """A 20 m tile in the cell's zone (not on the 10 m grid): every target pixel takes the source
    pixel its centre falls in, computed here independently."""
    place = place_cell(CELL, SIZE)
    _, _, x0, _, _, y0 = place.transform
    rng = np.random.default_rng(3)
    codes = _codes(rng, SIZE // 2 + 8, SIZE // 2 + 8)
    west, north = x0 - 73.0, y0 + 57.0
    write_aef_tile(tmp_path / "c.tif", codes, west, north, place.epsg, positive_y=True, pixel_m=20.0)
    image = alphaearth.read_cell(CELL, alphaearth.read_tile_index(tmp_path), None)
    centres_x = x0 + 10 * np.arange(SIZE) + 5
    centres_y = y0 - 10 * np.arange(SIZE) - 5
    cols = ((centres_x - west) // 20).astype(int)
    rows = ((north - centres_y) // 20).astype(int)
    np.testing.assert_array_equal(image.codes, codes[:, rows[:, None], cols[None, :]])

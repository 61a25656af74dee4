"""Readable PCA map rendering: exact equirectangular placement, visible sparse cells, UI preview."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio

from majortom_assets.vectors import pca_map as pm

R_KM = 6378.137  # WGS84 equatorial radius, as the Major TOM grid uses


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_cell_painted_at_its_equirectangular_pixel():
    # Rome: x = floor((12.5 + 180) / 360 * 2048) = 1095, y = floor((90 - 41.9) / 180 * 1024) = 273
    lon, lat, colour = np.array([12.5]), np.array([41.9]), np.array([[10, 200, 30]], np.uint8)
    image, mask = pm.render_map(lon, lat, colour, 2048, 1024, marker_px=5, adaptive=False)
    assert image.shape == (1024, 2048, 3) and mask.shape == (1024, 2048)
    assert _bbox(mask) == (1093, 271, 1098, 276) and mask.sum() == 25  # 5x5 centred on (1095, 273)
    assert (image[mask] == colour[0]).all()
    # adaptive: one cell alone gets the largest marker, 1% of 2048 px = 20 px, still centred there
    image, mask = pm.render_map(lon, lat, colour)
    assert _bbox(mask) == (1095 - 10, 273 - 10, 1095 + 10, 273 + 10)
    np.testing.assert_array_equal(image[273, 1095], colour[0])


def test_background_and_graticule():
    image, mask = pm.render_map(np.array([100.0]), np.array([-45.0]), np.array([[255, 0, 0]], np.uint8))
    x30 = math.floor((30 + 180) / 360 * 2048)  # meridian 30°E
    y_eq = math.floor(90 / 180 * 1024)  # equator
    np.testing.assert_array_equal(image[100, x30], pm.GRATICULE)
    np.testing.assert_array_equal(image[y_eq, 100], pm.GRATICULE_MAJOR)
    np.testing.assert_array_equal(image[100, 100], pm.BACKGROUND)  # off every line and cell
    assert mask.sum() == 20 * 20  # the graticule is not data: only the one cell's marker is masked
    lines = np.zeros(2048, bool)
    lines[[min(math.floor((v + 180) / 360 * 2048), 2047) for v in range(-180, 181, 30)]] = True
    assert (image[5, lines] != pm.BACKGROUND).any(axis=1).all()
    assert (image[5, ~lines] == pm.BACKGROUND).all()


def test_marker_wraps_across_the_antimeridian():
    _, mask = pm.render_map(
        np.array([179.99]), np.array([0.0]), np.array([[1, 2, 3]], np.uint8), marker_px=5, adaptive=False
    )
    assert mask[:, -3:].any() and mask[:, :2].any() and mask.sum() == 25


def test_marker_size_adapts_to_cell_count():
    assert pm.marker_size(1, 2048) == 20 and pm.marker_size(3, 960) == 9
    sizes = [pm.marker_size(n, 2048) for n in (1, 10, 100, 1000, 10_000, 2_000_000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 3
    assert pm.marker_size(2_000_000, 2048, minimum=1) == 1
    with pytest.raises(ValueError, match="marker size"):
        pm.marker_size(5, 100, minimum=0)


def test_own_pixel_keeps_its_colour_under_grown_neighbours():
    lon = np.array([10.0, 10.5, 11.0])  # 3 px apart at 2048 px: the grown markers overlap
    lat = np.zeros(3)
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    image, _ = pm.render_map(lon, lat, rgb, marker_px=1)
    xs, ys = pm.lonlat_to_pixel(lon, lat, 2048, 1024)
    assert len(set(xs)) == 3
    for x, y, c in zip(xs, ys, rgb):
        np.testing.assert_array_equal(image[y, x], c)


def test_true_footprint_painted_when_zoomed_in():
    lat0, lon0 = 0.0, 0.0
    window = pm.Window(-0.5, -0.5, 0.5, 0.5)
    image, mask = pm.render_window(
        np.array([lon0]),
        np.array([lat0]),
        np.array([[9, 9, 9]], np.uint8),
        window,
        200,
        200,
        marker_px=1,
        adaptive=False,
        graticule_deg=None,
    )
    half = 10.0 / 2 / (R_KM * math.pi / 180)  # a 10 km cell's half size in degrees at the equator
    lo, hi = math.floor((lon0 - half + 0.5) * 200), math.ceil((lon0 + half + 0.5) * 200)
    assert _bbox(mask) == (lo, lo, hi, hi)  # ~18 px square, far larger than the 1 px marker
    assert (image[~mask] != [9, 9, 9]).any(axis=1).all()  # only the cell carries its colour ...
    outline = np.zeros_like(mask)
    outline[lo - 1 : hi + 1, lo - 1 : hi + 1] = True
    outline &= ~mask
    assert (image[outline] == pm.OUTLINE).all()  # ... framed by a dark outline


def test_data_window_is_antimeridian_aware():
    lon = np.array([179.95, -179.95, 179.9])
    lat = np.array([-16.5, -16.4, -16.6])
    w = pm.data_window(lon, lat)
    assert w.east > 180.0 and w.east - w.west < 2.0
    u = w.unwrap(lon)
    assert (u > w.west).all() and (u < w.east).all() and (lat > w.south).all() and (lat < w.north).all()
    plain = pm.data_window(np.array([10.0, 12.0]), np.array([45.0, 46.0]))
    assert plain.west < 10.0 and 12.0 < plain.east < 180.0
    assert 1.0 - 1e-9 <= plain.display_aspect <= 2.0 + 1e-9
    with pytest.raises(ValueError, match="no cells"):
        pm.data_window(np.array([]), np.array([]))


def test_preview_has_an_inset_only_for_clustered_cells():
    rgb = np.array([[220, 30, 30], [30, 160, 30], [30, 30, 220]], np.uint8)
    lon, lat = np.array([0.10, 0.19, 0.28]), np.array([-17.5, -17.5, -17.5])  # adjacent 10 km cells
    preview = pm.render_preview(lon, lat, rgb)
    assert preview.image.shape == (480, 960, 3) and preview.inset is not None and preview.zoom >= 3
    for colour in rgb:  # each cell is a clearly visible patch in the inset, not a dot
        assert (preview.image == colour).all(axis=2).sum() >= 20 * 20
    assert "inset" in preview.caption()

    rng = np.random.default_rng(0)
    spread = pm.render_preview(
        rng.uniform(-180, 180, 300),
        rng.uniform(-60, 70, 300),
        rng.integers(0, 256, (300, 3)).astype(np.uint8),
    )
    assert spread.inset is None and spread.zoom == 1.0


def test_geotiff_holds_only_cell_values(tmp_path):
    image, mask = pm.render_map(np.array([12.5]), np.array([41.9]), np.array([[10, 200, 30]], np.uint8))
    path = pm.write_geotiff(image, mask, tmp_path / "m.tif")
    with rasterio.open(path) as src:
        data = src.read()
    assert (data[3] == np.where(mask, 255, 0)).all()
    assert (data[:3, ~mask] == 0).all()
    assert (np.moveaxis(data[:3], 0, -1)[mask] == [10, 200, 30]).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="rgb"):
        pm.render_map(np.zeros(2), np.zeros(2), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="marker_px"):
        pm.render_map(np.zeros(1), np.zeros(1), np.zeros((1, 3), np.uint8), marker_px=0)
    with pytest.raises(ValueError, match="west < east"):
        pm.Window(10.0, 0.0, 5.0, 1.0)


def test_map_asset_embeds_preview_and_reports_key_numbers(tmp_path):
    import base64

    import dagster as dg
    from PIL import Image

    from majortom_assets.defs.maps import build_pca_map_asset
    from majortom_assets.defs.resources import StorageResource
    from majortom_assets.models.spec import MODEL_SPECS
    from majortom_assets.vectors import pca, testdata

    model = min(MODEL_SPECS)
    cells = testdata.cells_in_rows([-195], 3)
    data = testdata.write_synthetic(tmp_path, model=model, cells=cells, dim=16, seed=1)
    asset = build_pca_map_asset(model)
    result = dg.materialize([asset], resources={"storage": StorageResource(home=str(tmp_path))})
    md = result.asset_materializations_for_node(asset.op.name)[0].metadata

    out = tmp_path / "maps" / model
    preview = out / "pca_preview.png"
    assert md["png"].value == str(out / "pca.png") and md["preview (PNG)"].value == str(preview)
    with Image.open(out / "pca.png") as full, Image.open(preview) as small:
        assert full.size == (2048, 1024) and small.size == (960, 480)
    text = md["map"].value
    assert text.count("data:image/png;base64,") == 1
    embedded = text.split("data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(embedded) == preview.read_bytes()
    assert "inset" in text and str(out / "pca.png") in text  # 3 clustered cells: zoomed inset, full path

    expected = pca.StreamingPCA(3).fit_files(data.paths, central_only=True).explained_variance_ratio_
    assert md["cells"].value == 3 and md["fit on"].value == "central fragments"
    for i in range(3):
        assert isinstance(md[f"explained variance ratio PC{i + 1}"], dg.FloatMetadataValue)
        assert md[f"explained variance ratio PC{i + 1}"].value == pytest.approx(expected[i], abs=1e-6)
    assert md["random weights"].value is True  # synthetic files are flagged as random weights
    assert "NOT FOR SCIENCE" in md["WARNING"].value
    assert md["rows read"].value == 1 and md["basis refit"].value is True and md["refit reason"].value == "first build"

    # materialised again: nothing changed, nothing read; then a new row: only it is read
    again = dg.materialize([asset], resources={"storage": StorageResource(home=str(tmp_path))})
    md = again.asset_materializations_for_node(asset.op.name)[0].metadata
    assert md["rows read"].value == 0 and md["rows unchanged"].value == 1 and md["cells"].value == 3
    testdata.write_synthetic(tmp_path, model=model, cells=testdata.cells_in_rows([-194], 3), dim=16, seed=1)
    grown = dg.materialize([asset], resources={"storage": StorageResource(home=str(tmp_path))})
    md = grown.asset_materializations_for_node(asset.op.name)[0].metadata
    assert md["rows read"].value == 1 and md["rows unchanged"].value == 1 and md["cells"].value == 6
    assert md["rows (files)"].value == 2


def test_archive_scale_map_is_a_cog_with_each_cell_colour_at_its_pixel(tmp_path):
    """0.05°/px Cloud-Optimised GeoTIFF: overviews, EPSG:4326, a cell's centre pixel holds its colour."""
    import pyarrow.parquet as pq
    import rasterio

    from majortom_assets.vectors import pca_update, testdata

    cells = testdata.cells_in_rows([-700, -10, 0, 11, 650], 8)  # polar rows: wide cells in longitude
    data = testdata.write_synthetic(tmp_path, cells=cells, dim=16, seed=4)
    result = pca_update.update_pca_map(data.paths, tmp_path / "map")
    values = pq.read_table(tmp_path / "map" / "pca.parquet").to_pandas()
    with rasterio.open(tmp_path / "map" / "pca.tif") as ds:
        assert ds.driver == "GTiff" and ds.crs.to_epsg() == 4326
        assert (ds.width, ds.height) == (7200, 3600) == tuple(result["tif size"])
        assert ds.overviews(1) and ds.profile["tiled"] and ds.profile["blockxsize"] == 512
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        for cell in values.itertuples():
            row, col = ds.index(cell.centre_lon, cell.centre_lat)
            pixel = ds.read(window=((row, row + 1), (col, col + 1)))[:, 0, 0]
            assert tuple(pixel) == (cell.r, cell.g, cell.b, 255), cell.grid_cell
        alpha = ds.read(4)
        # a polar cell is many pixels wide (its true footprint), an equatorial one about two
        painted = alpha > 0
        assert painted.sum() > 4 * len(values)
        assert not painted[:100].any() and not painted[-100:].any()  # nothing invented at the poles
        small = ds.read(4, out_shape=(1, 360, 720))  # an overview level answers a zoomed-out read
        assert small.any()


def test_data_window_of_cells_all_round_the_globe_is_the_world_width():
    """Cells at every longitude (the archive): the window spans exactly 360°, never 360° + rounding."""
    lon = np.linspace(-179.95, 179.95, 5001) + 0.0123  # widest gap under 0.1°: clamped to the world
    lat = np.linspace(-56.0, 80.0, 5001)
    window = pm.data_window(lon, lat)
    assert (window.west, window.east) == (-180.0, 180.0) and window.south >= -90 and window.north <= 90
    preview = pm.render_preview(lon, lat, np.full((len(lon), 3), 90, np.uint8))
    assert preview.inset is None and preview.image.shape == (480, 960, 3)

"""The direct GeoTIFF decoder against GDAL: same pixels, dtype, CRS and affine, or a rasterio fallback.

Truth is rasterio opened here in the test (not ``geotiff.read_rasterio``), and for files written
by the test the array that was written.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine
from rasterio.io import MemoryFile

from majortom_assets import core, geotiff, synthetic
from majortom_assets.core import CoreCollection, SampleError, decode_bands
from majortom_assets.standard import SOURCES

SIZE = 60   # divisible by 6: 10, 20 and 60 m bands all present
TRANSFORM = (10.0, 0.0, 399960.0, 0.0, -10.0, 5900040.0)
TIFF_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.tif")


def _truth(data: bytes) -> tuple[np.ndarray, str, tuple[float, ...], int]:
    """Pixels, CRS, affine and band count as GDAL reads them."""
    with MemoryFile(bytes(data)) as mem, mem.open() as ds:
        return ds.read(1), ds.crs.to_string(), tuple(ds.transform)[:6], ds.count


def _assert_same_as_gdal(pixels: np.ndarray, info: geotiff.BandInfo, data: bytes) -> None:
    want, crs, transform, count = _truth(data)
    assert pixels.dtype == want.dtype and pixels.shape == want.shape
    np.testing.assert_array_equal(pixels, want)   # NaN == NaN here, bit patterns otherwise
    assert (info.height, info.width, info.count, info.dtype) == (*want.shape, count, want.dtype)
    assert info.crs == crs and info.transform == transform


def _write(array: np.ndarray, **options) -> bytes:
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                      dtype=array.dtype, crs="EPSG:32633", transform=Affine(*TRANSFORM), **options) as ds:
            ds.write(array, 1)
        return mem.read()


def _random(shape: tuple[int, int], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        out = (rng.standard_normal(shape) * 0.3).astype(dtype)
        out[rng.random(shape) < 0.05] = np.nan
        return out
    info = np.iinfo(dtype)
    # smooth-ish values so the predictors have something to predict, plus noise over the range
    ramp = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) * 7
    noise = rng.integers(info.min // 4, info.max // 4 + 1, shape)
    return np.clip(ramp + noise, info.min, info.max).astype(dtype)


@cache
def _collection(base: str, source: str, compress: str) -> Path:
    path = Path(base) / f"{source}-{compress}"
    synthetic.generate_collection(path, source, cells=synthetic.default_cells()[:2], size=SIZE,
                                  seed=3, compress=compress)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("geotiff"))


def _samples(path: Path):
    """(metadata row, {band column: GeoTIFF bytes}) for every sample of a collection."""
    collection = CoreCollection(str(path))
    meta = collection.metadata()
    schema = pq.read_schema(collection.shard_path(meta["parquet_url"].iloc[0]))
    bands = [f.name for f in schema if pa.types.is_binary(f.type) and f.name != "thumbnail"]
    for _, row in meta.iterrows():
        yield row, collection.read_raw(row.parquet_url, row.parquet_row, bands)


# ---------------------------------------------------------------------------- synthetic Core bands
@pytest.mark.parametrize("compress", synthetic.GEOTIFF_COMPRESSION)
@pytest.mark.parametrize("source", SOURCES)
def test_direct_decoder_equals_gdal_for_every_synthetic_band(base, source, compress):
    seen_dtypes, seen_factors = set(), set()
    for _, raw in _samples(_collection(base, source, compress)):
        assert len(raw) >= 2
        for data in raw.values():
            pixels, info = geotiff.read_direct(data)   # NotDirect here would mean a silent fallback
            _assert_same_as_gdal(pixels, info, data)
            with geotiff.open_band(data) as opened:
                assert opened.direct and opened.info == info
            assert geotiff.read_header(data) == info
            seen_dtypes.add(pixels.dtype.str)
            seen_factors.add(SIZE // info.height)
    want_dtypes = {"<f4"} if source == "S1RTC" else {"<u2", "|u1"}   # S2 reflectance + cloud mask
    assert seen_dtypes == want_dtypes
    assert seen_factors == ({1} if source == "S1RTC" else {1, 2, 6})


@pytest.mark.parametrize("compress", ["zstd", "none"])
@pytest.mark.parametrize("source", SOURCES)
def test_decode_bands_is_identical_with_and_without_the_direct_path(base, source, compress, monkeypatch):
    """The whole stack (casts, 20/60 m upsampling, CRS of a coarse-only request) through both decoders."""
    coarse_only = ("vh",) if source == "S1RTC" else ("B01", "B09")
    for row, raw in _samples(_collection(base, source, compress)):
        for bands in (tuple(raw), coarse_only):
            results = []
            for direct in (True, False):
                monkeypatch.setattr(geotiff, "DIRECT_DECODE", direct)
                results.append(decode_bands(raw, bands, SIZE, product_id=row.product_id,
                                            grid_cell=row.grid_cell, max_workers=1))
            (a, crs_a, tr_a), (b, crs_b, tr_b) = results
            assert a.dtype == b.dtype == core.output_dtype(bands)
            np.testing.assert_array_equal(a, b)
            assert (crs_a, tr_a) == (crs_b, tr_b) and crs_a == row.crs


def test_cast_into_a_wider_output_array(base):
    _, raw = next(_samples(_collection(base, "S2L2A", "deflate")))
    mask = raw["cloud_mask"]
    want, *_ = _truth(mask)
    out = np.full(want.shape, 9999, np.uint16)
    pixels, info = geotiff.decode_band(mask, out)
    assert pixels is out and info.dtype == np.uint8
    np.testing.assert_array_equal(out, want.astype(np.uint16))
    with pytest.raises(ValueError, match="shape"):
        geotiff.decode_band(mask, np.empty((3, 3), np.uint16))


# ------------------------------------------------------------------ layouts written with rasterio
_LAYOUTS = [
    # (dtype, compress, predictor)
    ("uint16", "deflate", 1), ("uint16", "deflate", 2), ("uint16", "zstd", 2), ("uint16", "lzw", 2),
    ("uint16", None, 1), ("uint8", "deflate", 2), ("int16", "zstd", 2), ("uint32", "lzw", 2),
    ("float32", "deflate", 1), ("float32", "deflate", 3), ("float32", "zstd", 3), ("float32", "lzw", 3),
    ("float64", "zstd", 3), ("float32", None, 1),
]


@pytest.mark.parametrize("dtype,compress,predictor", _LAYOUTS)
def test_tiles_with_partial_edge_tiles(dtype, compress, predictor):
    array = _random((50, 70), dtype, seed=predictor)   # 16 px tiles: 4 x 5 tiles, the last row/col partial
    options = {"tiled": True, "blockxsize": 16, "blockysize": 16}
    if compress:
        options |= {"compress": compress, "predictor": predictor}
    data = _write(array, **options)
    with MemoryFile(data) as mem, mem.open() as ds:
        assert ds.block_shapes == [(16, 16)] and ds.profile.get("tiled")
    pixels, info = geotiff.read_direct(data)
    np.testing.assert_array_equal(pixels, array)
    _assert_same_as_gdal(pixels, info, data)


@pytest.mark.parametrize("dtype,compress,predictor", _LAYOUTS)
def test_strips_with_a_partial_last_strip(dtype, compress, predictor):
    array = _random((50, 70), dtype, seed=10 + predictor)
    options = {"blockysize": 7}   # 8 strips, the last one 1 row
    if compress:
        options |= {"compress": compress, "predictor": predictor}
    data = _write(array, **options)
    pixels, info = geotiff.read_direct(data)
    np.testing.assert_array_equal(pixels, array)
    _assert_same_as_gdal(pixels, info, data)


# ------------------------------------------------------------------------- files left to rasterio
_OUT_OF_SCOPE = {
    "bigtiff": {"BIGTIFF": "YES", "compress": "deflate", "predictor": 2},
    "big-endian": {"ENDIANNESS": "BIG", "compress": "deflate", "predictor": 2},
    "big-endian tiled": {"ENDIANNESS": "BIG", "tiled": True, "blockxsize": 16, "blockysize": 16},
    "packbits": {"compress": "packbits"},
}


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize("name", sorted(_OUT_OF_SCOPE))
def test_files_outside_the_direct_scope_fall_back_to_rasterio(name, dtype):
    array = _random((48, 64), dtype, seed=5)
    data = _write(array, **_OUT_OF_SCOPE[name])
    with pytest.raises(geotiff.NotDirect):
        geotiff.read_direct(data)
    with geotiff.open_band(data) as opened:
        assert not opened.direct
    pixels, info = geotiff.decode_band(data)
    np.testing.assert_array_equal(pixels, array)
    _assert_same_as_gdal(pixels, info, data)
    assert geotiff.read_header(data) == info


def test_a_second_band_is_left_to_rasterio_and_rejected_by_core():
    array = _random((60, 60), "uint16", seed=6)
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=60, height=60, count=2, dtype="uint16", crs="EPSG:32633",
                      transform=Affine(*TRANSFORM)) as ds:
            ds.write(np.stack([array, array + 1]))
        data = mem.read()
    pixels, info = geotiff.decode_band(data)
    assert info.count == 2
    np.testing.assert_array_equal(pixels, array)
    with pytest.raises(SampleError, match="2 bands, expected 1") as err:
        decode_bands({"B04": data}, ["B04"], 60, product_id="P", grid_cell="1U_1R", file="f.parquet")
    assert err.value.band == "B04"


# ------------------------------------------------------------------------------------ bad bytes
def _garble_first_block(data: bytes, seed: int = 0) -> bytes:
    """Replace the first strip's compressed bytes with noise; the header stays valid."""
    with MemoryFile(data) as mem, mem.open() as ds:
        assert not ds.profile.get("tiled")
    out = bytearray(data)
    start, length = _first_strip(data)
    out[start: start + length] = np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()
    return bytes(out)


def _first_strip(data: bytes) -> tuple[int, int]:
    """StripOffsets[0] / StripByteCounts[0] of a classic little-endian TIFF, read independently."""
    ifd = int.from_bytes(data[4:8], "little")
    first = {}
    for k in range(int.from_bytes(data[ifd: ifd + 2], "little")):
        e = data[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        tag, typ, count = (int.from_bytes(e[i: j], "little") for i, j in ((0, 2), (2, 4), (4, 8)))
        if tag in (273, 279):   # SHORT or LONG values, inline when they fit in 4 bytes
            size = {3: 2, 4: 4}[typ]
            values = e[8:12] if size * count <= 4 else data[int.from_bytes(e[8:12], "little"):]
            first[tag] = int.from_bytes(values[:size], "little")
    return first[273], first[279]


def _where_free(message: str) -> str:
    return TIFF_NAME.sub("<tmp>.tif", message)


@pytest.mark.parametrize("compress", ["deflate", "zstd", "lzw"])
def test_corrupt_band_raises_the_same_sample_error_as_rasterio(base, compress, monkeypatch):
    row, raw = next(_samples(_collection(base, "S2L1C", compress)))
    bad = _garble_first_block(raw["B05"])
    with pytest.raises(geotiff.NotDirect):
        geotiff.read_direct(bad)
    raw = {**raw, "B05": bad}
    messages = []
    for direct in (True, False):
        monkeypatch.setattr(geotiff, "DIRECT_DECODE", direct)
        with pytest.raises(SampleError) as err:
            decode_bands(raw, ["B04", "B05"], SIZE, product_id=row.product_id, grid_cell=row.grid_cell,
                         file="images/part_00000.parquet", max_workers=2)
        e = err.value
        assert (e.product_id, e.grid_cell, e.band, e.file) == (
            row.product_id, row.grid_cell, "B05", "images/part_00000.parquet")
        text = str(e)
        assert e.reason.startswith("undecodable GeoTIFF: RasterioIOError")
        assert all(s in text for s in (row.product_id, row.grid_cell, "band=B05", "part_00000.parquet"))
        messages.append(_where_free(text))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("bad, message", [
    (b"II*\x00 not a tiff at all", "undecodable GeoTIFF"),
    (b"", r"band is empty \(0 bytes\)"),
    (b"MM\x00*" + bytes(40), "undecodable GeoTIFF"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "band is a PNG image, not a GeoTIFF"),
    (b"\xff\xd8\xff\xe0" + bytes(40), "band is a JPEG image, not a GeoTIFF"),
    (b"hello, world", "band is not a GeoTIFF"),
])
def test_garbage_bytes_raise_geotiff_error_and_sample_error(bad, message):
    with pytest.raises(geotiff.GeoTiffError, match=message):
        geotiff.read_header(bad)
    with pytest.raises(SampleError, match=message) as err:
        decode_bands({"vv": bad}, ["vv"], SIZE, product_id="P", grid_cell="1U_1R", file="x.parquet")
    assert (err.value.product_id, err.value.grid_cell, err.value.band, err.value.file) == (
        "P", "1U_1R", "vv", "x.parquet")


def test_flipped_bytes_in_uncompressed_pixels_decode_alike():
    array = _random((48, 48), "uint16", seed=8)
    data = bytearray(_write(array))
    start, _ = _first_strip(bytes(data))
    data[start: start + 16] = bytes(16)
    pixels, info = geotiff.read_direct(bytes(data))
    _assert_same_as_gdal(pixels, info, bytes(data))
    assert not np.array_equal(pixels, array)


def test_rasterio_switch_is_honoured(monkeypatch):
    data = _write(_random((32, 32), "uint16"), compress="deflate", predictor=2)
    monkeypatch.setattr(geotiff, "DIRECT_DECODE", False)
    with geotiff.open_band(data) as opened:
        assert not opened.direct
    with geotiff.open_band(data, direct=True) as opened:
        assert opened.direct
    with rasterio.Env():
        pixels, info = geotiff.read_rasterio(data)
    _assert_same_as_gdal(pixels, info, data)

"""Core collection reads: metadata filters, one-row-group reads, decoding, georeferencing, errors."""

from __future__ import annotations

import io
import pickle
import shutil
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from affine import Affine
from pydantic import ValidationError
from pyproj import Transformer
from rasterio.io import MemoryFile

from majortom_assets import core, grid
from majortom_assets.core import (
    CoreCollection,
    MetadataFilter,
    SampleError,
    decode_bands,
)
from majortom_assets.standard import CORE_IMAGE_SIZE, S1RTC_BANDS, S2L1C_BANDS, S2L2A_BANDS

SIZE = CORE_IMAGE_SIZE


@pytest.fixture(scope="module")
def l1c(s2l1c_collection) -> CoreCollection:
    return CoreCollection(str(s2l1c_collection))


@pytest.fixture(scope="module")
def l2a(s2l2a_collection) -> CoreCollection:
    return CoreCollection(str(s2l2a_collection))


@pytest.fixture(scope="module")
def l2a_meta(s2l2a_collection) -> pd.DataFrame:
    """The metadata as pyarrow reads it, with no help from core (the independent reference)."""
    frame = pq.read_table(s2l2a_collection / "metadata.parquet").to_pandas()
    frame["when"] = pd.to_datetime(frame["timestamp"], format="%Y%m%dT%H%M%S", utc=True)
    return frame


def _raw_band(collection_dir, meta_row, band) -> np.ndarray:
    """Decode one band straight from the shard with pyarrow + rasterio (no core code)."""
    table = pq.ParquetFile(collection_dir / meta_row["parquet_url"]).read_row_group(
        int(meta_row["parquet_row"]), columns=[band])
    with MemoryFile(table.column(band)[0].as_py()) as mem, mem.open() as ds:
        return ds.read(1)


# --------------------------------------------------------------------------------------------
# metadata


def test_metadata_has_standard_columns_and_utc_timestamps(l2a, l2a_meta):
    md = l2a.metadata()
    assert set(core.METADATA_COLUMNS) <= set(md.columns)
    assert len(md) == len(l2a_meta)
    assert str(md["timestamp"].dt.tz) == "UTC"
    assert (md["timestamp"].to_numpy() == l2a_meta["when"].to_numpy()).all()


def test_filter_rows(l2a, l2a_meta):
    row = l2a_meta["grid_cell"].iloc[0].split("_")[0]
    got = l2a.metadata(MetadataFilter(rows=[row]))
    expected = l2a_meta[l2a_meta["grid_cell"].str.startswith(row + "_")]
    assert len(got) == len(expected) > 0
    assert set(got["product_id"]) == set(expected["product_id"])


def test_filter_cells_and_limit(l2a, l2a_meta):
    cells = sorted(set(l2a_meta["grid_cell"]))[:2]
    got = l2a.metadata(MetadataFilter(cells=cells))
    assert set(got["grid_cell"]) == set(cells)
    assert len(got) == int(l2a_meta["grid_cell"].isin(cells).sum())
    assert len(l2a.metadata(MetadataFilter(cells=cells, limit=1))) == 1


def test_filter_bbox_plain(l2a, l2a_meta):
    box = (0.0, 40.0, 20.0, 80.0)
    got = l2a.metadata(MetadataFilter(bbox=box))
    lon, lat = l2a_meta["centre_lon"], l2a_meta["centre_lat"]
    expected = l2a_meta[(lon >= 0) & (lon <= 20) & (lat >= 40) & (lat <= 80)]
    assert set(got["product_id"]) == set(expected["product_id"]) and len(expected) > 0


def test_filter_bbox_across_antimeridian(l2a, l2a_meta):
    box = (179.0, -25.0, -179.0, -10.0)   # minlon > maxlon: the box wraps through 180°
    got = l2a.metadata(MetadataFilter(bbox=box))
    lon, lat = l2a_meta["centre_lon"].to_numpy(), l2a_meta["centre_lat"].to_numpy()
    inside = ((lon >= 179.0) | (lon <= -179.0)) & (lat >= -25) & (lat <= -10)
    assert set(got["product_id"]) == set(l2a_meta.loc[inside, "product_id"])
    cells = set(got["grid_cell"])
    assert len(cells) == 2   # the west-most and east-most cells of the same row
    assert got["centre_lon"].min() < -179 and got["centre_lon"].max() > 179


def test_filter_dates(l2a, l2a_meta):
    times = l2a_meta["when"].sort_values()
    start, end = times.iloc[2], times.iloc[-3]
    got = l2a.metadata(MetadataFilter(start=start.to_pydatetime(), end=end.to_pydatetime()))
    expected = l2a_meta[(l2a_meta["when"] >= start) & (l2a_meta["when"] <= end)]
    assert set(got["product_id"]) == set(expected["product_id"])
    # naive datetimes are UTC
    naive = l2a.metadata(MetadataFilter(start=start.tz_convert(None).to_pydatetime()))
    assert set(naive["product_id"]) == set(l2a_meta.loc[l2a_meta["when"] >= start, "product_id"])


def test_filter_cloud_and_nodata(l2a, l2a_meta):
    got = l2a.metadata(MetadataFilter(max_cloud_cover=5.0, max_nodata=0.0))
    expected = l2a_meta[(l2a_meta["cloud_cover"] <= 5.0) & (l2a_meta["nodata"] <= 0.0)]
    assert set(got["product_id"]) == set(expected["product_id"])
    assert 0 < len(got) < len(l2a_meta)


def test_s1_metadata_without_cloud_cover(s1rtc_collection):
    s1 = CoreCollection(str(s1rtc_collection))
    md = s1.metadata(MetadataFilter(max_nodata=1.0))   # other filters work without cloud_cover
    assert "cloud_cover" not in md.columns and len(md) > 0
    with pytest.raises(ValueError, match="cloud_cover"):
        s1.metadata(MetadataFilter(max_cloud_cover=10))


@pytest.mark.parametrize("bad", ["12X", "U136", "", "136"])
def test_filter_rejects_bad_row_names(bad):
    with pytest.raises(ValidationError) as info:
        MetadataFilter(rows=["136U", bad])
    assert repr(bad) in str(info.value)


def test_filter_rejects_bad_bbox_and_dates():
    with pytest.raises(ValidationError):
        MetadataFilter(bbox=(0, 50, 10, 40))
    with pytest.raises(ValidationError):
        MetadataFilter(bbox=(0, 0, 190, 10))
    with pytest.raises(ValidationError):
        MetadataFilter(start=datetime(2021, 1, 1), end=datetime(2020, 1, 1))
    with pytest.raises(ValidationError):
        MetadataFilter(cells=["136U-496R"])


# --------------------------------------------------------------------------------------------
# shard paths


def test_shard_path_resolves_inside_collection(l2a):
    absolute = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_01234.parquet"
    assert l2a.shard_path(absolute) == f"{l2a.root}/images/part_01234.parquet"
    assert l2a.shard_path("images/part_00001.parquet") == f"{l2a.root}/images/part_00001.parquet"
    assert l2a.shard_path(absolute + "?download=true").endswith("/images/part_01234.parquet")
    for bad in ("part_00001.parquet", "images/../../etc/passwd", "images/sub/part_1.parquet"):
        with pytest.raises(ValueError, match="images/"):
            l2a.shard_path(bad)


# --------------------------------------------------------------------------------------------
# one row group only


class _CountingFile(io.RawIOBase):
    """A read-only file that records every (offset, length) read from it."""

    def __init__(self, inner, log):
        self._inner, self._log = inner, log

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._inner.seek(offset, whence)

    def tell(self):
        return self._inner.tell()

    def read(self, n=-1):
        start = self._inner.tell()
        data = self._inner.read(n)
        self._log.append((start, len(data)))
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        self._inner.close()
        super().close()


def test_read_touches_only_one_row_group(s2l2a_collection, l2a_meta, monkeypatch):
    coll = CoreCollection(str(s2l2a_collection))
    row = l2a_meta[l2a_meta["parquet_row"] == 2].iloc[0]
    shard = s2l2a_collection / row["parquet_url"]
    meta = pq.read_metadata(shard)
    assert meta.num_row_groups >= 3
    columns = ["product_id", "grid_cell", "B04", "B03", "B02"]

    def chunk_ranges(rg, names=None):
        group = meta.row_group(rg)
        out = []
        for i in range(group.num_columns):
            col = group.column(i)
            if names is None or col.path_in_schema in names:
                start = col.dictionary_page_offset or col.data_page_offset
                out.append((start, start + col.total_compressed_size))
        return out

    log: list[tuple[int, int]] = []
    real_open = coll.fs.open
    monkeypatch.setattr(coll.fs, "open", lambda path, mode="rb", **kw: _CountingFile(real_open(path, mode), log))
    calls = []
    real_read_row_group = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        calls.append((i, kwargs.get("columns")))
        return real_read_row_group(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    for name in ("read", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, lambda *a, **k: pytest.fail("whole-shard read"))

    sample = coll.read_sample(row, ["B04", "B03", "B02"])
    assert calls == [(2, columns)]
    wanted = chunk_ranges(2, set(columns))
    others = [r for rg in range(meta.num_row_groups) if rg != 2 for r in chunk_ranges(rg)]
    others += [r for r in chunk_ranges(2) if r not in wanted]   # unrequested bands of the same sample
    file_size = shard.stat().st_size
    footer_start = file_size - meta.serialized_size - 8
    # the footer is found by one speculative read of the file's tail; every other read is data
    data_reads = [(o, o + n) for o, n in log if n and o + n < file_size]
    assert data_reads, "no data was read"
    for lo, hi in data_reads:
        for a, b in others:
            assert hi <= a or lo >= b, f"read [{lo}, {hi}) overlaps another column chunk [{a}, {b})"
    assert sum(n for _, n in log) < shard.stat().st_size / 2
    assert sample.pixels.shape == (3, SIZE, SIZE)

    # a second read of the same shard reuses the cached footer: only column chunks are read
    log.clear()
    coll.read_sample(row, ["B04"])
    assert log and all(o + n <= footer_start for o, n in log if n)


# --------------------------------------------------------------------------------------------
# decoding


def _expected_10m(band_pixels: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Nearest-neighbour upsampling written as an index lookup (independent of core's method)."""
    factor = size // band_pixels.shape[0]
    idx = np.arange(size) // factor
    return band_pixels[idx[:, None], idx[None, :]]


def test_band_order_and_nearest_upsampling(s2l1c_collection, l1c):
    row = l1c.metadata().iloc[0]
    bands = ["B11", "B02", "B09", "B8A", "B04", "B10"]
    sample = l1c.read_sample(row, bands)
    assert sample.bands == tuple(bands)
    assert sample.pixels.dtype == np.uint16 and sample.pixels.shape == (len(bands), SIZE, SIZE)
    for k, band in enumerate(bands):
        native = _raw_band(s2l1c_collection, row, band)
        np.testing.assert_array_equal(sample.pixels[k], _expected_10m(native), err_msg=band)
    # a 20 m pixel fills exactly its 2x2 block, a 60 m pixel its 6x6 block
    b11 = _raw_band(s2l1c_collection, row, "B11")
    assert (sample.pixels[0, 200:202, 300:302] == b11[100, 150]).all()
    b09 = _raw_band(s2l1c_collection, row, "B09")
    assert (sample.pixels[2, 600:606, 60:66] == b09[100, 10]).all()


@pytest.mark.parametrize("workers", [1, 3])
def test_decode_threads_give_identical_pixels(l1c, workers):
    row = l1c.metadata().iloc[1]
    one = l1c.read_sample(row, S2L1C_BANDS, max_workers=1)
    other = l1c.read_sample(row, S2L1C_BANDS, max_workers=workers)
    np.testing.assert_array_equal(one.pixels, other.pixels)
    assert one.transform == other.transform and one.crs == other.crs


def test_transform_without_a_10m_band_is_derived(l1c):
    row = l1c.metadata().iloc[0]
    full = l1c.read_sample(row, ["B04", "B05"])
    coarse_only = l1c.read_sample(row, ["B05", "B01"])
    assert coarse_only.transform == pytest.approx(full.transform)
    assert coarse_only.crs == full.crs
    np.testing.assert_array_equal(coarse_only.pixels[0], full.pixels[1])


def test_sample_georeferencing_matches_the_grid(l1c):
    g = grid.Grid()
    md = l1c.metadata()
    for _, row in md.drop_duplicates("grid_cell").iterrows():
        sample = l1c.read_sample(row, ["B04"])
        r, c = grid.parse_cell_name(row["grid_cell"])
        epsg = int(g.utm_epsg(r, c))
        assert sample.crs == f"EPSG:{epsg}" == row["crs"]
        a, b, x0, d, e, y_top = sample.transform
        assert (a, b, d, e) == (10.0, 0.0, 0.0, -10.0)
        lat, lon = (float(v) for v in g.cell_corner(r, c))
        east, north = Transformer.from_crs("EPSG:4326", sample.crs, always_xy=True).transform(lon, lat)
        y_bottom = y_top - SIZE * 10.0
        # image bottom-left = cell bottom-left snapped down to the 10 m lattice
        assert 0 <= east - x0 < 10 and 0 <= north - y_bottom < 10, row["grid_cell"]
        assert x0 % 10 == 0 and y_bottom % 10 == 0


def test_default_cells_cover_antimeridian_and_utm_exceptions(l1c):
    md = l1c.metadata().drop_duplicates("grid_cell")
    g = grid.Grid()
    corners = {c: tuple(float(v) for v in g.cell_corner(*grid.parse_cell_name(c))) for c in md["grid_cell"]}
    lons = [lon for _, lon in corners.values()]
    assert min(lons) == -180.0 and max(lons) > 179.9
    assert {"EPSG:32701", "EPSG:32760"} <= set(md["crs"])            # zones 1 and 60
    assert "EPSG:32632" in set(md.loc[md["centre_lat"].between(56, 64), "crs"])   # Norway 32V
    svalbard = md[md["centre_lat"] > 72]
    assert len(svalbard) and set(svalbard["crs"]) <= {"EPSG:32631", "EPSG:32633", "EPSG:32635", "EPSG:32637"}


def test_s1_sample_is_float32(s1rtc_collection):
    s1 = CoreCollection(str(s1rtc_collection))
    row = s1.metadata().iloc[0]
    sample = s1.read_sample(row, list(S1RTC_BANDS))
    assert sample.pixels.dtype == np.float32 and sample.pixels.shape == (2, SIZE, SIZE)
    np.testing.assert_array_equal(sample.pixels[1], _raw_band(s1rtc_collection, row, "vh"))


def test_nodata_fraction_and_timestamp(l2a, l2a_meta):
    row = l2a_meta.sort_values("nodata").iloc[-1]
    assert row["nodata"] > 0
    sample = l2a.read_sample(row, ["B04", "B03"])
    b04 = sample.pixels[0]
    assert sample.nodata_fraction == pytest.approx(float(((b04 == 0) & (sample.pixels[1] == 0)).mean()))
    assert sample.nodata_fraction == pytest.approx(row["nodata"], abs=1e-4)
    assert sample.timestamp == row["when"]


# --------------------------------------------------------------------------------------------
# errors


def _one_sample_collection(src_dir, dst_dir, meta_row, edit) -> pd.Series:
    """Copy one sample into a new collection after edit(table) -> table."""
    table = pq.ParquetFile(src_dir / meta_row["parquet_url"]).read_row_group(int(meta_row["parquet_row"]))
    (dst_dir / "images").mkdir(parents=True)
    pq.write_table(edit(table), dst_dir / "images" / "part_00000.parquet")
    row = meta_row.copy()
    row["parquet_url"], row["parquet_row"] = "images/part_00000.parquet", 0
    pq.write_table(pa.Table.from_pandas(pd.DataFrame([row]).drop(columns=["when"])), dst_dir / "metadata.parquet")
    return row


def _check_names_all(err: SampleError, row, band):
    text = str(err.value)
    assert row["product_id"] in text and row["grid_cell"] in text and "part_00000.parquet" in text
    if band:
        assert band in text and err.value.band == band
    assert err.value.product_id == row["product_id"] and err.value.grid_cell == row["grid_cell"]


def test_corrupt_band_bytes_raise_sample_error(s2l2a_collection, l2a_meta, tmp_path):
    src = l2a_meta.iloc[0]

    def corrupt(table):
        i = table.schema.get_field_index("B11")
        return table.set_column(i, "B11", pa.array([b"II*\x00 not a tiff at all"], pa.binary()))

    row = _one_sample_collection(s2l2a_collection, tmp_path / "c", src, corrupt)
    coll = CoreCollection(str(tmp_path / "c"))
    with pytest.raises(SampleError) as err:
        coll.read_sample(row, ["B04", "B11"])
    _check_names_all(err, row, "B11")
    assert "undecodable" in str(err.value)


def test_missing_band_column_raises_sample_error(s2l2a_collection, l2a_meta, tmp_path):
    src = l2a_meta.iloc[0]
    row = _one_sample_collection(s2l2a_collection, tmp_path / "c", src, lambda t: t.drop_columns(["B8A"]))
    coll = CoreCollection(str(tmp_path / "c"))
    assert len(coll.metadata()) == 1
    with pytest.raises(SampleError) as err:
        coll.read_sample(row, S2L2A_BANDS)
    _check_names_all(err, row, "B8A")


def test_mismatched_row_group_raises_sample_error(s2l2a_collection, l2a_meta, tmp_path):
    src = l2a_meta.iloc[0]
    other = l2a_meta[l2a_meta["grid_cell"] != src["grid_cell"]].iloc[0]

    def swap_cell(table):
        i = table.schema.get_field_index("grid_cell")
        return table.set_column(i, "grid_cell", pa.array([other["grid_cell"]]))

    row = _one_sample_collection(s2l2a_collection, tmp_path / "c", src, swap_cell)
    with pytest.raises(SampleError) as err:
        CoreCollection(str(tmp_path / "c")).read_sample(row, ["B04"])
    _check_names_all(err, row, None)
    assert other["grid_cell"] in str(err.value)


def test_decode_rejects_non_integral_and_wrong_shapes(s2l2a_collection, l2a_meta):
    row = l2a_meta.iloc[0]
    b04 = _raw_band(s2l2a_collection, row, "B04")

    def tiff(array):
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                          dtype=array.dtype, crs="EPSG:32632",
                          transform=Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0)) as ds:
                ds.write(array, 1)
            return mem.read()

    ok = tiff(b04)
    for bad_shape in [(500, 500), (534, 500), (2136, 2136)]:
        raw = {"B04": ok, "B05": tiff(np.ones(bad_shape, np.uint16))}
        with pytest.raises(SampleError) as err:
            decode_bands(raw, ["B04", "B05"], SIZE, product_id="P1", grid_cell="1U_1R", file="f.parquet")
        assert err.value.band == "B05" and "P1" in str(err.value) and "1U_1R" in str(err.value)
    with pytest.raises(SampleError, match="missing"):
        decode_bands({"B04": ok}, ["B04", "B03"], SIZE, product_id="P1", grid_cell="1U_1R")
    with pytest.raises(SampleError, match="empty"):
        decode_bands({"B04": ok, "B03": None}, ["B04", "B03"], SIZE, product_id="P1", grid_cell="1U_1R")


# Nominal resolutions as STANDARD.md §1 / the Sentinel-2 and Sentinel-1 RTC products give them,
# written out here independently of core's table.
STANDARD_RESOLUTION_M = {"B02": 10, "B03": 10, "B04": 10, "B08": 10, "B05": 20, "B06": 20, "B07": 20,
                         "B8A": 20, "B11": 20, "B12": 20, "B01": 60, "B09": 60, "B10": 60, "vv": 10, "vh": 10}


def _tiff_at(side: int, pixel_m: float, dtype="uint16") -> bytes:
    """A side x side single-band GeoTIFF whose geotransform claims `pixel_m` metre pixels."""
    array = (np.arange(side * side) % 997).astype(dtype).reshape(side, side)
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=side, height=side, count=1, dtype=dtype, crs="EPSG:32632",
                      transform=Affine(pixel_m, 0.0, 500000.0, 0.0, -pixel_m, 5000000.0)) as ds:
            ds.write(array, 1)
        return mem.read()


def test_band_resolution_table_matches_the_standard():
    for band in (*S2L1C_BANDS, *S1RTC_BANDS):
        assert core.BAND_RESOLUTION_M[band] == STANDARD_RESOLUTION_M[band], band
        assert core.band_factor(band) == STANDARD_RESOLUTION_M[band] // 10
    with pytest.raises(ValueError, match="unknown band 'B13'"):
        decode_bands({"B13": _tiff_at(8, 10.0)}, ["B13"], 8, product_id="P", grid_cell="1U_1R")


@pytest.mark.parametrize(("band", "side", "pixel_m", "expected"), [
    ("B04", 96, 40.0, 384),   # a 10 m band a quarter of the size, with a matching 40 m geotransform
    ("B05", 96, 80.0, 192),   # a 20 m band whose size is an integral (x4) but wrong fraction
    ("B01", 192, 20.0, 64),   # a 60 m band at 20 m: integral x2, still wrong
    ("vv", 192, 20.0, 384),   # S1 is 10 m: half-size backscatter is not upsampled
    ("B04", 500, 10.0, 384),  # larger than the image
])
def test_a_band_of_the_wrong_size_is_rejected_not_stretched(band, side, pixel_m, expected):
    size = 384
    dtype = "float32" if band in S1RTC_BANDS else "uint16"
    with pytest.raises(core.BandSizeError) as err:
        decode_bands({band: _tiff_at(side, pixel_m, dtype)}, [band], size, product_id="P7", grid_cell="9U_3R",
                     file="images/part_00002.parquet")
    e = err.value
    resolution = STANDARD_RESOLUTION_M[band]
    assert isinstance(e, SampleError)
    assert (e.product_id, e.grid_cell, e.band, e.file) == ("P7", "9U_3R", band, "images/part_00002.parquet")
    assert e.reason == f"{resolution} m band {band} is {side}×{side} px, expected {expected}×{expected}"
    assert all(s in str(e) for s in ("P7", "9U_3R", f"band={band}", "part_00002.parquet"))
    assert (e.actual, e.expected, e.resolution_m) == ((side, side), (expected, expected), resolution)
    assert e.side_10m == side * resolution // 10
    back = pickle.loads(pickle.dumps(e))   # crosses process boundaries with its class and sizes
    assert type(back) is core.BandSizeError and str(back) == str(e) and back.side_10m == e.side_10m


def test_bands_of_their_nominal_size_are_upsampled_by_their_own_factor():
    size = 384
    raw = {"B04": _tiff_at(384, 10.0), "B05": _tiff_at(192, 20.0), "B01": _tiff_at(64, 60.0)}
    pixels, _, transform = decode_bands(raw, ["B04", "B05", "B01"], size, product_id="P", grid_cell="C")
    for k, (band, factor) in enumerate((("B04", 1), ("B05", 2), ("B01", 6))):
        with MemoryFile(raw[band]) as mem, mem.open() as ds:
            native = ds.read(1)
        idx = np.arange(size) // factor
        np.testing.assert_array_equal(pixels[k], native[idx[:, None], idx[None, :]], err_msg=band)
    assert transform[0] == 10.0
    with pytest.raises(SampleError, match="not a multiple of the 60 m band's factor 6"):
        decode_bands({"B01": _tiff_at(64, 60.0)}, ["B01"], 386, product_id="P", grid_cell="C")


def test_shorten_reason_keeps_the_start_and_the_location():
    gdal = "undecodable GeoTIFF: RasterioIOError: " + "TIFFReadEncodedStrip() failed; " * 40
    err = SampleError(gdal, product_id="S2A_MSIL2A_X", grid_cell="9U_3R", band="B03",
                      file="/data/shards/S2L2A/row=9U/images/samples-0123456789abcdef.parquet")
    short = core.shorten_reason(str(err), width=200)
    assert len(short) < len(str(err)) and "…" in short
    assert short.startswith("undecodable GeoTIFF: RasterioIOError: TIFFReadEncodedStrip")
    assert short.endswith("(product_id=S2A_MSIL2A_X, grid_cell=9U_3R, band=B03, "
                          "file=/data/shards/S2L2A/row=9U/images/samples-0123456789abcdef.parquet)")
    assert core.shorten_reason("short reason", width=200) == "short reason"


def test_sample_error_pickles_with_its_fields():
    err = SampleError("bad", product_id="P", grid_cell="1U_1R", band="B04", file="x.parquet")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.product_id, back.grid_cell, back.band, back.file) == ("bad", "P", "1U_1R", "B04",
                                                                                   "x.parquet")
    assert str(back) == str(err)


# --------------------------------------------------------------------------------------------
# hf:// without the network


SECRET = "hf_testsecret_0123456789abcdefXYZ"


def test_hf_url_uses_hf_filesystem_and_hides_the_token(monkeypatch):
    from huggingface_hub import HfFileSystem

    monkeypatch.setenv("HF_TOKEN", SECRET)
    coll = CoreCollection("hf://datasets/Major-TOM/Core-S2L2A")
    assert isinstance(coll.fs, HfFileSystem)
    assert coll.root == "datasets/Major-TOM/Core-S2L2A"
    assert coll.fs.token == SECRET
    assert SECRET not in repr(coll) and SECRET not in coll.url
    url = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_01234.parquet"
    assert coll.shard_path(url) == "datasets/Major-TOM/Core-S2L2A/images/part_01234.parquet"
    with pytest.raises(ValueError) as err:
        CoreCollection("hf://datasets/Major-TOM/Core-S2L2A", storage_options={"token": SECRET})
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="hf://datasets"):
        CoreCollection("hf://Major-TOM/Core-S2L2A")


def test_hf_without_env_token_sends_none(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert CoreCollection("hf://datasets/Major-TOM/Core-S1RTC").fs.token is False


def test_hf_read_path_with_network_mocked(s2l2a_collection, l2a_meta, monkeypatch):
    """The hf:// collection reads metadata and samples through HfFileSystem; only its two network
    calls (info, open) are served from the local copy."""
    from huggingface_hub import HfFileSystem

    monkeypatch.setenv("HF_TOKEN", SECRET)
    prefix = "datasets/Major-TOM/Core-S2L2A"
    local = str(s2l2a_collection)
    seen = []

    def fake_info(self, path, **kwargs):
        seen.append(("info", path))
        info = dict(__import__("fsspec").filesystem("file").info(path.replace(prefix, local, 1)))
        info["name"] = path
        return info

    def fake_open(self, path, mode="rb", **kwargs):
        seen.append(("open", path))
        if "part_00001" in path:
            raise OSError("502 Bad Gateway from https://huggingface.co (network mocked)")
        return open(path.replace(prefix, local, 1), mode)

    monkeypatch.setattr(HfFileSystem, "info", fake_info)
    monkeypatch.setattr(HfFileSystem, "open", fake_open)
    coll = CoreCollection("hf://" + prefix)
    md = coll.metadata(MetadataFilter(max_cloud_cover=100))
    assert len(md) == len(l2a_meta)
    row = md[md["parquet_url"].str.endswith("part_00000.parquet")].iloc[0]
    sample = coll.read_sample(row, ["B04"])
    np.testing.assert_array_equal(sample.pixels[0], _raw_band(s2l2a_collection, row, "B04"))
    assert ("open", f"{prefix}/images/part_00000.parquet") in seen
    bad = md[md["parquet_url"].str.endswith("part_00001.parquet")].iloc[0]
    with pytest.raises(SampleError) as err:
        coll.read_sample(bad, ["B04"])
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert bad["product_id"] in str(err.value)


def test_local_collection_copy_reads_anywhere(s2l2a_collection, l2a_meta, tmp_path):
    """A mirrored collection whose metadata points at huggingface.co still reads its own shards."""
    mirror = tmp_path / "mirror"
    shutil.copytree(s2l2a_collection / "images", mirror / "images")
    meta = pq.read_table(s2l2a_collection / "metadata.parquet").to_pandas()
    meta["parquet_url"] = ("https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/"
                           + meta["parquet_url"])
    pq.write_table(pa.Table.from_pandas(meta), mirror / "metadata.parquet")
    coll = CoreCollection(f"file://{mirror}")
    row = coll.metadata().iloc[-1]
    assert coll.read_sample(row, ["B02"]).pixels.shape == (1, SIZE, SIZE)


def _decode_in_child(raw):
    pixels, crs, _ = decode_bands(raw, ["B04", "B05"], SIZE, product_id="P", grid_cell="C", max_workers=2)
    return pixels.shape, crs


def test_decode_pool_survives_fork(l1c):
    """A forked worker (Dagster multiprocess, torch DataLoader) must not reuse the parent's dead pool."""
    import multiprocessing

    row = l1c.metadata().iloc[0]
    raw = l1c.read_raw(row["parquet_url"], row["parquet_row"], ["B04", "B05"])
    parent = decode_bands(raw, ["B04", "B05"], SIZE, product_id="P", grid_cell="C", max_workers=2)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        shape, crs = pool.apply_async(_decode_in_child, (raw,)).get(timeout=60)
    assert shape == parent[0].shape and crs == parent[1]


def test_read_sample_accepts_dicts_and_namedtuples(l1c):
    md = l1c.metadata()
    from_series = l1c.read_sample(md.iloc[0], ["B02"])
    from_dict = l1c.read_sample(md.iloc[0].to_dict(), ["B02"])
    from_tuple = l1c.read_sample(next(md.itertuples()), ["B02"])
    np.testing.assert_array_equal(from_series.pixels, from_dict.pixels)
    np.testing.assert_array_equal(from_series.pixels, from_tuple.pixels)
    assert from_tuple.timestamp == from_series.timestamp


def test_labels_live_on_the_collection(s2l2a_collection, tmp_path):
    collection = CoreCollection(str(s2l2a_collection))
    assert collection.labels_path == f"{s2l2a_collection}/{core.LABELS_FILE}"
    labels = collection.labels()
    assert list(labels.columns)[:3] == ["grid_cell", "class_id", "class_name"]
    assert set(labels["grid_cell"]) == set(collection.metadata()["grid_cell"])
    bare = tmp_path / "Core-bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match=r"Core-bare has no labels.parquet \(grid_cell, class_id"):
        CoreCollection(str(bare)).labels()

"""GeoTIFF without GDAL or imagecodecs: the numpy writer and the zlib decode path (GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.io import MemoryFile

from majortom_assets import geotiff, synthetic

TRANSFORM = (20.0, 0.0, 500000.0, 0.0, -20.0, 5000000.0)


@pytest.mark.parametrize(("dtype", "side", "compress"), [
    (np.uint16, 534, "deflate"), (np.uint16, 178, "none"), (np.uint8, 1068, "deflate"),
    (np.float32, 534, "deflate"), (np.uint16, 6, "deflate"),
])
def test_numpy_writer_reads_back_through_gdal_and_the_direct_decoder(dtype, side, compress):
    rng = np.random.default_rng(side)
    band = (rng.random((side, side)) * 5000).astype(dtype)
    data = synthetic.encode_geotiff_numpy(band, TRANSFORM, 32633, compress, nodata=0)
    with MemoryFile(data) as memfile, memfile.open() as ds:
        np.testing.assert_array_equal(ds.read(1), band)
        assert ds.crs.to_string() == "EPSG:32633" and tuple(ds.transform)[:6] == TRANSFORM and ds.nodata == 0
        gdal_rows = ds.block_shapes[0][0]
    gdal = synthetic.encode_geotiff(band, TRANSFORM, 32633, compress)   # rasterio's file, for the layout
    with MemoryFile(gdal) as memfile, memfile.open() as ds:
        assert ds.block_shapes[0][0] == gdal_rows   # the same strips: the decoder does the same work
    pixels, info = geotiff.read_direct(data)
    np.testing.assert_array_equal(pixels, band)
    assert (info.crs, info.transform) == ("EPSG:32633", TRANSFORM)


def test_numpy_writer_names_what_it_cannot_write():
    with pytest.raises(ValueError, match="needs rasterio"):
        synthetic.encode_geotiff_numpy(np.zeros((6, 6), np.uint16), TRANSFORM, 32633, "lzw")


def test_zlib_path_decodes_gdal_files_like_imagecodecs(monkeypatch):
    band = (np.random.default_rng(1).random((534, 534)) * 9000).astype(np.uint16)
    data = synthetic.encode_geotiff(band, TRANSFORM, 32633, "deflate")   # GDAL, predictor 2
    with_codecs, _ = geotiff.decode_band(data)
    monkeypatch.setattr(geotiff, "_imagecodecs", None)
    monkeypatch.setattr(geotiff, "rasterio", None)
    with geotiff.open_band(data) as opened:
        assert opened.direct
        np.testing.assert_array_equal(opened.read(), with_codecs)
    np.testing.assert_array_equal(with_codecs, band)
    assert geotiff.read_header(data).crs == "EPSG:32633"   # spelled as rasterio spells it


def test_without_rasterio_an_out_of_scope_band_says_what_is_missing(monkeypatch):
    data = synthetic.encode_geotiff(np.ones((6, 6), np.uint16), TRANSFORM, 32633, "zstd")
    monkeypatch.setattr(geotiff, "_imagecodecs", None)
    monkeypatch.setattr(geotiff, "rasterio", None)
    with pytest.raises(geotiff.GeoTiffError, match=r"compression 50000 needs imagecodecs.*rasterio.*not installed"):
        geotiff.decode_band(data)

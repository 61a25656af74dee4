"""Single-band GeoTIFF decoding: a direct imagecodecs decoder for Core's layout, rasterio otherwise.

rasterio spends ~0.5 ms opening each in-memory band and its DEFLATE path is ~1.5x slower than
libdeflate called straight into the output array (docs/benchmarks.md, "Embedding engine"). The common layout
-- one little-endian classic-TIFF band, strips or tiles, no / DEFLATE / LZW / ZSTD compression,
predictor 1-3, an EPSG projected CRS, a north-up pixel-is-area grid -- is decoded here; any other
file, and any damaged one, goes to rasterio, which also words every error message.

This module knows nothing of Core samples: it turns bytes into pixels, a CRS and an affine.

Both libraries are optional so the engine runs on a machine that has neither (the GPU check,
docs/benchmarks.md "GPU check"): without imagecodecs DEFLATE strips are inflated with the
standard library's zlib (which releases the GIL) and the integer predictor is undone with numpy;
without rasterio a file outside the direct decoder's scope is a ``GeoTiffError`` that says so.
``MAJORTOM_DIRECT_DECODE=0`` in the environment (or ``DIRECT_DECODE = False``) forces rasterio for
every band (benchmarks, bisecting a decode issue).
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # optional: the direct decoder reads Core's layout without GDAL
    import rasterio.crs
    from rasterio.io import MemoryFile
except ImportError:  # pragma: no cover - depends on the environment
    rasterio = MemoryFile = None

try:  # optional: without imagecodecs only uncompressed bands take the direct path
    import imagecodecs as _imagecodecs
except ImportError:  # pragma: no cover - depends on the environment
    _imagecodecs = None

DIRECT_DECODE: bool = os.environ.get("MAJORTOM_DIRECT_DECODE", "1") != "0"


class GeoTiffError(ValueError):
    """Bytes that neither decoder can read as a GeoTIFF band (the message is rasterio's)."""


class NotDirect(Exception):
    """The band is outside the direct decoder's scope (or damaged): decode it with rasterio."""


@dataclass(frozen=True)
class BandInfo:
    """What a GeoTIFF header says about its first band and its pixel grid."""

    height: int
    width: int
    count: int
    dtype: np.dtype
    crs: str | None                 # rasterio's spelling, e.g. "EPSG:32633"
    transform: tuple[float, ...]    # affine (a, b, c, d, e, f), rasterio order


def rasterio_available() -> bool:
    """Whether files outside the direct decoder's scope can be decoded at all."""
    return rasterio is not None


def imagecodecs_available() -> bool:
    """Whether compressed bands can take the direct path (uncompressed ones always can)."""
    return _imagecodecs is not None


def _as_buffer(data: Any) -> memoryview:
    return (data if isinstance(data, memoryview) else memoryview(data)).cast("B")


# ---- TIFF structure ---------------------------------------------------------------------------
_TIFF_TYPES = {1: "u1", 2: "u1", 3: "<u2", 4: "<u4", 6: "i1", 7: "u1", 8: "<i2", 9: "<i4", 11: "<f4",
               12: "<f8", 16: "<u8", 17: "<i8"}
_TIFF_RATIONAL = 5
IFD_ENTRY = np.dtype([("tag", "<u2"), ("type", "<u2"), ("count", "<u4"), ("value", "<u4")])
_SAMPLE_DTYPES = {(1, 8): np.dtype("u1"), (1, 16): np.dtype("<u2"), (1, 32): np.dtype("<u4"),
                  (2, 8): np.dtype("i1"), (2, 16): np.dtype("<i2"), (2, 32): np.dtype("<i4"),
                  (3, 32): np.dtype("<f4"), (3, 64): np.dtype("<f8")}
# Tags the direct path understands or may ignore; any other tag (ExtraSamples, ColorMap,
# ModelTransformation, JPEG tables, ...) could change the pixels or the grid: rasterio decodes it.
_TIFF_KNOWN_TAGS = frozenset({254, 256, 257, 258, 259, 262, 273, 274, 277, 278, 279, 282, 283, 284, 296,
                              305, 306, 317, 322, 323, 324, 325, 339, 33550, 33922, 34735, 34736,
                              34737, 42112, 42113})
# GeoKeys a plain projected "EPSG:<code>" CRS carries (model/raster type, citations, units).
_PLAIN_GEOKEYS = frozenset({1024, 1025, 1026, 2049, 2054, 3072, 3073, 3076})
_COMPRESSION_NONE, _COMPRESSION_LZW, _COMPRESSION_DEFLATE = 1, 5, 8
_COMPRESSION_ADOBE_DEFLATE, _COMPRESSION_ZSTD = 32946, 50000


def _tiff_tags(buf: memoryview) -> dict[int, np.ndarray]:
    """Tags of the first IFD of a classic little-endian TIFF, as numpy arrays."""
    if len(buf) < 8 or bytes(buf[:4]) != b"II*\x00":
        raise NotDirect("not a classic little-endian TIFF")
    ifd = int(np.frombuffer(buf, "<u4", 1, 4)[0])
    if ifd + 2 > len(buf):
        raise NotDirect("IFD outside the file")
    n = int(np.frombuffer(buf, "<u2", 1, ifd)[0])
    if ifd + 2 + n * 12 > len(buf):
        raise NotDirect("IFD outside the file")
    tags: dict[int, np.ndarray] = {}
    for tag, typ, count, value in np.frombuffer(buf, IFD_ENTRY, n, ifd + 2).tolist():
        if tag not in _TIFF_KNOWN_TAGS:
            raise NotDirect(f"tag {tag}")
        if typ == _TIFF_RATIONAL:
            continue   # only the (unused) resolution tags are rationals
        dtype = _TIFF_TYPES.get(typ)
        if dtype is None:
            raise NotDirect(f"tag type {typ}")
        dtype = np.dtype(dtype)
        size = dtype.itemsize * count
        if size <= 4:   # the value sits in the entry itself
            tags[tag] = np.array([value], "<u4").view("u1")[:size].view(dtype)
        elif value + size <= len(buf):
            tags[tag] = np.frombuffer(buf, dtype, count, value)
        else:
            raise NotDirect(f"tag {tag} outside the file")
    return tags


def _scalar(tags: dict[int, np.ndarray], tag: int, default: int | None = None) -> int:
    value = tags.get(tag)
    if value is None or value.size == 0:
        if default is None:
            raise NotDirect(f"tag {tag} missing")
        return default
    if value.size != 1:
        raise NotDirect(f"tag {tag} has {value.size} values")
    return int(value[0])


@functools.lru_cache(maxsize=512)
def _epsg_name(code: int) -> str:
    """rasterio's own spelling of an EPSG CRS, so both decoders return the same string."""
    if rasterio is None:
        return f"EPSG:{code}"   # what rasterio spells for every EPSG code the direct path accepts
    return rasterio.crs.CRS.from_epsg(code).to_string()


def _georeference(tags: dict[int, np.ndarray]) -> tuple[str, tuple[float, ...]]:
    keys = tags.get(34735)
    if keys is None or keys.size < 4 or keys.size < 4 * (int(keys[3]) + 1):
        raise NotDirect("no GeoKey directory")
    directory = keys[4: 4 * (int(keys[3]) + 1)].reshape(-1, 4).tolist()
    geokeys = {key: (location, value) for key, location, _, value in directory}
    if not set(geokeys) <= _PLAIN_GEOKEYS:
        raise NotDirect("GeoKeys beyond a plain EPSG CRS")
    model, raster = geokeys.get(1024, (None, None)), geokeys.get(1025, (0, 1))
    code = geokeys.get(3072, (None, None))
    if model != (0, 1) or raster != (0, 1) or code[0] != 0 or not 1024 <= (code[1] or 0) < 32767:
        raise NotDirect("not a projected EPSG CRS on a pixel-is-area grid")
    if geokeys.get(3076, (0, 9001)) != (0, 9001) or geokeys.get(2054, (0, 9102)) != (0, 9102):
        raise NotDirect("units other than metres and degrees")
    scale, tie = tags.get(33550), tags.get(33922)
    if scale is None or tie is None or scale.size < 2 or tie.size != 6 or tie[0] != 0 or tie[1] != 0:
        raise NotDirect("grid is not a pixel scale with a tie point at pixel (0, 0)")
    sx, sy = float(scale[0]), float(scale[1])
    return _epsg_name(int(code[1])), (sx, 0.0, float(tie[3]), 0.0, -sy, float(tie[4]))


def _decompressor(compression: int):
    """Callable (src, dst) -> bytes written, for the codecs the direct path handles."""
    if compression == _COMPRESSION_NONE:
        def copy(src: memoryview, dst: memoryview) -> int:
            n = min(len(src), len(dst))
            dst[:n] = src[:n]
            return n
        return copy
    if _imagecodecs is None:
        if compression in (_COMPRESSION_DEFLATE, _COMPRESSION_ADOBE_DEFLATE):
            return _zlib_inflate
        raise NotDirect(f"compression {compression} needs imagecodecs, which is not installed")
    decode = {_COMPRESSION_DEFLATE: _imagecodecs.deflate_decode,
              _COMPRESSION_ADOBE_DEFLATE: _imagecodecs.deflate_decode,
              _COMPRESSION_ZSTD: _imagecodecs.zstd_decode,
              _COMPRESSION_LZW: _imagecodecs.lzw_decode}.get(compression)
    if decode is None:
        raise NotDirect(f"compression {compression}")

    def run(src: memoryview, dst: memoryview) -> int:
        return len(decode(src, out=dst))
    return run


def _zlib_inflate(src: memoryview, dst: memoryview) -> int:
    """DEFLATE without imagecodecs: one extra copy, zlib itself runs outside the GIL."""
    data = zlib.decompress(src, bufsize=max(len(dst), 1))
    n = len(data)
    if n > len(dst):
        raise NotDirect("strip decodes to more bytes than it holds")
    dst[:n] = data
    return n


def _unpredict(block: np.ndarray, predictor: int) -> None:
    """Undo the TIFF predictor in place on (rows, cols) of one strip or tile."""
    if predictor == 2:
        if _imagecodecs is not None:
            _imagecodecs.delta_decode(block, axis=-1, out=block)
        else:
            np.cumsum(block, axis=-1, dtype=block.dtype, out=block)
    elif predictor == 3:
        if _imagecodecs is None:
            raise NotDirect("floating-point predictor needs imagecodecs")
        block[...] = _imagecodecs.floatpred_decode(block, axis=-1)
    elif predictor != 1:
        raise NotDirect(f"predictor {predictor}")


@dataclass(frozen=True)
class _TiffBand:
    """What the direct decoder needs from one GeoTIFF band, read from its first IFD."""

    info: BandInfo
    decompress: Callable[[memoryview, memoryview], int]
    predictor: int
    block: tuple[int, int] | None    # (tile length, tile width); None for strips
    rows_per_strip: int
    offsets: np.ndarray
    byte_counts: np.ndarray

    @classmethod
    def parse(cls, buf: memoryview) -> _TiffBand:
        tags = _tiff_tags(buf)
        if _scalar(tags, 254, 0) != 0 or _scalar(tags, 274, 1) != 1:
            raise NotDirect("subfile or non-default orientation")
        height, width = _scalar(tags, 257), _scalar(tags, 256)
        count = _scalar(tags, 277, 1)
        bits = tags.get(258)
        fmt = tags.get(339)
        if bits is None or bits.size != 1 or (fmt is not None and fmt.size != 1):
            raise NotDirect("per-sample formats")
        dtype = _SAMPLE_DTYPES.get((int(fmt[0]) if fmt is not None else 1, int(bits[0])))
        if dtype is None:
            raise NotDirect("sample format")
        if count != 1:
            raise NotDirect("more than one sample per pixel")
        decompress = _decompressor(_scalar(tags, 259, 1))
        predictor = _scalar(tags, 317, 1)
        if predictor not in (1, 2, 3):
            raise NotDirect(f"predictor {predictor}")
        if predictor == 3 and dtype.kind != "f" or predictor == 2 and dtype.kind == "f":
            raise NotDirect("predictor does not fit the sample format")
        if 322 in tags or 324 in tags:
            block: tuple[int, int] | None = (_scalar(tags, 323), _scalar(tags, 322))
            offsets, byte_counts = tags.get(324), tags.get(325)
            rows_per_strip = 0
        else:
            block = None
            offsets, byte_counts = tags.get(273), tags.get(279)
            rows_per_strip = min(_scalar(tags, 278, height), height)
        if offsets is None or byte_counts is None or offsets.size != byte_counts.size or rows_per_strip < 0:
            raise NotDirect("no data offsets")
        crs, transform = _georeference(tags)
        return cls(BandInfo(height, width, count, dtype, crs, transform), decompress, predictor, block, rows_per_strip, offsets.astype(np.int64), byte_counts.astype(np.int64))

    def read(self, buf: memoryview, out: np.ndarray) -> None:
        """Decode the pixels into ``out`` (height, width) of the band's dtype, C-contiguous."""
        height, width, dtype = self.info.height, self.info.width, self.info.dtype
        decompress = self.decompress
        ends = self.offsets + self.byte_counts
        if self.offsets.size and (self.offsets.min() < 0 or ends.max() > len(buf) or self.byte_counts.min() <= 0):
            raise NotDirect("data outside the file or sparse blocks")
        row_bytes = width * dtype.itemsize
        if self.block is None:
            strips = -(-height // self.rows_per_strip) if self.rows_per_strip else 0
            if self.offsets.size != strips:
                raise NotDirect("strip count")
            flat = memoryview(out.reshape(-1).view(np.uint8))
            step = self.rows_per_strip * row_bytes
            for k, (start, end) in enumerate(zip(self.offsets.tolist(), ends.tolist())):
                dst = flat[k * step: (k + 1) * step]
                if decompress(buf[start:end], dst) != len(dst):
                    raise NotDirect("strip decodes to the wrong size")
            if self.predictor != 1:   # each image row starts afresh, so one pass over the whole band
                _unpredict(out, self.predictor)
            return
        length, tile_width = self.block
        across, down = -(-width // tile_width), -(-height // length)
        if self.offsets.size != across * down:
            raise NotDirect("tile count")
        tile = np.empty((length, tile_width), dtype)
        tile_bytes = memoryview(tile.reshape(-1).view(np.uint8))
        for k, (start, end) in enumerate(zip(self.offsets.tolist(), ends.tolist())):
            if decompress(buf[start:end], tile_bytes) != len(tile_bytes):
                raise NotDirect("tile decodes to the wrong size")
            _unpredict(tile, self.predictor)
            r0, c0 = (k // across) * length, (k % across) * tile_width
            rows, cols = min(length, height - r0), min(tile_width, width - c0)
            out[r0: r0 + rows, c0: c0 + cols] = tile[:rows, :cols]


def _is_codec_error(exc: Exception) -> bool:
    """imagecodecs raises its own exception types for damaged streams."""
    return type(exc).__module__.split(".")[0] == "imagecodecs"


def _destination(info: BandInfo, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.empty((info.height, info.width), info.dtype)
    if out.shape != (info.height, info.width):
        raise ValueError(f"out has shape {out.shape}, the band is {info.height}x{info.width}")
    return out


def _parse_direct(buf: memoryview) -> _TiffBand:
    try:
        return _TiffBand.parse(buf)
    except (ValueError, TypeError) as exc:
        raise NotDirect(f"{type(exc).__name__}: {exc}") from exc


def _read_direct_into(tiff: _TiffBand, buf: memoryview, dst: np.ndarray) -> None:
    """Decode straight into ``dst`` when it has the band's dtype, else through a native array.

    Any failure -- damaged stream, codec error -- becomes ``NotDirect`` so rasterio can decide.
    """
    try:
        if dst.dtype == tiff.info.dtype and dst.flags.c_contiguous:
            tiff.read(buf, dst)
        else:
            native = np.empty((tiff.info.height, tiff.info.width), tiff.info.dtype)
            tiff.read(buf, native)
            dst[...] = native
    except NotDirect:
        raise
    except (ValueError, TypeError, RuntimeError, zlib.error) as exc:
        raise NotDirect(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if not _is_codec_error(exc):
            raise
        raise NotDirect(f"{type(exc).__name__}: {exc}") from exc


# ---- the two decoders -------------------------------------------------------------------------
def read_direct(data: Any, out: np.ndarray | None = None) -> tuple[np.ndarray, BandInfo]:
    """Decode with the direct path only; ``NotDirect`` for any file outside its scope or damaged.

    ``out`` (height, width) of any dtype receives the pixels (cast if the band's dtype differs).
    """
    buf = _as_buffer(data)
    tiff = _parse_direct(buf)
    dst = _destination(tiff.info, out)
    _read_direct_into(tiff, buf, dst)
    return dst, tiff.info


_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")   # classic and BigTIFF, both byte orders
_OTHER_FORMATS = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
                  (b"GIF8", "GIF"), (b"RIFF", "WebP/RIFF"), (b"BM", "BMP"), (b"%PDF", "PDF"),
                  (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"))


def check_container(buf: memoryview) -> None:
    """``GeoTiffError`` saying what the bytes are when they cannot be a GeoTIFF at all.

    Without it an empty band reached GDAL as "'driver' is required" and a PNG decoded without a
    georeference surfaced much later as "band grid does not align".
    """
    if len(buf) == 0:
        raise GeoTiffError("band is empty (0 bytes): the shard stores no image for it; "
                           "re-create or re-download the shard")
    head = bytes(buf[:12])
    if head[:4] in _TIFF_MAGICS:
        return
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            raise GeoTiffError(f"band is a {name} image, not a GeoTIFF: Core bands are single-band GeoTIFFs "
                               f"with their UTM georeference; re-encode the band as GeoTIFF")
    raise GeoTiffError(f"band is not a GeoTIFF (first bytes {head[:8]!r}, {len(buf)} bytes): Core bands are "
                       f"single-band GeoTIFFs; the shard is damaged or holds another format")


def _rasterio_info(ds) -> BandInfo:
    return BandInfo(ds.height, ds.width, ds.count, np.dtype(ds.dtypes[0]),
                    ds.crs.to_string() if ds.crs is not None else None, tuple(ds.transform)[:6])


def _undecodable(exc: Exception) -> GeoTiffError:
    return GeoTiffError(f"undecodable GeoTIFF: {type(exc).__name__}: {exc}")


def read_rasterio(data: Any, out: np.ndarray | None = None) -> tuple[np.ndarray, BandInfo]:
    """Decode the first band with rasterio/GDAL; ``GeoTiffError`` for bytes GDAL cannot read."""
    with open_band(data, direct=False) as band:
        return band.read(out), band.info


# ---- the entry points -------------------------------------------------------------------------
class GeoTiffBand:
    """An opened band: its header first (so callers can choose a destination), pixels on ``read``.

    The direct decoder is tried first; a file outside its scope, or one it finds damaged while
    reading, is opened with rasterio instead, so the result never depends on which one ran.
    """

    def __init__(self, data: Any, direct: bool | None = None) -> None:
        self._data = data
        self._buf = _as_buffer(data)
        check_container(self._buf)
        self._tiff: _TiffBand | None = None
        self._memfile = self._ds = self._ds_info = None
        self._why_not_direct = "the direct decoder is switched off"
        if DIRECT_DECODE if direct is None else direct:
            try:
                self._tiff = _parse_direct(self._buf)
            except NotDirect as exc:
                self._tiff = None   # out of scope or damaged: rasterio decides, and names the problem
                self._why_not_direct = str(exc)
        self.info: BandInfo = self._tiff.info if self._tiff is not None else self._open_rasterio()

    @property
    def direct(self) -> bool:
        """Whether the direct decoder takes this file (a stream it finds damaged still goes to rasterio)."""
        return self._tiff is not None

    def _open_rasterio(self) -> BandInfo:
        if rasterio is None:
            raise GeoTiffError(f"GeoTIFF outside the direct decoder's scope ({self._why_not_direct}) and "
                               f"rasterio, which would decode it, is not installed")
        if self._ds is None:
            try:
                self._memfile = MemoryFile(bytes(self._data))
                self._ds = self._memfile.open()
                self._ds_info = _rasterio_info(self._ds)
            except Exception as exc:  # noqa: BLE001 -- GDAL raises many types for bad bytes
                self.close()
                raise _undecodable(exc) from None
        return self._ds_info

    def read(self, out: np.ndarray | None = None) -> np.ndarray:
        """The band's pixels, into ``out`` (height, width; cast when its dtype differs) if given."""
        dst = _destination(self.info, out)
        if self._tiff is not None:
            try:
                _read_direct_into(self._tiff, self._buf, dst)
                return dst
            except NotDirect as exc:
                self._tiff = None   # damaged: rasterio decides, and names the problem
                self._why_not_direct = str(exc)
        info = self._open_rasterio()
        if (info.height, info.width) != dst.shape:
            raise GeoTiffError(f"undecodable GeoTIFF: header says {dst.shape[0]}x{dst.shape[1]}, "
                               f"GDAL reads {info.height}x{info.width}")
        ds = self._ds
        try:
            if info.dtype == dst.dtype:
                ds.read(1, out=dst)
            else:
                dst[...] = ds.read(1)
        except Exception as exc:  # noqa: BLE001 -- GDAL raises many types for bad bytes
            raise _undecodable(exc) from None
        return dst

    def close(self) -> None:
        for handle in (self._ds, self._memfile):
            if handle is not None:
                handle.close()
        self._memfile = self._ds = self._ds_info = None


@contextmanager
def open_band(data: Any, *, direct: bool | None = None) -> Iterator[GeoTiffBand]:
    """Open GeoTIFF bytes (bytes, bytearray or memoryview, not copied on the direct path).

    ``direct=None`` follows ``DIRECT_DECODE``; ``False`` forces rasterio. Raises ``GeoTiffError``
    when neither decoder can read the header.
    """
    band = GeoTiffBand(data, direct)
    try:
        yield band
    finally:
        band.close()


def decode_band(data: Any, out: np.ndarray | None = None, *,
                direct: bool | None = None) -> tuple[np.ndarray, BandInfo]:
    """Pixels and header of the first band; ``GeoTiffError`` for bytes neither decoder reads."""
    with open_band(data, direct=direct) as band:
        return band.read(out), band.info


def read_header(data: Any) -> BandInfo:
    """Shape, dtype, CRS and affine of the first band, without decoding its pixels."""
    with open_band(data) as band:
        return band.info

"""Constants of the Major TOM standard (../shared/STANDARD.md §1) and of our output formats.

Every module that needs the Core image size, the list of Core sources, a band list, the pixel
size or the export precisions imports it from here, so a value is stated once: the reader, the
synthetic writer, the model registry, the engine, the Dagster layer and the CLI cannot drift
apart. Plain data only; this module imports nothing of the project.
"""

from __future__ import annotations

from typing import Literal, get_args

#: 10 m side of a Major TOM Core sample, in pixels (10 m bands are 1068 x 1068 px).
CORE_IMAGE_SIZE = 1068
#: Ground size of one pixel of the 10 m grid every sample is decoded to (metres).
NOMINAL_PIXEL_M = 10

#: The Core collections (`Core-<source>`) this project reads.
Source = Literal["S2L1C", "S2L2A", "S1RTC"]
SOURCES: tuple[str, ...] = get_args(Source)

# Band names exactly as the Core collections spell their columns.
S2L2A_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)
S2L1C_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)
S1RTC_BANDS: tuple[str, ...] = ("vv", "vh")
#: True colour, in the order the RGB models take it.
RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")
#: Spectral (or radar) bands of each source; S2 shards also hold a `cloud_mask` column.
BANDS: dict[str, tuple[str, ...]] = {"S2L1C": S2L1C_BANDS, "S2L2A": S2L2A_BANDS, "S1RTC": S1RTC_BANDS}
S2_MASK_COLUMNS: tuple[str, ...] = ("cloud_mask",)
#: A 10 m band of each source: its GeoTIFF header gives the sample's pixel grid and CRS.
REFERENCE_BAND: dict[str, str] = {"S2L1C": "B04", "S2L2A": "B04", "S1RTC": "vv"}

#: Nominal ground resolution (metres) of every Core band: the one source of upsampling factors.
#: Taken from the sensor, not from each GeoTIFF's pixel size, because the file is what may be
#: wrong: a 10 m band resampled to 96 px with a matching 40 m geotransform (or a truncated
#: band with a consistent header) would otherwise be "upsampled" x4 into a plausible image.
#: The table makes every band's expected size exact: ``size / (resolution / 10)``.
BAND_RESOLUTION_M: dict[str, int] = {
    **dict.fromkeys(("B02", "B03", "B04", "B08"), 10),
    **dict.fromkeys(("B05", "B06", "B07", "B8A", "B11", "B12"), 20),
    **dict.fromkeys(("B01", "B09", "B10"), 60),
    "cloud_mask": 10,
    "vv": 10, "vh": 10,
}

#: Precisions of the flat exports (`vectors.quantize`): every one `majortom export` writes and
#: the storage layout accepts under `exports/<model>/<precision>/`.
ExportPrecision = Literal["float32", "float16", "int8"]
EXPORT_PRECISIONS: tuple[str, ...] = get_args(ExportPrecision)
#: The exports the asset graph materialises per model (float32 is the GeoParquet itself).
ASSET_EXPORT_PRECISIONS: tuple[str, ...] = ("float16", "int8")

__all__ = [
    "ASSET_EXPORT_PRECISIONS",
    "BANDS",
    "BAND_RESOLUTION_M",
    "CORE_IMAGE_SIZE",
    "EXPORT_PRECISIONS",
    "NOMINAL_PIXEL_M",
    "REFERENCE_BAND",
    "RGB_BANDS",
    "S1RTC_BANDS",
    "S2L1C_BANDS",
    "S2L2A_BANDS",
    "S2_MASK_COLUMNS",
    "SOURCES",
    "ExportPrecision",
    "Source",
]

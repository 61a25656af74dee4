"""Input normalisation of the Major TOM models (STANDARD.md §4, Table 1 of the paper).

Every function takes raw band values as a (B, C, H, W) tensor (uint16 reflectance x1e4 for
Sentinel-2, float32 linear backscatter for Sentinel-1) and returns float32 model input of the
same spatial size (a new tensor; ``inplace=True`` lets a caller that owns a float32 input save
the copy): fragments already have the model's size, so nothing is resized or cropped,
and nothing is divided by 255 (the reference's DINOv2 path does both; see
`reference_dinov2_imagenet`, which reproduces it for comparison only).

Invalid values are mapped deterministically so a batch never produces NaN embeddings: NaN
becomes the noise floor (S1, 1e-10 linear = -100 dB) or nodata 0 (S2), negative backscatter is
clamped to the floor. The engine does not rely on this: it calls `find_invalid_values` first and
reports such samples instead of embedding them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from majortom_assets.models.spec import NORMALISATIONS

# Sentinel-2 Core bands store reflectance x 10 000 (ESA L1C/L2A quantification value).
S2_REFLECTANCE_SCALE = 1e4

# Sentinel-1 dB statistics of SSL4EO-S12 (Wang et al. 2023) as the Major TOM embeddings use them
# (STANDARD.md §4, Table 1): dB is mapped to [0, 1] over mean +- 2 std per polarisation.
S1_DB_FLOOR_LINEAR = 1e-10
S1_DB_MEAN = (-12.548, -20.192)  # vv, vh
S1_DB_STD = (5.257, 5.912)  # vv, vh

# True-colour rendering of the paper: clip(2.5 * reflectance, 0, 1).
RGB_GAIN = 2.5

# SigLIP image processor (google/siglip-so400m-patch14-384 preprocessor_config.json).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# ImageNet statistics used by DINOv2 (facebook/dinov2-base preprocessor_config.json).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What the reference DINOv2 path does on top (HF BitImageProcessor defaults of dinov2-base).
REFERENCE_DINOV2_RESIZE = 256
REFERENCE_DINOV2_CROP = 224
REFERENCE_DINOV2_RESCALE = 1.0 / 255.0


def _as_float(x: torch.Tensor, nan: float, inplace: bool) -> torch.Tensor:
    """float32 values of x: a fresh tensor unless `inplace` and x already is float32."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor of raw band values, got shape {tuple(x.shape)}")
    if x.is_floating_point():
        x = x if (inplace and x.dtype == torch.float32) else x.to(torch.float32, copy=True)
        return x.nan_to_num_(nan=nan)
    if x.dtype == torch.uint16:
        if x.device.type == "cpu":
            # torch's uint16 -> float32 cast is a slow scalar path on CPU; numpy's is vectorised
            out = torch.empty(x.shape, dtype=torch.float32)
            np.copyto(out.numpy(), x.numpy(), casting="safe")
            return out
        return widen_uint16(x)
    return x.to(torch.float32)


def widen_uint16(x: torch.Tensor) -> torch.Tensor:
    """uint16 -> float32 using only int16 kernels (uint16 kernels are sparse on accelerators)."""
    out = x.view(torch.int16).to(torch.float32)
    return out.add_((out < 0).to(torch.float32).mul_(65536.0))


def _channel_constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    if like.shape[1] != len(values):
        raise ValueError(f"expected {len(values)} channels, got {like.shape[1]}")
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def s2_reflectance(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """SSL4EO-S2: reflectance = DN / 1e4, no clipping (torchgeo SENTINEL2_ALL_* weights)."""
    return _as_float(x, 0.0, inplace).div_(S2_REFLECTANCE_SCALE)


def s1_db_minmax(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """SSL4EO-S1: dB = 10 log10(max(x, 1e-10)), then (dB - (mu - 2 sigma)) / (4 sigma) clipped to [0, 1]."""
    db = _as_float(x, S1_DB_FLOOR_LINEAR, inplace).clamp_min_(S1_DB_FLOOR_LINEAR).log10_().mul_(10.0)
    mean = _channel_constant(S1_DB_MEAN, db)
    std = _channel_constant(S1_DB_STD, db)
    return db.sub_(mean - 2.0 * std).div_(4.0 * std).clamp_(0.0, 1.0)


def true_colour(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """clip(2.5 * DN / 1e4, 0, 1): the paper's RGB rendering in [0, 1]."""
    return _as_float(x, 0.0, inplace).mul_(RGB_GAIN).div_(S2_REFLECTANCE_SCALE).clamp_(0.0, 1.0)


def rgb_siglip(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    v = true_colour(x, inplace)
    return v.sub_(_channel_constant(SIGLIP_MEAN, v)).div_(_channel_constant(SIGLIP_STD, v))


def rgb_imagenet(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    v = true_colour(x, inplace)
    return v.sub_(_channel_constant(IMAGENET_MEAN, v)).div_(_channel_constant(IMAGENET_STD, v))


def reference_dinov2_imagenet(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The public reference's DINOv2 input, reproduced for comparison only (STANDARD.md §4).

    The reference hands the [0, 1] true-colour fragment to the HF image processor, which resizes
    the short side to 256 (bicubic), centre-crops 224 (dropping the fragment's border) and divides
    by 255 a second time, so the model sees a near-constant image. Resampling here is torch's
    antialiased bicubic, so values match the reference up to resampling differences.
    """
    v = true_colour(x, inplace)
    v = F.interpolate(
        v, size=(REFERENCE_DINOV2_RESIZE, REFERENCE_DINOV2_RESIZE), mode="bicubic",
        align_corners=False, antialias=True,
    )
    top = (REFERENCE_DINOV2_RESIZE - REFERENCE_DINOV2_CROP) // 2
    v = v[:, :, top : top + REFERENCE_DINOV2_CROP, top : top + REFERENCE_DINOV2_CROP]
    v = v * REFERENCE_DINOV2_RESCALE
    return (v - _channel_constant(IMAGENET_MEAN, v)) / _channel_constant(IMAGENET_STD, v)


Normaliser = Callable[..., torch.Tensor]  # (x, inplace=False) -> float32 tensor

NORMALISERS: dict[str, Normaliser] = {
    "s2-reflectance": s2_reflectance,
    "s1-db-minmax": s1_db_minmax,
    "rgb-siglip": rgb_siglip,
    "rgb-imagenet": rgb_imagenet,
}

if set(NORMALISERS) != set(NORMALISATIONS):  # the registry's torch-free list of names
    raise ImportError(f"normalisers {sorted(NORMALISERS)} differ from spec.NORMALISATIONS {sorted(NORMALISATIONS)}")

# Compatibility variants, keyed by the normalisation they replace.
REFERENCE_NORMALISERS: dict[str, Normaliser] = {
    "rgb-imagenet": reference_dinov2_imagenet,
}

# Normalisations whose inputs are linear backscatter: negative values are physically invalid.
_NON_NEGATIVE = {"s1-db-minmax"}


def get_normaliser(normalisation: str, *, reference_compatible: bool = False) -> Normaliser:
    table = REFERENCE_NORMALISERS if reference_compatible else NORMALISERS
    try:
        return table[normalisation]
    except KeyError:
        if reference_compatible:
            raise ValueError(
                f"no reference-compatible variant of normalisation {normalisation!r}; "
                f"only {sorted(REFERENCE_NORMALISERS)} have one"
            ) from None
        raise ValueError(f"unknown normalisation {normalisation!r}; known: {sorted(NORMALISERS)}") from None


def find_invalid_values(
    pixels: np.ndarray | torch.Tensor, normalisation: str, bands: Sequence[str] | None = None
) -> str | None:
    """Why a sample's raw pixels (C, H, W) cannot be embedded faithfully, or None if they can.

    Flags non-finite values, negative backscatter (S1) and bands that hold nodata (0) only. The
    reason names the offending bands so the user can find them in the source file.
    """
    array = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if array.ndim != 3:
        raise ValueError(f"expected (C, H, W) pixels, got shape {array.shape}")
    names = list(bands) if bands is not None else [f"channel {i}" for i in range(array.shape[0])]
    if len(names) != array.shape[0]:
        raise ValueError(f"{len(names)} band names for {array.shape[0]} channels")
    flat = array.reshape(array.shape[0], -1)
    reasons: list[str] = []
    if np.issubdtype(flat.dtype, np.floating):
        bad = ~np.isfinite(flat)
        counts = bad.sum(axis=1)
        if counts.any():
            detail = ", ".join(f"{n}: {c}" for n, c in zip(names, counts, strict=True) if c)
            reasons.append(f"non-finite (NaN/inf) values ({detail})")
        if normalisation in _NON_NEGATIVE:
            negative = (flat < 0).sum(axis=1)
            if negative.any():
                detail = ", ".join(f"{n}: {c}" for n, c in zip(names, negative, strict=True) if c)
                reasons.append(f"negative backscatter values ({detail})")
        empty = ~np.any(np.nan_to_num(flat, nan=0.0) != 0, axis=1)
    elif np.issubdtype(flat.dtype, np.unsignedinteger):
        empty = flat.max(axis=1) == 0  # a SIMD max is several times faster than any() on uint16
    else:
        empty = ~(flat != 0).any(axis=1)
    if empty.any():
        reasons.append("only nodata (0) in band(s) " + ", ".join(n for n, e in zip(names, empty, strict=True) if e))
    return "; ".join(reasons) if reasons else None

"""Query vectors from words and from pictures, for `SearchIndex.query(vector=...)`.

* Text (SigLIP only): prompts go through SigLIP's own tokenizer and text tower from the same
  checkpoint as the image tower that made the embeddings; each prompt's vector is L2-normalised
  (SigLIP compares text and image embeddings by cosine), several prompts are averaged and
  normalised again.
* Image (any model): a GeoTIFF, PNG or JPEG of any size is cut into the model's fragments with
  Algorithm 1 (`fragment.fragment_layout`, the model's fragment size and overlap), each fragment
  goes through the model's own normalisation and network (`Embedder.embed`), and the query is
  either every fragment (``fragments``) or their normalised mean (``mean``).

A query is only meaningful against embeddings of the same weights: `check_weights` compares the
query model's weights sha256 with the one the embedding files record and says when they differ.
Random weights are always flagged (`QueryVectors.random_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from majortom_assets.vectors import files

ImageMode = Literal["mean", "fragments"]
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_EIGHT_BIT_TO_DN = 1e4 / (2.5 * 255.0)   # an 8-bit rendering v -> DN whose true colour is v / 255


@dataclass
class QueryVectors:
    """L2-normalised query vectors with what made them."""

    vectors: np.ndarray                       # (Q, dim) float32
    labels: list[str]                         # one per query (prompts / fragment pixel box)
    weights_name: str
    weights_sha256: str                       # of the tower that made the vectors
    random_weights: bool
    match_sha256: str | None = None           # the image-tower sha the embeddings must carry
    notes: list[str] = field(default_factory=list)
    boxes: np.ndarray | None = None           # (Q, 4) pixel boxes in fragments mode


# ---------------------------------------------------------------------------------- text
class TextEncoder:
    """SigLIP tokenizer + text tower; `encode(prompts)` -> (P, dim) unit vectors."""

    def __init__(self, tower, tokenizer, identity, vision_sha: str | None, model: str) -> None:
        self.tower, self.tokenizer, self.identity = tower, tokenizer, identity
        self.vision_sha, self.model = vision_sha, model

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = [p.strip() for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("text prompts must be non-empty")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tower.max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens["input_ids"]
        vocab = self.tower.text_model.embeddings.token_embedding.num_embeddings
        if int(ids.max()) >= vocab:
            raise ValueError(f"the tokenizer produced token id {int(ids.max())} but the text tower has only "
                             f"{vocab} tokens: tokenizer and weights are from different checkpoints")
        return files.l2_normalise(self.tower(ids).float().numpy())


def load_text_encoder(model: str = "siglip-rgb", weights: str | os.PathLike = "pretrained", *,
                      tiny: bool = False, seed: int = 0, tokenizer: str | os.PathLike | None = None) -> TextEncoder:
    """The text side of a SigLIP model of the registry.

    ``weights``: "pretrained" (the spec's HF checkpoint through the HF cache, `from_pretrained`
    like the image side), a checkpoint folder (config + weights + tokenizer files), or "random"
    (seeded; needs ``tokenizer``). ``tokenizer`` overrides where the tokenizer is loaded from.
    """
    from transformers import AutoTokenizer

    from majortom_assets.models import get_spec, load_embedder
    from majortom_assets.models.base import WeightsUnavailableError, offline, weights_kind
    from majortom_assets.models.siglip import build_text

    spec = get_spec(model)
    if not spec.builder.startswith("majortom_assets.models.siglip:"):
        raise ValueError(f"text queries need a SigLIP model (its text tower); {model} is image-only. "
                         "Use --image, --cell or --vector-file with it")
    kind = weights_kind(weights)
    tower, identity, vision_sha = build_text(weights, default_weights=spec.default_weights, tiny=tiny, seed=seed)
    if kind == "random":
        vision_sha = load_embedder(model, "random", tiny=tiny, seed=seed).weights.sha256
        if tokenizer is None:
            raise ValueError("random text weights come without a tokenizer: pass a tokenizer folder "
                             "(--tokenizer DIR, e.g. a downloaded SigLIP checkpoint)")
    source = tokenizer if tokenizer is not None else (
        spec.default_weights if kind == "pretrained" else str(weights))
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=offline())
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(f"could not load the SigLIP tokenizer from {source!r}: "
                                      f"{str(exc).splitlines()[0]}") from exc
    return TextEncoder(tower, tok, identity, vision_sha, model)


def text_query(prompts: Sequence[str], encoder: TextEncoder) -> QueryVectors:
    """One query: the normalised mean of the prompts' unit vectors."""
    vectors = encoder.encode(prompts)
    mean = files.l2_normalise(vectors.mean(axis=0, keepdims=True))
    notes = [f"{len(prompts)} prompts averaged"] if len(prompts) > 1 else []
    return QueryVectors(mean, [" | ".join(prompts)], encoder.identity.name, encoder.identity.sha256,
                        encoder.identity.random, encoder.vision_sha, notes)


# --------------------------------------------------------------------------------- images
def _band_index(descriptions: Sequence[str | None], bands: Sequence[str]) -> list[int] | None:
    names = [(d or "").strip().upper() for d in descriptions]
    want = [b.upper() for b in bands]
    return [names.index(b) for b in want] if all(b in names for b in want) else None


def read_image(path: str | os.PathLike, spec) -> tuple[np.ndarray, list[str]]:
    """(C, H, W) float32 raw values in the model's band order and units, plus notes on what was assumed.

    GeoTIFF: bands named like the model's (band descriptions B04, B03, ...) are picked by name;
    otherwise a file with exactly the model's number of bands is taken in order; raw values
    are Core units (Sentinel-2 reflectance x 1e4, Sentinel-1 linear backscatter). An 8-bit
    3/4-band GeoTIFF, PNG or JPEG is a true-colour rendering: for RGB models it is mapped back to
    the reflectance whose rendering (clip(2.5 * DN / 1e4)) it is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    suffix = path.suffix.lower()
    rgb_model = tuple(spec.bands) == ("B04", "B03", "B02")
    notes: list[str] = []
    if suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"image {path}: not a readable PNG/JPEG ({exc})") from None
        eight_bit = True
    elif suffix in (".tif", ".tiff"):
        import rasterio
        from rasterio.errors import RasterioIOError

        try:
            with rasterio.open(path) as src:
                data = src.read()
                descriptions = list(src.descriptions)
                dtype = src.dtypes[0]
        except RasterioIOError as exc:
            raise ValueError(f"image {path}: not a readable GeoTIFF ({exc})") from None
        eight_bit = dtype == "uint8"
        pick = _band_index(descriptions, spec.bands)
        if pick is not None:
            pixels = data[pick].astype(np.float32)
            notes.append(f"bands {list(spec.bands)} picked by name")
        elif data.shape[0] == spec.in_channels and not (eight_bit and not rgb_model):
            pixels = data.astype(np.float32)
            if spec.in_channels > 1 and not eight_bit:
                notes.append(f"{data.shape[0]} unnamed bands taken in order as {list(spec.bands)}")
        elif eight_bit and rgb_model and data.shape[0] in (3, 4):
            pixels = data[:3].astype(np.float32)
        else:
            raise ValueError(
                f"image {path} has {data.shape[0]} band(s) ({dtype}, descriptions {descriptions}); model "
                f"{spec.name} needs {spec.in_channels} bands {list(spec.bands)}: name them in the band "
                f"descriptions or give exactly {spec.in_channels} bands in that order")
    else:
        raise ValueError(f"image {path}: unsupported format {suffix or '(none)'}; give one of "
                         f"{', '.join(IMAGE_SUFFIXES)}")
    if eight_bit:
        if not rgb_model:
            raise ValueError(f"image {path} is an 8-bit picture; model {spec.name} needs raw "
                             f"{spec.source} bands {list(spec.bands)}: give a GeoTIFF of them")
        pixels = pixels * _EIGHT_BIT_TO_DN
        notes.append("8-bit true-colour picture mapped back to reflectance (inverse of clip(2.5 * DN / 1e4))")
    from majortom_assets.models import find_invalid_values

    reason = find_invalid_values(pixels, spec.normalisation, spec.bands)
    if reason:
        raise ValueError(f"image {path}: {reason}")
    return pixels, notes


def _fit_size(pixels: np.ndarray, size: int, notes: list[str]) -> np.ndarray:
    """Images smaller than one fragment are resampled (bilinear) until their short side fits."""
    h, w = pixels.shape[-2:]
    if min(h, w) >= size:
        return pixels
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    t = torch.nn.functional.interpolate(torch.from_numpy(pixels)[None], size=(nh, nw), mode="bilinear",
                                        align_corners=False)
    notes.append(f"image of {h}x{w} px resampled to {nh}x{nw} (smaller than one {size} px fragment)")
    return t[0].numpy()


@torch.no_grad()
def image_query(path: str | os.PathLike, embedder, mode: ImageMode = "mean", batch_size: int = 16) -> QueryVectors:
    """Embed an image's fragments with ``embedder`` (a loaded `models.Embedder`)."""
    from majortom_assets.fragment import fragment_layout, gather_fragments

    if mode not in ("mean", "fragments"):
        raise ValueError(f"image mode must be 'mean' or 'fragments', got {mode!r}")
    spec = embedder.spec
    pixels, notes = read_image(path, spec)
    pixels = _fit_size(pixels, spec.fragment_size, notes)
    layout = fragment_layout(pixels.shape[1], pixels.shape[2], spec.fragment_size, spec.target_overlap)
    fragments = gather_fragments(np.ascontiguousarray(pixels, np.float32), layout)
    out = []
    for i in range(0, len(fragments), batch_size):
        out.append(embedder.embed(torch.from_numpy(fragments[i:i + batch_size])).numpy())
    vectors = files.l2_normalise(np.concatenate(out))
    notes.append(f"{layout.count} fragment(s) of {spec.fragment_size} px ({layout.grid_shape[0]}x"
                 f"{layout.grid_shape[1]}) from {pixels.shape[1]}x{pixels.shape[2]} px")
    w = embedder.weights
    if mode == "mean":
        return QueryVectors(files.l2_normalise(vectors.mean(axis=0, keepdims=True)), [f"{Path(path).name} (mean)"],
                            w.name, w.sha256, w.random, w.sha256, notes)
    labels = [f"{Path(path).name} {list(map(int, b))}" for b in layout.boxes]
    return QueryVectors(vectors, labels, w.name, w.sha256, w.random, w.sha256, notes, np.asarray(layout.boxes))


# ------------------------------------------------------------------------------- checking
def check_weights(query: QueryVectors, embedding_files: Sequence[str | os.PathLike]) -> list[str]:
    """Warnings when the embeddings were not made by the weights the query vectors belong to."""
    from majortom_assets.geoparquet import read_info

    warnings = []
    for path in embedding_files[:1] if embedding_files else []:
        try:
            info = read_info(path)
        except (ValueError, OSError):
            return [f"{path} records no weights: cannot check the query matches the embeddings"]
        if query.match_sha256 is None or info.weights_sha256 is None:
            warnings.append(f"cannot compare weights: the embeddings record {info.weights!r}")
        elif info.weights_sha256 != query.match_sha256:
            warnings.append(f"the embeddings were made with weights {info.weights!r} (sha256 "
                            f"{info.weights_sha256[:12]}), the query with {query.weights_name!r} (image tower "
                            f"sha256 {query.match_sha256[:12]}): similarities between them mean nothing")
        if info.random_weights and not query.random_weights:
            warnings.append("the embeddings come from random weights")
    return warnings

"""Text and image query vectors (vectors/query.py) on tiny random models built here, no downloads.

The SigLIP checkpoint folder is a random tiny `SiglipModel` plus a sentencepiece tokenizer trained
in the test (tests/siglip_helpers.py), so both towers load with `from_pretrained` exactly as the
production checkpoint does. Image queries are checked against the engine: a sample's own pixels,
given back as a GeoTIFF, must find that sample's fragments with cosine similarity 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import from_origin
from siglip_helpers import tiny_siglip_checkpoint

from majortom_assets import synthetic
from majortom_assets.core import CoreCollection
from majortom_assets.engine import EngineConfig, embed_to_file
from majortom_assets.fragment import fragment_layout
from majortom_assets.models import get_spec, load_embedder
from majortom_assets.models.siglip import SIGLIP_TINY_CONFIG
from majortom_assets.vectors import files, query
from majortom_assets.vectors.search import SearchIndex, build_index


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_siglip_checkpoint(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


@pytest.fixture(scope="module")
def dinov2():
    return load_embedder("dinov2-rgb", "random", tiny=True, seed=3)


def _write_tif(path, data, descriptions=None):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32633", transform=from_origin(500000, 5000000, 10, 10)) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or []):
            dst.set_band_description(i + 1, d)
    return path


# ------------------------------------------------------------------------------------ text
def test_text_vectors_are_siglip_text_features_from_the_same_checkpoint(ckpt):
    from transformers import AutoTokenizer, SiglipModel

    enc = query.load_text_encoder("siglip-rgb", ckpt)
    prompts = ["solar farm", "solar farm panels"]
    got = query.text_query(prompts, enc)
    # independent computation with plain transformers
    model = SiglipModel.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
        feats = model.get_text_features(input_ids=ids)
        feats = getattr(feats, "pooler_output", feats).numpy()
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    mean = unit.mean(0) / np.linalg.norm(unit.mean(0))
    np.testing.assert_allclose(got.vectors[0], mean, atol=1e-5)
    assert got.vectors.shape == (1, SIGLIP_TINY_CONFIG["hidden_size"]) and "2 prompts averaged" in got.notes
    # the image tower of that checkpoint is what the image embedder loads: same sha256
    assert got.match_sha256 == load_embedder("siglip-rgb", ckpt).weights.sha256
    assert not got.random_weights
    assert not np.allclose(enc.encode(["forest river"]), enc.encode(["desert sand"]))


def test_random_text_tower_is_flagged_and_matches_the_random_image_embedder(ckpt):
    enc = query.load_text_encoder("siglip-rgb", "random", tiny=True, seed=0, tokenizer=ckpt)
    qv = query.text_query(["crop fields"], enc)
    assert qv.random_weights and qv.weights_name == "tiny-random(seed=0)"
    assert qv.match_sha256 == load_embedder("siglip-rgb", "random", tiny=True, seed=0).weights.sha256


def test_text_errors_say_what_to_do(ckpt, tmp_path):
    with pytest.raises(ValueError, match="image-only"):
        query.load_text_encoder("dinov2-rgb", ckpt)
    with pytest.raises(ValueError, match="--tokenizer"):
        query.load_text_encoder("siglip-rgb", "random", tiny=True)
    enc = query.load_text_encoder("siglip-rgb", ckpt)
    with pytest.raises(ValueError, match="non-empty"):
        enc.encode(["  "])


# ----------------------------------------------------------------------------------- images
def test_png_any_size_is_fragmented_with_the_models_layout(dinov2, tmp_path):
    rng = np.random.default_rng(0)
    pic = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(pic).save(tmp_path / "q.png")
    frags = query.image_query(tmp_path / "q.png", dinov2, mode="fragments")
    layout = fragment_layout(300, 500, 224, 0.1)
    assert frags.vectors.shape == (layout.count, dinov2.embedding_dim)
    np.testing.assert_array_equal(frags.boxes, layout.boxes)
    mean = query.image_query(tmp_path / "q.png", dinov2, mode="mean")
    np.testing.assert_allclose(mean.vectors[0], files.l2_normalise(frags.vectors.mean(0)), atol=1e-6)
    assert mean.random_weights
    # the model's normalisation of the raw fragment: same as embedding the reflectance by hand
    dn = pic.transpose(2, 0, 1).astype(np.float32) * (1e4 / (2.5 * 255))
    r0, c0, r1, c1 = layout.boxes[0]
    with torch.no_grad():
        direct = dinov2.embed(torch.from_numpy(np.ascontiguousarray(dn[None, :, r0:r1, c0:c1]))).numpy()
    np.testing.assert_allclose(frags.vectors[0], files.l2_normalise(direct)[0], atol=1e-5)
    # PNG and the equivalent float GeoTIFF of reflectances give the same vectors; named bands in
    # another order (plus an extra band) are picked by name
    _write_tif(tmp_path / "q.tif", dn)
    np.testing.assert_allclose(query.image_query(tmp_path / "q.tif", dinov2).vectors, mean.vectors, atol=1e-5)
    named = np.stack([dn[2], dn[1], dn[0], dn[0] * 0 + 1000])
    _write_tif(tmp_path / "named.tif", named, ["B02", "B03", "B04", "B08"])
    got = query.image_query(tmp_path / "named.tif", dinov2)
    np.testing.assert_allclose(got.vectors, mean.vectors, atol=1e-5)
    assert any("picked by name" in n for n in got.notes)


def test_small_images_are_resampled_and_bad_images_refused(dinov2, tmp_path):
    Image.fromarray(np.full((100, 150, 3), 90, np.uint8)).save(tmp_path / "small.jpg")
    got = query.image_query(tmp_path / "small.jpg", dinov2, mode="fragments")
    assert got.vectors.shape[0] == fragment_layout(224, 336, 224).count == 2
    assert any("resampled to 224x336" in n for n in got.notes)
    s2 = load_embedder("ssl4eo-s2", "random", tiny=True)
    with pytest.raises(ValueError, match="8-bit picture; model ssl4eo-s2 needs raw"):
        query.image_query(tmp_path / "small.jpg", s2)
    _write_tif(tmp_path / "two.tif", np.ones((2, 240, 240), np.uint16))
    with pytest.raises(ValueError, match=r"two.tif has 2 band\(s\).*needs 3 bands"):
        query.image_query(tmp_path / "two.tif", dinov2)
    _write_tif(tmp_path / "empty.tif", np.zeros((3, 240, 240), np.uint16))
    with pytest.raises(ValueError, match="empty.tif: only nodata"):
        query.image_query(tmp_path / "empty.tif", dinov2)
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="unsupported format .bmp"):
        query.image_query(tmp_path / "x.bmp", dinov2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: not a readable PNG"):
        query.image_query(tmp_path / "broken.png", dinov2)
    s13 = np.random.default_rng(1).integers(1, 4000, (13, 230, 230)).astype(np.uint16)
    _write_tif(tmp_path / "s2.tif", s13)
    got = query.image_query(tmp_path / "s2.tif", s2)
    assert got.vectors.shape == (1, s2.embedding_dim) and any("taken in order" in n for n in got.notes)


def test_a_samples_own_pixels_find_its_own_fragments(dinov2, tmp_path):
    """End to end through the engine: every query fragment's best hit is the same fragment."""
    coll = synthetic.generate_collection(tmp_path / "Core-S2L2A", "S2L2A", rows=["7U"], cells_per_row=3,
                                         size=450, seed=4)
    collection = CoreCollection(str(coll))
    meta = collection.metadata()
    out = tmp_path / "embeddings" / "dinov2-rgb" / "row=7U" / "embeddings.parquet"
    embed_to_file(collection, meta, dinov2, EngineConfig(batch_size=8, image_size=450, device="cpu"), out)
    build_index([out], tmp_path / "index", model="dinov2-rgb", progress=False)
    index = SearchIndex.load(tmp_path / "index")
    row = meta.iloc[1]
    sample = collection.read_sample(row, get_spec("dinov2-rgb").bands, size=450)
    _write_tif(tmp_path / "sample.tif", sample.pixels.astype(np.uint16), ["B04", "B03", "B02"])
    qv = query.image_query(tmp_path / "sample.tif", dinov2, mode="fragments")
    assert query.check_weights(qv, [out]) == []
    hits = index.query(qv.vectors, k=1)
    assert (hits["grid_cell"] == row["grid_cell"]).all()
    assert [list(b) for b in hits["pixel_bbox"]] == [list(b) for b in qv.boxes]
    assert hits["similarity"].min() > 0.9999
    other = load_embedder("dinov2-rgb", "random", tiny=True, seed=9)
    warnings = query.check_weights(query.image_query(tmp_path / "sample.tif", other), [out])
    assert any("mean nothing" in w for w in warnings)

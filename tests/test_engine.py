"""End-to-end inference on the synthetic Core collections (tiny models, few cells)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from majortom_assets import geoparquet
from majortom_assets.core import CoreCollection
from majortom_assets.engine import EngineConfig, SampleFailure, embed_samples, embed_to_file
from majortom_assets.fragment import fragment_layout, gather_fragments
from majortom_assets.models import load_embedder
from majortom_assets.standard import CORE_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s1_tiny():
    return load_embedder("ssl4eo-s1", "random", tiny=True)


def _direct_embeddings(collection, row, embedder) -> tuple[np.ndarray, np.ndarray]:
    """What the engine must produce for one sample, computed without the engine."""
    spec = embedder.spec
    sample = collection.read_sample(row, spec.bands)
    layout = fragment_layout(*sample.pixels.shape[-2:], spec.fragment_size, spec.target_overlap)
    fragments = torch.from_numpy(gather_fragments(sample.pixels, layout))
    with torch.inference_mode():
        return embedder.embed(fragments).numpy(), layout.boxes


def test_s1_rows_match_direct_computation_in_metadata_order(s1rtc_collection, s1_tiny):
    collection = CoreCollection(str(s1rtc_collection))
    metadata = collection.metadata().iloc[:3]
    results = list(embed_samples(collection, metadata, s1_tiny, EngineConfig(batch_size=16)))
    assert [r.column("grid_cell")[0].as_py() for r in results] == list(metadata["grid_cell"])
    for table, row in zip(results, metadata.to_dict("records"), strict=True):
        assert table.num_rows == 25  # 1068 px at 224 px, 10 % overlap
        embeddings = geoparquet.embedding_matrix(table)
        assert embeddings.shape == (25, 256) and embeddings.dtype == np.float32
        expected, boxes = _direct_embeddings(collection, row, s1_tiny)
        np.testing.assert_allclose(embeddings, expected, atol=1e-5)
        assert table.column("pixel_bbox").to_pylist() == boxes.tolist()
        assert set(table.column("product_id").to_pylist()) == {row["product_id"]}


def test_batch_size_invariance(s1rtc_collection, s1_tiny):
    """Batches mix fragments of several cells (25 per cell: batch 3 splits cells across batches,
    batch 64 holds parts of three cells); every sample's rows must not depend on its neighbours."""
    collection = CoreCollection(str(s1rtc_collection))
    metadata = collection.metadata().iloc[:4]
    assert metadata["product_id"].nunique() == 4
    one = list(embed_samples(collection, metadata, s1_tiny, EngineConfig(batch_size=1, prefetch_samples=1)))
    assert len(one) == 4 and all(t.num_rows == 25 for t in one)
    for config in (EngineConfig(batch_size=3, prefetch_samples=2), EngineConfig(batch_size=64, decode_workers=2)):
        mixed = list(embed_samples(collection, metadata, s1_tiny, config))
        for a, b in zip(one, mixed, strict=True):
            assert a.column("product_id").equals(b.column("product_id"))
            np.testing.assert_allclose(geoparquet.embedding_matrix(a), geoparquet.embedding_matrix(b), atol=1e-5)
            assert a.column("pixel_bbox").equals(b.column("pixel_bbox"))
    # and the samples are told apart: a mix-up between cells could not pass as equal rows
    first, second = geoparquet.embedding_matrix(one[0]), geoparquet.embedding_matrix(one[1])
    assert np.abs(first - second).max() > 1e-3


def test_siglip_fragments_per_cell(s2l2a_collection):
    embedder = load_embedder("siglip-rgb", "random", tiny=True)
    collection = CoreCollection(str(s2l2a_collection))
    (table,) = embed_samples(collection, collection.metadata().iloc[:1], embedder, EngineConfig(batch_size=4))
    assert table.num_rows == 9  # 1068 px at 384 px
    assert geoparquet.embedding_matrix(table).shape == (9, embedder.embedding_dim) == (9, 32)


class _FaultyCollection(CoreCollection):
    """Injects one undecodable band and one sample with NaN backscatter."""

    def __init__(self, url, garbage_for: str, nan_for: str) -> None:
        super().__init__(url)
        self.garbage_for, self.nan_for = garbage_for, nan_for

    def read_raw(self, parquet_url, parquet_row, columns, **kwargs):
        raw = super().read_raw(parquet_url, parquet_row, columns, **kwargs)
        if raw.get("product_id") == self.garbage_for:
            raw["vh"] = b"not a GeoTIFF"
        return raw

    def read_sample(self, row, bands, size=CORE_IMAGE_SIZE, **kwargs):
        sample = super().read_sample(row, bands, size, **kwargs)
        if sample.product_id == self.nan_for:
            sample.pixels[1, 10:20, 10:20] = np.nan
        return sample


def test_bad_samples_are_reported_and_the_others_embedded(s1rtc_collection, s1_tiny, tmp_path):
    metadata = CoreCollection(str(s1rtc_collection)).metadata().iloc[:4]
    ids = list(metadata["product_id"])
    collection = _FaultyCollection(str(s1rtc_collection), garbage_for=ids[1], nan_for=ids[2])
    out = tmp_path / "emb.parquet"
    stats = embed_to_file(collection, metadata, s1_tiny, EngineConfig(batch_size=32), out)
    assert stats.samples == 2 and stats.fragments == 50
    by_id = {f.product_id: f for f in stats.failures}
    assert set(by_id) == {ids[1], ids[2]}
    assert "read failed" in by_id[ids[1]].reason and "vh" in by_id[ids[1]].reason
    assert "NaN" in by_id[ids[2]].reason and "vh: 100" in by_id[ids[2]].reason
    assert by_id[ids[2]].grid_cell == metadata["grid_cell"].iloc[2]
    table = geoparquet.read_table(out)
    assert sorted(set(table.column("product_id").to_pylist())) == sorted([ids[0], ids[3]])


def test_file_metadata_carries_weights_identity(s1rtc_collection, s1_tiny, tmp_path):
    collection = CoreCollection(str(s1rtc_collection))
    out = tmp_path / "row=870U" / "embeddings.parquet"
    stats = embed_to_file(collection, collection.metadata().iloc[:1], s1_tiny, EngineConfig(), out, "synthetic-s1")
    info = geoparquet.read_info(out)
    assert info.model == "ssl4eo-s1" and info.source_collection == "synthetic-s1"
    assert info.weights == "tiny-random(seed=0)" and info.weights_sha256 == s1_tiny.weights.sha256
    assert info.random_weights is True and info.embedding_dim == 256 and info.fragment_size == 224
    assert info.extra["tiny_model"] is True and info.extra["device"] == "cpu"
    assert geoparquet.verify_file(out).ok and stats.device == "cpu" and stats.batch_size == 64


def test_early_stop_cancels_background_work(s1rtc_collection, s1_tiny):
    collection = CoreCollection(str(s1rtc_collection))
    stream = embed_samples(collection, collection.metadata(), s1_tiny, EngineConfig(batch_size=25))
    first = next(stream)
    stream.close()
    assert isinstance(first, pa.Table) and first.num_rows == 25


def test_config_validation_names_the_problem():
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda"):
        EngineConfig(device="gpu")
    with pytest.raises(ValidationError, match="batch_size"):
        EngineConfig(batch_size=0)
    assert EngineConfig(device="CUDA:1").device == "cuda:1"
    assert EngineConfig().resolve_precision(torch.device("cpu")) == "fp32"
    assert EngineConfig().resolve_precision(torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        EngineConfig(precision="fp16").resolve_precision(torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            EngineConfig(device="cuda").resolve_device()


class _CroppedCollection(CoreCollection):
    def read_sample(self, row, bands, size=CORE_IMAGE_SIZE, **kwargs):
        sample = super().read_sample(row, bands, size, **kwargs)
        sample.pixels = sample.pixels[:, :200, :200]
        return sample


def test_image_smaller_than_fragment_is_a_failure(s1rtc_collection, s1_tiny):
    collection = _CroppedCollection(str(s1rtc_collection))
    metadata = collection.metadata().iloc[:1]
    (result,) = embed_samples(collection, metadata, s1_tiny, EngineConfig())
    assert isinstance(result, SampleFailure) and result.product_id == metadata["product_id"].iloc[0]
    assert "cannot fragment" in result.reason and "smaller than the fragment size 224" in result.reason


def test_cli_flags_are_generated_from_the_engine_config():
    from majortom_assets.cli import build_parser
    from majortom_assets.cli.embed import engine_config_from_args, engine_flag

    parser = build_parser()
    base = ["embed", "--collection", "c", "--model", "ssl4eo-s1", "--out", "o"]
    help_text = parser._subparsers._group_actions[0].choices["embed"].format_help()
    for name, info in EngineConfig.model_fields.items():
        assert engine_flag(name) in help_text and f"(default: {info.default})" in " ".join(help_text.split())
    assert engine_config_from_args(parser.parse_args(base)) == EngineConfig()
    args = parser.parse_args([*base, "--batch-size", "3", "--no-channels-last", "--precision", "fp32",
                              "--image-size", "96", "--device", "CPU"])
    assert engine_config_from_args(args) == EngineConfig(batch_size=3, channels_last=False, precision="fp32",
                                                         image_size=96, device="cpu")
    bad = parser.parse_args([*base, "--device", "tpu", "--decode-workers", "0"])
    with pytest.raises(ValueError) as problem:
        engine_config_from_args(bad)
    assert str(problem.value) == ("--device: device must be auto, cpu, cuda or cuda:<index>, got 'tpu'; "
                                  "--decode-workers: Input should be greater than or equal to 1 (got 0)")


def test_cli_embed_writes_one_file_per_row(s1rtc_collection, tmp_path):
    env = {**os.environ, "MAJORTOM_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "majortom_assets.cli", "embed", "--collection", str(s1rtc_collection),
           "--model", "ssl4eo-s1", "--weights", "random", "--tiny", "--out", str(tmp_path), "--limit", "2",
           "--no-progress"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "embedded 2 cells (50 fragments)" in done.stdout
    assert "RANDOM weights" in done.stderr
    files = sorted((tmp_path / "ssl4eo-s1").glob("row=*/embeddings.parquet"))
    assert files and sum(geoparquet.read_table(f).num_rows for f in files) == 50
    for f in files:
        row = f.parent.name.removeprefix("row=")
        assert all(cell.startswith(row + "_") for cell in geoparquet.read_table(f).column("grid_cell").to_pylist())


def _downsampled_tiff(raw, step: int) -> bytes:
    """The band at 1/step of its side, its geotransform scaled to match (a self-consistent file)."""
    from affine import Affine
    from rasterio.io import MemoryFile

    with MemoryFile(bytes(raw)) as src_file, src_file.open() as src:
        array, profile = src.read(1)[::step, ::step].copy(), dict(src.profile)
    profile.update(height=array.shape[0], width=array.shape[1],
                   transform=profile["transform"] @ Affine.scale(step, step))
    with MemoryFile() as out_file:
        with out_file.open(**profile) as dst:
            dst.write(array, 1)
        return out_file.read()


class _ShrunkCollection(CoreCollection):
    """Serves some samples' bands at 1/step of their size: step 6 -> 178 px, step 2 -> 534 px."""

    def __init__(self, url, steps: dict[str, int]) -> None:
        super().__init__(url)
        self.steps = steps

    def read_raw(self, parquet_url, parquet_row, columns, **kwargs):
        raw = super().read_raw(parquet_url, parquet_row, columns, **kwargs)
        step = self.steps.get(raw.get("product_id"))
        if step:
            raw.update({band: _downsampled_tiff(raw[band], step) for band in ("vv", "vh") if band in raw})
        return raw


def test_samples_of_the_wrong_size_are_failures_with_stage_and_sizes(s1rtc_collection, s1_tiny, tmp_path):
    from majortom_assets.engine import read_failures, write_failures

    metadata = CoreCollection(str(s1rtc_collection)).metadata().iloc[:3]
    ids = list(metadata["product_id"])
    collection = _ShrunkCollection(str(s1rtc_collection), {ids[0]: 6, ids[2]: 2})
    results = list(embed_samples(collection, metadata, s1_tiny, EngineConfig(batch_size=32)))
    small, good, wrong = results
    assert isinstance(good, pa.Table) and good.num_rows == 25
    fragment = s1_tiny.spec.fragment_size
    side = -(-1068 // 6)   # ceil: every 6th pixel of 1068
    assert isinstance(small, SampleFailure) and small.stage == "decode" and small.product_id == ids[0]
    assert small.reason.startswith(f"too small: sample is {side} px at 10 m, smaller than the fragment ({fragment} px)")
    assert f"10 m band vv is {side}×{side} px, expected 1068×1068" in small.reason
    assert ids[0] in small.reason and metadata["grid_cell"].iloc[0] in small.reason
    assert isinstance(wrong, SampleFailure) and wrong.stage == "decode"
    assert wrong.reason.startswith("wrong size: 10 m band vv is 534×534 px, expected 1068×1068")

    path = write_failures(tmp_path / "failures.parquet", [small, wrong])
    assert read_failures(path) == [small, wrong]
    assert read_failures(tmp_path / "none.parquet") == []

"""Engine throughput: non-model overhead per 13-band cell, and per-model inference cost.

Run: .venv/bin/python -m benchmarks.bench_engine [--cells 8] [--models ssl4eo-s2 ssl4eo-s1 dinov2-rgb siglip-rgb]

Part 1 embeds a synthetic S2L1C collection (1068 px, 13 bands) with a trivial model (per-channel
mean times a fixed matrix, 2048-d output), so what is timed is decode + invalid-value check +
fragment gather + normalise + footprints + unique ids + GeoParquet write; each stage is also timed
alone. Part 2 times full-size models with random weights on random raw fragments (preprocess +
forward), one warm-up batch and `--repeats` timed batches, and derives cells/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from majortom_assets import geoparquet, synthetic
from majortom_assets.core import CoreCollection
from majortom_assets.engine import EngineConfig, embed_to_file
from majortom_assets.fragment import fragment_layout, gather_fragments
from majortom_assets.models import Embedder, find_invalid_values, get_spec, load_embedder
from majortom_assets.models.base import BuiltModel, identity_for

FRAGMENTS_PER_CELL = {224: 25, 384: 9}


class ChannelMeanModel(nn.Module):
    """A model that costs almost nothing, so the engine's own work is what is measured."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(channels, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.projection


def trivial_embedder(name: str = "ssl4eo-s2", dim: int = 2048) -> Embedder:
    spec = get_spec(name)
    module = ChannelMeanModel(spec.in_channels, dim)
    identity = identity_for(module, name="channel-mean", random=True, source="benchmark")
    return Embedder(spec, BuiltModel(module=module, weights=identity, embedding_dim=dim))


def per_stage(collection: CoreCollection, metadata, embedder: Embedder) -> dict[str, float]:
    """Seconds per cell of each stage, run serially in this thread."""
    spec = embedder.spec
    totals = dict.fromkeys(["read+decode (1 thread)", "invalid-value check", "gather fragments",
                            "normalise", "sample_table (footprints+ids)"], 0.0)
    tables = []
    buffer: np.ndarray | None = None  # reused like the engine's buffer pool
    for row in metadata.to_dict("records"):
        t = time.perf_counter()
        sample = collection.read_sample(row, spec.bands, max_workers=1)
        totals["read+decode (1 thread)"] += time.perf_counter() - t
        t = time.perf_counter()
        find_invalid_values(sample.pixels, spec.normalisation, spec.bands)
        totals["invalid-value check"] += time.perf_counter() - t
        t = time.perf_counter()
        layout = fragment_layout(*sample.pixels.shape[-2:], spec.fragment_size, spec.target_overlap)
        shape = (layout.count, sample.pixels.shape[0], spec.fragment_size, spec.fragment_size)
        if buffer is None or buffer.shape != shape:
            buffer = np.empty(shape, np.float32)
        fragments = gather_fragments(sample.pixels, layout, out=buffer)  # + uint16 -> float32, as the engine
        totals["gather fragments"] += time.perf_counter() - t
        t = time.perf_counter()
        x = embedder.preprocess(torch.from_numpy(fragments), inplace=True)
        totals["normalise"] += time.perf_counter() - t
        with torch.inference_mode():
            emb = embedder(x).numpy()
        t = time.perf_counter()
        tables.append(geoparquet.sample_table(emb, grid_cell=sample.grid_cell, product_id=sample.product_id,
                                              timestamp=sample.timestamp, crs=sample.crs,
                                              transform=sample.transform, boxes=layout.boxes))
        totals["sample_table (footprints+ids)"] += time.perf_counter() - t
    info = geoparquet.EmbeddingFileInfo(model=spec.name, weights="channel-mean", random_weights=True,
                                        embedding_dim=embedder.embedding_dim, fragment_size=spec.fragment_size,
                                        target_overlap=spec.target_overlap, source_collection="bench")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        geoparquet.write_embeddings(Path(tmp) / "e.parquet", tables, info)
        totals["write GeoParquet"] = time.perf_counter() - t
    n = len(metadata)
    return {k: v / n for k, v in totals.items()}


def overhead(cells: int, workdir: Path) -> None:
    collection_dir = workdir / "Core-S2L1C"
    if not (collection_dir / "metadata.parquet").exists():
        print(f"generating {cells} synthetic S2L1C cells ...", flush=True)
        synthetic.generate_collection(collection_dir, "S2L1C", cells_per_row=1,
                                      rows=[f"{r}U" for r in range(100, 100 + cells)], seed=1)
    collection = CoreCollection(str(collection_dir))
    metadata = collection.metadata().iloc[:cells]
    embedder = trivial_embedder()
    print(f"\n## Non-model overhead, {len(metadata)} S2L1C cells (13 bands, 1068 px, 25 x 224 px fragments)")
    for workers in (1, 2):
        config = EngineConfig(device="cpu", batch_size=64, decode_workers=workers, prefetch_samples=4)
        embed_to_file(collection, metadata.iloc[:1], embedder, config, workdir / "warm.parquet")
        stats = embed_to_file(collection, metadata, embedder, config, workdir / "out.parquet")
        print(f"embed_to_file, decode_workers={workers}: {stats.seconds / stats.samples:.3f} s/cell "
              f"({stats.cells_per_s:.2f} cells/s, {stats.fragments} fragments, {len(stats.failures)} failures)")
    print("\n| stage (serial, one thread) | s/cell |\n|---|---|")
    stages = per_stage(collection, metadata, embedder)
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.4f} |")
    print(f"| **sum** | {sum(stages.values()):.4f} |")
    print(f"| sum without read+decode | {sum(v for k, v in stages.items() if not k.startswith('read')):.4f} |")


def time_model(name: str, repeats: int, batch: int) -> tuple[Embedder, float, float]:
    """(embedder, load seconds, seconds per fragment) for a full-size random-weights model."""
    spec = get_spec(name)
    t = time.perf_counter()
    embedder = load_embedder(name, "random")
    load_s = time.perf_counter() - t
    dtype = torch.float32 if spec.source == "S1RTC" else torch.uint16
    raw = (torch.rand(batch, spec.in_channels, spec.fragment_size, spec.fragment_size) * 3000).to(dtype)
    channels_last = embedder.prefers_channels_last
    if channels_last:
        embedder.to(memory_format=torch.channels_last)

    def step(fragments: torch.Tensor) -> torch.Tensor:
        x = embedder.preprocess(fragments)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return embedder(x)

    with torch.inference_mode():
        step(raw if repeats > 1 else raw[:1])  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            out = step(raw)
        per_fragment = (time.perf_counter() - t) / (repeats * batch)
    assert out.shape == (batch, spec.embedding_dim)
    return embedder, load_s, per_fragment


def model_costs(models: list[str], repeats: int, batch_sizes: dict[str, int]) -> None:
    print("\n## Full-size models, random weights, CPU fp32 (preprocess + forward)")
    print("| model | params | load+init+hash s | batch | ms/fragment | fragments/cell | cells/s (model only) |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        batch = batch_sizes.get(name, 8)
        embedder, load_s, per_fragment = time_model(name, repeats, batch)
        params = sum(p.numel() for p in embedder.parameters())
        per_cell = FRAGMENTS_PER_CELL[embedder.spec.fragment_size]
        print(f"| {name} | {params / 1e6:.1f} M | {load_s:.1f} | {batch} | {per_fragment * 1e3:.0f} | "
              f"{per_cell} | {1 / (per_fragment * per_cell):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=["ssl4eo-s2", "ssl4eo-s1", "dinov2-rgb", "siglip-rgb"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "majortom_bench_engine")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    if not args.skip_overhead:
        overhead(args.cells, args.workdir)
    if args.models:
        model_costs(args.models, args.repeats,
                    {"ssl4eo-s2": 25, "ssl4eo-s1": 25, "dinov2-rgb": 25, "siglip-rgb": 2})


if __name__ == "__main__":
    main()

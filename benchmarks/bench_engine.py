"""Engine throughput: non-model overhead per 13-band cell, and per-model inference cost.

Run: .venv/bin/python -m benchmarks.bench_engine [--cells 8] [--rasterio] [--models ssl4eo-s2 ...]
(`--models` with no names skips part 2.)

Part 1 embeds a synthetic S2L1C collection (1068 px, 13 bands) with a trivial model (per-channel
mean times a fixed matrix, 2048-d output), so what is timed is read + decode + invalid-value check +
fragment gather + normalise + footprints + unique ids + GeoParquet write, end to end with 1 and 2
decode workers and each stage alone (thread CPU time and wall time per cell). Part 2 times full-size models with random weights on random raw fragments (preprocess +
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

from majortom_assets import geoparquet, geotiff, synthetic
from majortom_assets.core import CoreCollection, _zero_copy_values, decode_bands
from majortom_assets.engine import CORE_IMAGE_SIZE, EngineConfig, _Run, embed_to_file
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


def _clock() -> tuple[float, float]:
    return time.thread_time(), time.perf_counter()


def per_stage(collection: CoreCollection, metadata, embedder: Embedder, repeats: int) -> dict[str, tuple[float, float]]:
    """(CPU s, wall s) per cell of each stage, run serially in this thread as the engine runs them.

    CPU is this thread's CPU time (`time.thread_time`, torch limited to one thread), which a
    loaded machine inflates far less than the wall time. "gather uint16" is what a CUDA run does on the host instead of
    "gather + normalise" (it normalises on the device).
    """
    spec = embedder.spec
    run = _Run(collection, embedder, EngineConfig(device="cpu", decode_workers=1))
    names = ["read row group", "decode 13 GeoTIFFs + upsample", "invalid-value check",
             "gather + normalise (CPU path)", "gather uint16 (CUDA path, normalise on GPU)",
             "sample_table (footprints + unique ids)", "write GeoParquet"]
    cpu, wall = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    rows = metadata.to_dict("records")
    layout = fragment_layout(CORE_IMAGE_SIZE, CORE_IMAGE_SIZE, spec.fragment_size, spec.target_overlap)
    shape = (layout.count, len(spec.bands), spec.fragment_size, spec.fragment_size)
    buffer = torch.empty(shape, dtype=torch.float32)   # reused, like the engine's buffer pool
    raw_buffer = np.empty(shape, np.uint16)
    info = geoparquet.EmbeddingFileInfo(model=spec.name, weights="channel-mean", random_weights=True,
                                        embedding_dim=embedder.embedding_dim, fragment_size=spec.fragment_size,
                                        target_overlap=spec.target_overlap, source_collection="bench")

    def stage(name: str, start: tuple[float, float]) -> tuple[float, float]:
        now = _clock()
        cpu[name] += now[0] - start[0]
        wall[name] += now[1] - start[1]
        return now

    for _ in range(repeats):
        tables = []
        for row in rows:
            t = _clock()
            table = collection._read_row_group(row["parquet_url"], row["parquet_row"],
                                               ["product_id", "grid_cell", *spec.bands], None, None)
            raw = _zero_copy_values(table)
            t = stage("read row group", t)
            pixels, crs, transform = decode_bands(raw, spec.bands, CORE_IMAGE_SIZE, product_id=row["product_id"],
                                                  grid_cell=row["grid_cell"], max_workers=1)
            t = stage("decode 13 GeoTIFFs + upsample", t)
            find_invalid_values(pixels, spec.normalisation, spec.bands)
            t = stage("invalid-value check", t)
            run._gather_normalised(pixels, layout, buffer)
            t = stage("gather + normalise (CPU path)", t)
            gather_fragments(pixels, layout, out=raw_buffer)
            stage("gather uint16 (CUDA path, normalise on GPU)", t)
            with torch.inference_mode():
                emb = embedder(buffer).numpy()
            t = _clock()
            tables.append(geoparquet.sample_table(emb, grid_cell=row["grid_cell"], product_id=row["product_id"],
                                                  timestamp=row["timestamp"], crs=crs, transform=transform,
                                                  boxes=layout.boxes))
            stage("sample_table (footprints + unique ids)", t)
        with tempfile.TemporaryDirectory() as tmp:
            t = _clock()
            geoparquet.write_embeddings(Path(tmp) / "e.parquet", tables, info)
            stage("write GeoParquet", t)
    n = len(rows) * repeats
    return {k: (cpu[k] / n, wall[k] / n) for k in names}


def overhead(cells: int, workdir: Path, repeats: int) -> None:
    collection_dir = workdir / "Core-S2L1C"
    if not (collection_dir / "metadata.parquet").exists():
        print(f"generating {cells} synthetic S2L1C cells ...", flush=True)
        synthetic.generate_collection(collection_dir, "S2L1C", cells_per_row=1,
                                      rows=[f"{r}U" for r in range(100, 100 + cells)], seed=1)
    collection = CoreCollection(str(collection_dir))
    metadata = collection.metadata().iloc[:cells]
    embedder = trivial_embedder()
    decoder = "direct (imagecodecs)" if geotiff.DIRECT_DECODE and geotiff.imagecodecs_available() else (
        "direct (uncompressed only; rasterio for DEFLATE)" if geotiff.DIRECT_DECODE else "rasterio")
    print(f"\n## Non-model overhead, {len(metadata)} S2L1C cells (13 bands, 1068 px, 25 x 224 px fragments), "
          f"decoder: {decoder}")
    print("\nEnd to end (`embed_to_file`, trivial model, CPU device, batch 64, prefetch 4); CPU = process "
          "CPU time of all threads, model included (~2 ms/cell)\n")
    print("| decode_workers | CPU s/cell | wall s/cell | cells/s (wall) |\n|---|---|---|---|")
    for workers in (1, 2):
        config = EngineConfig(device="cpu", batch_size=64, decode_workers=workers, prefetch_samples=4)
        embed_to_file(collection, metadata.iloc[:1], embedder, config, workdir / "warm.parquet")
        cpu0 = time.process_time()
        stats = embed_to_file(collection, metadata, embedder, config, workdir / "out.parquet")
        cpu_per_cell = (time.process_time() - cpu0) / stats.samples
        print(f"| {workers} | {cpu_per_cell:.4f} | {stats.seconds / stats.samples:.4f} | {stats.cells_per_s:.2f} |")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # thread_time must see all of the normalise's CPU time
    try:
        per_stage(collection, metadata.iloc[:1], embedder, 1)   # warm-up
        stages = per_stage(collection, metadata, embedder, repeats)
    finally:
        torch.set_num_threads(threads)
    print(f"\nEach stage alone, serial in one thread, mean of {repeats} x {len(metadata)} cells\n")
    print("| stage | CPU s/cell | wall s/cell |\n|---|---|---|")
    for stage, (c, w) in stages.items():
        print(f"| {stage} | {c:.4f} | {w:.4f} |")
    for label, skip in (("CPU path", "gather uint16"), ("CUDA path", "gather + normalise")):
        chosen = [v for k, v in stages.items() if not k.startswith(skip)]
        print(f"| **total non-model, {label}** | **{sum(c for c, _ in chosen):.4f}** | "
              f"{sum(w for _, w in chosen):.4f} |")
    print(f"\nload average after the run: {os.getloadavg()}")


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
    parser.add_argument("--stage-repeats", type=int, default=3, help="passes over the cells for the stage table")
    parser.add_argument("--rasterio", action="store_true",
                        help="decode every band with rasterio (the decoder before the direct path)")
    args = parser.parse_args()
    if args.rasterio:
        geotiff.DIRECT_DECODE = False
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    if not args.skip_overhead:
        overhead(args.cells, args.workdir, args.stage_repeats)
    if args.models:
        model_costs(args.models, args.repeats,
                    {"ssl4eo-s2": 25, "ssl4eo-s1": 25, "dinov2-rgb": 25, "siglip-rgb": 2})


if __name__ == "__main__":
    main()

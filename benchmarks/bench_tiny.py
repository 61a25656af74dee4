"""CPU cost per cell of the `--tiny` model configurations (demo, tests, CLI examples).

Run: .venv/bin/python -m benchmarks.bench_tiny [--cells 4] [--repeats 3] [--models ssl4eo-s2 ...]

For each model: a synthetic Core collection of its source (real size 1068 px, one timestamp per
cell) is written to a temporary folder, the tiny random-weights model is loaded with the real
loading code (`models.load_embedder(..., tiny=True)`), and two costs are timed per cell:

- **model**: preprocess (raw values to normalised float32) and forward of one cell's fragments
  (25 at 224 px, 9 at 384 px) on random raw values (channels-last for CNNs, as the engine runs
  them), each timed alone, torch limited to one thread, CPU time of this thread
  (`time.thread_time`); the engine normalises in its decode threads, so forward is the model's
  own share;
- **engine**: `engine.embed_samples` over the whole collection (read, decode, fragment, normalise,
  model, footprints) with CPU time of the whole process (`time.process_time`, every thread).

CPU time, not wall time, is reported first because the benchmark machine is shared; the median
of `--repeats` passes is kept. Disk: about 30 MB per model (13 bands of 4 cells), removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from majortom_assets import synthetic
from majortom_assets.core import CoreCollection
from majortom_assets.engine import EngineConfig, embed_samples
from majortom_assets.fragment import fragment_layout
from majortom_assets.models import get_spec, load_embedder
from majortom_assets.standard import CORE_IMAGE_SIZE

MODELS = ("ssl4eo-s2", "ssl4eo-s1", "dinov2-rgb", "siglip-rgb")


def model_cost(embedder, repeats: int) -> tuple[float, float]:
    """CPU seconds of (preprocess, forward) for one cell's fragments, one torch thread."""
    spec = embedder.spec
    per_cell = fragment_layout(CORE_IMAGE_SIZE, CORE_IMAGE_SIZE, spec.fragment_size, spec.target_overlap).count
    dtype = torch.float32 if spec.source == "S1RTC" else torch.uint16
    raw = (torch.rand(per_cell, spec.in_channels, spec.fragment_size, spec.fragment_size) * 3000).to(dtype)
    memory_format = torch.channels_last if embedder.prefers_channels_last else torch.contiguous_format
    embedder.to(memory_format=memory_format)   # as the engine runs it on CPU

    def prepare(fragments: torch.Tensor) -> torch.Tensor:
        return embedder.preprocess(fragments).contiguous(memory_format=memory_format)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            embedder(prepare(raw[:2]))   # warm-up
            prep, forward = [], []
            for _ in range(repeats):
                t = time.thread_time()
                x = prepare(raw)
                prep.append(time.thread_time() - t)
                t = time.thread_time()
                out = embedder(x)
                forward.append(time.thread_time() - t)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (per_cell, embedder.embedding_dim)
    return statistics.median(prep), statistics.median(forward)


def engine_cost(collection: CoreCollection, metadata, embedder, repeats: int) -> tuple[float, float]:
    """(process CPU s, wall s) per cell of a full `embed_samples` pass, median of `repeats`."""
    config = EngineConfig(device="cpu", precision="fp32", batch_size=64)
    list(embed_samples(collection, metadata.iloc[:1], embedder, config))   # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        results = list(embed_samples(collection, metadata, embedder, config))
        cpu.append((time.process_time() - c) / len(metadata))
        wall.append((time.perf_counter() - w) / len(metadata))
        assert all(not hasattr(r, "reason") for r in results), results
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--model-only", action="store_true", help="skip the engine pass (no collection)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    print("| model | tiny architecture | params | dim | preprocess CPU s/cell | forward CPU s/cell | "
          "engine CPU s/cell | engine wall s/cell |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    workdir = Path(tempfile.mkdtemp(prefix="majortom_bench_tiny_"))
    collections: dict[str, tuple[CoreCollection, object]] = {}
    try:
        for name in args.models:
            spec = get_spec(name)
            embedder = load_embedder(name, "random", tiny=True)
            assert embedder.weights.random
            params = sum(p.numel() for p in embedder.parameters())
            prep_s, forward_s = model_cost(embedder, args.repeats)
            results[name] = {"params": params, "dim": embedder.embedding_dim, "preprocess_cpu_s_per_cell": prep_s,
                             "forward_cpu_s_per_cell": forward_s, "architecture": embedder.weights.source}
            cpu_s = wall_s = float("nan")
            if not args.model_only:
                cpu_s, wall_s = engine_cost(*_collection(collections, workdir, spec.source, args.cells), embedder,
                                            args.repeats)
                results[name] |= {"engine_cpu_s_per_cell": cpu_s, "engine_wall_s_per_cell": wall_s}
            print(f"| {name} | {embedder.weights.source} | {params / 1e3:.0f} k | {embedder.embedding_dim} | "
                  f"{prep_s:.3f} | {forward_s:.3f} | {cpu_s:.3f} | {wall_s:.3f} |", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nload average after the run: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _collection(cache: dict, workdir: Path, source: str, cells: int) -> tuple[CoreCollection, object]:
    """A synthetic collection of `source` (written once per run) and its metadata."""
    if source not in cache:
        path = synthetic.generate_collection(workdir / source, source, cells=synthetic.default_cells()[:cells])
        collection = CoreCollection(str(path))
        cache[source] = (collection, collection.metadata())
    return cache[source]


if __name__ == "__main__":
    main()

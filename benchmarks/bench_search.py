"""Similarity search and reduced-precision export at 1M × 768 (DINOv2's dimension).

    .venv/bin/python -m benchmarks.bench_search --n 1000000 --dim 768 --out /tmp/majortom_bench

Synthetic clustered vectors (hierarchical clusters in a 64-d subspace + small isotropic noise;
see majortom_assets.vectors.testdata.clustered_vectors) are written as Table 2 GeoParquet row
partitions, then everything is built *from the files*, streaming:
  1. exact top-10 (streamed brute force) for Q queries = database vectors plus small noise;
  2. ivfsq8 and ivfpq indexes: build time, size, recall@10 and latency per query (one query at a
     time) across nprobe; optionally hnsw on a subset (--hnsw-n);
  3. float32 / float16 / int8 flat exports: size, read throughput, recall@10 of exact search on
     the dequantised vectors versus float32.
Prints a JSON summary (also written to OUT/summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely

from majortom_assets import geoparquet
from majortom_assets.standard import EXPORT_PRECISIONS
from majortom_assets.vectors import files, quantize, search, testdata

ROWS_PER_PARTITION = 50_000


def _partition_table(x: np.ndarray, part: int, rng: np.random.Generator) -> pa.Table:
    """Table 2 rows with plausible, vectorised metadata (25 fragments per sample, 5×5 boxes)."""
    n, dim = x.shape
    frag = np.arange(n) % 25
    sample = np.arange(n) // 25
    lat = np.clip(rng.uniform(-60, 70, n // 25 + 1)[sample], -84, 84)
    lon = rng.uniform(-180, 179.9, n // 25 + 1)[sample]
    boxes = np.stack([(frag // 5) * 211, (frag % 5) * 211, (frag // 5) * 211 + 224, (frag % 5) * 211 + 224], 1)
    geom = shapely.to_wkb(shapely.box(lon, lat, lon + 0.02, lat + 0.02))
    ts = np.datetime64("2021-01-01", "us") + (rng.integers(0, 365, n // 25 + 1)[sample]).astype("timedelta64[D]")
    product = np.char.add("SYN_", sample.astype(str))
    cells = np.char.add(np.char.add("1U_", (sample % 3000 + part * 3000).astype(str)), "R")
    emb = np.ascontiguousarray(x, np.float32)
    ids = geoparquet.unique_ids(geom, ts, product, emb)
    cols = [
        pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        pa.array(cells, pa.string()), pa.array(np.full(n, 1, np.int32)),
        pa.array((sample % 3000 + part * 3000).astype(np.int32)), pa.array(product, pa.string()),
        pa.array(ts, pa.timestamp("us", tz="UTC")), pa.array(geom, pa.binary()),
        pa.array(np.full(n, "POLYGON EMPTY", object), pa.string()), pa.array(np.full(n, "EPSG:32633", object)),
        pa.FixedSizeListArray.from_arrays(pa.array(boxes.astype(np.int32).reshape(-1)), 4),
        pa.array(lat + 0.01), pa.array(lon + 0.01),
    ]
    return pa.Table.from_arrays(cols, schema=geoparquet.embedding_schema(dim))


def make_data(out: Path, n: int, dim: int, seed: int) -> list[Path]:
    base = out / "data" / "embeddings" / "bench"
    marker = out / "data" / f"done_{n}_{dim}_{seed}"
    parts = (n + ROWS_PER_PARTITION - 1) // ROWS_PER_PARTITION
    paths = [base / f"row={p}U" / "embeddings.parquet" for p in range(parts)]
    if marker.exists():
        return paths
    rng = np.random.default_rng(seed)
    # one generator for all partitions so clusters are shared globally
    centres_rng = np.random.default_rng(seed + 1)
    info = geoparquet.EmbeddingFileInfo(model="bench", weights="synthetic", random_weights=True,
                                        embedding_dim=dim, fragment_size=224, target_overlap=0.1,
                                        source_collection="synthetic")
    state = centres_rng.bit_generator.state
    for p, path in enumerate(paths):
        m = min(ROWS_PER_PARTITION, n - p * ROWS_PER_PARTITION)
        centres_rng.bit_generator.state = state  # same cluster centres in every partition
        x = testdata.clustered_vectors(m, dim, 1000, centres_rng, point_rng=rng)
        geoparquet.write_embeddings(path, _partition_table(x, p, rng), info, row_group_size=8192)
    marker.write_text("ok")
    return paths


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def _latency(index: search.SearchIndex, queries: np.ndarray, k: int, **kw) -> tuple[np.ndarray, float]:
    ids = []
    t = time.perf_counter()
    for q in queries:
        ids.append(index.search_vectors(q, k, **kw)[1][0])
    return np.array(ids), (time.perf_counter() - t) / len(queries) * 1e3


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/majortom_bench"))
    ap.add_argument("--kinds", nargs="+", default=["ivffp16", "ivfsq8", "ivfpq", "ivfpq-fp16"],
                    help="index kinds; ivfpq-<codes> adds a Refine(<codes>) re-ranking stage")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--hnsw-n", type=int, default=0, help="also build HNSW on the first N vectors")
    ap.add_argument("--precisions", nargs="*", default=list(EXPORT_PRECISIONS))
    ap.add_argument("--summary", default="summary.json", help="file name of the JSON summary in OUT")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out, k = args.out, 10
    summary: dict = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": k,
                     "cpu_count": os.cpu_count()}
    t = time.perf_counter()
    paths = make_data(out, args.n, args.dim, args.seed)
    summary["data_seconds"] = round(time.perf_counter() - t, 1)
    summary["parquet_bytes"] = sum(p.stat().st_size for p in paths)

    rng = np.random.default_rng(args.seed + 7)
    pick = np.sort(rng.choice(args.n, args.queries, replace=False))
    queries, start = [], 0
    for p in paths:
        for _, x, _ in files.iter_embeddings(p):
            lo, hi = np.searchsorted(pick, [start, start + len(x)])
            queries.append(x[pick[lo:hi] - start])
            start += len(x)
    queries = np.concatenate(queries)
    queries = queries + 0.05 * queries.std() * rng.standard_normal(queries.shape).astype(np.float32)
    t = time.perf_counter()
    _, truth = search.exact_search(paths, queries, k)
    summary["exact_streamed_ms_per_query"] = round((time.perf_counter() - t) / len(queries) * 1e3, 2)

    summary["indexes"] = {}
    for name in args.kinds:
        kind, _, refine = name.partition("-")
        d = out / f"index_{name}"
        cfg = search.IndexConfig(nlist=args.nlist, train_size=64 * args.nlist, refine=refine or "none")
        manifest = search.build_index(paths, d, kind=kind, config=cfg, progress=True)
        index = search.SearchIndex.load(d)
        res = {"params": manifest["params"], "train_seconds": manifest["train_seconds"],
               "add_seconds": manifest["add_seconds"], "index_bytes": _dir_bytes(d), "sweep": []}
        for nprobe in (8, 16, 32, 64):
            found, ms = _latency(index, queries, k, nprobe=nprobe)
            res["sweep"].append({"nprobe": nprobe, "recall@10": round(_recall(found, truth), 4),
                                 "ms_per_query": round(ms, 3)})
        summary["indexes"][name] = res
        print(json.dumps({name: res}), flush=True)
        del index

    if args.hnsw_n:
        sub = min(args.hnsw_n, args.n)
        sub_paths = paths[: (sub + ROWS_PER_PARTITION - 1) // ROWS_PER_PARTITION]
        d = out / "index_hnsw"
        manifest = search.build_index(sub_paths, d, kind="hnsw", progress=True)
        index = search.SearchIndex.load(d)
        _, sub_truth = search.exact_search(sub_paths, queries, k)
        found, ms = _latency(index, queries, k)
        summary["indexes"]["hnsw"] = {"n": len(index), "params": manifest["params"],
                                      "build_seconds": manifest["add_seconds"], "index_bytes": _dir_bytes(d),
                                      "recall@10": round(_recall(found, sub_truth), 4), "ms_per_query": round(ms, 3)}
        del index

    summary["exports"] = {}
    for precision in args.precisions:
        d = out / f"export_{precision}"
        t = time.perf_counter()
        manifest = quantize.export(paths, d, precision, progress=True)
        export_s = time.perf_counter() - t
        flat = quantize.FlatEmbeddings.open(d)
        t = time.perf_counter()
        total = 0.0
        best_s = np.full((len(queries), 0), -np.inf, np.float32)
        best_i = np.zeros((len(queries), 0), np.int64)
        qn = files.l2_normalise(queries)
        read_s = 0.0
        for start, x in flat.iter_batches(65_536):
            t0 = time.perf_counter()
            # the read path a user pays: page-cache/disk -> float32 in memory (float32: one copy)
            x = np.array(flat.codes[start:start + len(x)]) if precision == "float32" else \
                flat[start:start + len(x)]
            read_s += time.perf_counter() - t0
            total += float(x[:1, :1].sum())
            s = qn @ files.l2_normalise(x).T
            cs = np.concatenate([best_s, s], 1)
            ci = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)), s.shape)], 1)
            top = np.argpartition(-cs, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
        check = quantize.verify_export(d, check_sha256=False)
        summary["exports"][precision] = {
            "bytes": manifest["bytes"], "export_seconds": round(export_s, 1),
            "read_dequantise_GBps_of_float32": round(len(flat) * flat.dim * 4 / read_s / 1e9, 2),
            "read_GBps_on_disk": round(manifest["bytes"] / read_s / 1e9, 2),
            "vectors_per_s": round(len(flat) / read_s),
            "recall@10_vs_float32_exact": round(_recall(best_i, truth), 4),
            "verify_ok": check.ok, "max_abs_error": check.max_abs_error,
            "max_error_over_bound": round(check.max_error_over_bound, 4),
        }
        print(json.dumps({precision: summary["exports"][precision]}), flush=True)
    (out / args.summary).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

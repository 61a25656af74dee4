"""Search at archive scale on one machine: the incremental IVF-PQ index with exact re-ranking.

    .venv/bin/python -m benchmarks.bench_search_scale --n 1000000 --dim 768
    .venv/bin/python -m benchmarks.bench_search_scale --n 5000000 --dim 768

Data: CNN-like features (`testdata.cnn_like_vectors`: non-negative, heavy-tailed, low rank plus
noise, overlapping classes) generated chunk by chunk straight into the index's per-row float32
memmaps (``rows/*/vectors.npy``; 3 KB per 768-d vector on disk, 15 GB at 5 M), so the data never
has to fit in memory. The codebooks are trained on a separate sample of the same distribution.
Queries are fresh draws (not database vectors), so neighbours are at realistic distances.

Measured in one run, single-threaded queries (``faiss.omp_set_num_threads(1)``, one query per call):
  * exact top-10 by a brute-force scan of every row's exact vectors (the ground truth);
  * recall@10 and ms/query per nprobe at the default re-rank depth, and per re-rank depth;
  * resident memory of the loaded index (RSS delta after loading, and after all queries, which
    includes the memory-mapped pages the queries touched);
  * bytes per vector (packed lists, per-row codes, exact vectors);
  * time to add (replace) one row vs the full build (train + add every row + pack).
Writes OUT/summary_<n>.json; deletes the index with ``--cleanup``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # oversubscribed BLAS/OpenMP threads on a shared box crawl
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP workers must not spin on a busy box

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import faiss
import numpy as np

from majortom_assets.vectors import files, incremental, testdata


def rss_bytes() -> int:
    """Current resident set size (VmRSS, includes touched memory-mapped file pages)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Space:
    """The fixed CNN-like feature space; `draw` gives fresh points from it."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim, self.seed = dim, seed
        self.state = np.random.default_rng(seed).bit_generator.state

    def draw(self, n: int, point_seed: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        rng.bit_generator.state = self.state
        return testdata.cnn_like_vectors(n, self.dim, rng, np.random.default_rng(point_seed))


def exact_topk(searcher: incremental.Searcher, queries: np.ndarray, k: int):
    """Brute-force cosine top-k over every live position, one row segment at a time. Segments are
    read with ordinary reads (not the searcher's memory maps), so the scan leaves no file pages in
    the process' resident set and the RSS numbers below are the index's own."""
    q = files.l2_normalise(queries)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for seg, start in zip(searcher.segments, searcher.offsets[:-1]):
        x = np.load(seg.directory / "vectors.npy")
        s = q @ x.T
        del x
        pos = np.arange(start, start + s.shape[1])
        cs = np.concatenate([best_s, s], 1)
        ci = np.concatenate([best_i, np.broadcast_to(pos, s.shape)], 1)
        top = np.argpartition(-cs, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def sweep(searcher, queries, truth, k, nprobe, rerank) -> dict:
    found = []
    searcher.search(queries[:5], k, nprobe=nprobe, rerank=rerank)   # warm the code path
    t, c = time.perf_counter(), time.thread_time()
    for q in queries:
        found.append(searcher.search(q, k, nprobe=nprobe, rerank=rerank)[1][0])
    ms = (time.perf_counter() - t) / len(queries) * 1e3
    cpu_ms = (time.thread_time() - c) / len(queries) * 1e3
    # wall time on a box shared by other jobs includes waiting for a core; CPU time of this one
    # thread is what the query costs
    return {"nprobe": nprobe, "rerank": rerank, "recall@10": round(recall(np.array(found), truth), 4),
            "ms_per_query": round(ms, 3), "cpu_ms_per_query": round(cpu_ms, 3)}


def dir_bytes(d: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in d.rglob(pattern) if f.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--row-size", type=int, default=100_000, help="vectors per row segment (a large grid row)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--nlist", type=int, default=2048,
                    help="coarse lists (k-means and assignment cost grow with it; 2048 suits 1-5 M)")
    ap.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector (default dim/8)")
    ap.add_argument("--rerank", type=int, default=200, help="re-rank depth of the nprobe sweep")
    ap.add_argument("--nprobes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48, 64, 96, 128])
    ap.add_argument("--reranks", type=int, nargs="+", default=[0, 50, 100, 200, 400])
    ap.add_argument("--out", type=Path, default=Path("/tmp/majortom_bench_scale"))
    ap.add_argument("--cleanup", action="store_true", help="delete the index directory at the end")
    ap.add_argument("--reuse", action="store_true",
                    help="search an index left by an earlier run of the same --n (packed first); no build")
    ap.add_argument("--build-threads", type=int, default=1, help="faiss threads while training/adding")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.build_threads)
    k, dim = 10, args.dim
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    d = out / f"index_{args.n}"
    if not args.reuse:
        shutil.rmtree(d, ignore_errors=True)
    space = Space(dim, args.seed)
    cfg = incremental.IncrementalConfig(nlist=args.nlist, pq_m=args.pq_m, rerank=args.rerank)
    summary: dict = {"n": args.n, "dim": dim, "k": k, "queries": args.queries, "row_size": args.row_size,
                     "data": "testdata.cnn_like_vectors (fresh-draw queries)", "cpu_count": os.cpu_count(),
                     "threads": 1}

    def log(**kw):
        summary.update(kw)
        print(json.dumps(kw), flush=True)

    # -- full build: train on a sample, add every row (generated chunk by chunk), pack -------------
    if args.reuse:
        index = incremental.IncrementalIndex(d)
        index.pack()   # a replaced row from the earlier run: pack it, as the build would have
        previous = json.loads((out / f"summary_{args.n}.json").read_text())
        full_s = previous["full_build_seconds"]
        log(reused=str(d), full_build_seconds_of_earlier_run=full_s, verify_problems=index.verify())
    else:
        full_s, index = _build(args, d, cfg, space, log)
    return _measure(args, d, index, space, full_s, summary, log, out, k)


def _build(args, d, cfg, space, log):
    """Train on a separate sample, add every row (generated chunk by chunk), pack; (seconds, index)."""
    params = incremental.default_params(args.n, args.dim, cfg)
    t = time.perf_counter()
    sample = space.draw(params["train_size"] + cfg.holdout, point_seed=10_000)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    index = incremental.IncrementalIndex.create(d, sample, cfg, model="bench", expected=args.n)
    train_s = time.perf_counter() - t
    del sample
    log(training=index.manifest["training"], train_seconds=round(train_s, 1))
    add_s, rows = 0.0, (args.n + args.row_size - 1) // args.row_size
    for r in range(rows):
        m = min(args.row_size, args.n - r * args.row_size)
        t = time.perf_counter()
        x = space.draw(m, point_seed=r + 1)
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        index.add_row(f"r{r:05d}", x, pack=False)
        add_s += time.perf_counter() - t
        del x
        if r % 10 == 0:
            print(json.dumps({"rows_added": r + 1, "add_seconds": round(add_s, 1), "rss_GB": round(rss_bytes() / 1e9, 2)}),
                  flush=True)
    t = time.perf_counter()
    index.pack()
    pack_s = time.perf_counter() - t
    full_s = train_s + add_s + pack_s
    log(generate_seconds=round(gen_s, 1), add_seconds=round(add_s, 1), pack_seconds=round(pack_s, 1),
        full_build_seconds=round(full_s, 1), verify_problems=index.verify())
    return full_s, index


def _measure(args, d, index, space, full_s, summary, log, out, k):
    """Sizes, resident memory, ground truth, the nprobe and re-rank curves, one-row replacement."""

    # -- sizes -------------------------------------------------------------------------------------
    packed = d / index.manifest["packed"]["dir"]
    sizes = {"packed_lists": dir_bytes(packed, "*.ivfdata"), "row_codes": dir_bytes(d / "rows", "codes.npy"),
             "row_lists": dir_bytes(d / "rows", "lists.npy"), "exact_vectors": dir_bytes(d / "rows", "vectors.npy"),
             "trained": (d / incremental.TRAINED_FILE).stat().st_size}
    log(disk_bytes=sizes, bytes_per_vector={
        "packed_lists (code + id)": round(sizes["packed_lists"] / args.n, 1),
        "searchable (packed + row codes + list no)": round(
            (sizes["packed_lists"] + sizes["row_codes"] + sizes["row_lists"]) / args.n, 1),
        "exact vectors (re-rank)": round(sizes["exact_vectors"] / args.n, 1)})

    # -- load, ground truth, sweeps ------------------------------------------------------------------
    faiss.omp_set_num_threads(1)   # every query below runs on one thread
    rss0 = rss_bytes()
    t = time.perf_counter()
    searcher = index.open_searcher()
    load_s = time.perf_counter() - t
    rss_loaded = rss_bytes() - rss0
    queries = space.draw(args.queries, point_seed=999_999)
    t = time.perf_counter()
    _, truth = exact_topk(searcher, queries, k)
    exact_ms = (time.perf_counter() - t) / len(queries) * 1e3
    log(load_seconds=round(load_s, 2), rss_after_load_bytes=rss_loaded,
        exact_ms_per_query_batched=round(exact_ms, 2), peak_rss_GB=round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2))
    rss_before_queries = rss_bytes()
    curve = []
    for nprobe in args.nprobes:
        curve.append(sweep(searcher, queries, truth, k, nprobe, args.rerank))
        print(json.dumps(curve[-1]), flush=True)
    summary["nprobe_curve"] = curve
    good = [c for c in curve if c["recall@10"] >= 0.95]
    best = min(good, key=lambda c: c["cpu_ms_per_query"]) if good else max(curve, key=lambda c: c["recall@10"])
    reranks = []
    for rr in args.reranks:
        reranks.append(sweep(searcher, queries, truth, k, best["nprobe"], rr))
        print(json.dumps(reranks[-1]), flush=True)
    summary["rerank_curve"] = reranks
    rss_queries = rss_bytes() - rss0
    log(best=best, rss_after_queries_bytes=rss_queries,
        rss_growth_during_queries_bytes=rss_bytes() - rss_before_queries,
        searcher_parts_bytes=searcher.resident_bytes())
    del searcher

    # -- one row vs full build -------------------------------------------------------------------------
    x = space.draw(min(args.row_size, args.n), point_seed=123_456)
    t = time.perf_counter()
    index.add_row("r00000", x, pack=False)   # replaces row 0: new ids, old ones dead
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    searcher = index.open_searcher()         # packed lists + the replaced row in memory
    reload_s = time.perf_counter() - t
    log(add_one_row_seconds=round(one_s, 2), add_one_row_vectors=len(x),
        add_one_row_over_full_build=round(one_s / full_s, 5), reload_after_add_seconds=round(reload_s, 2),
        verify_after_replace=index.verify(), live_after_replace=len(searcher))
    del searcher
    name = f"summary_{args.n}_reuse.json" if args.reuse else f"summary_{args.n}.json"
    (out / name).write_text(json.dumps(summary, indent=2))
    if args.cleanup:
        shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

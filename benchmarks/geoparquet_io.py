"""Throughput of the Table 2 file path: footprints, unique ids, sample tables, write, verify, read.

Run: .venv/bin/python -m benchmarks.geoparquet_io [--rows 20000] [--dim 2048]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from majortom_assets import geoparquet as gp

TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)


def boxes_224() -> np.ndarray:
    offsets = [0, 211, 422, 633, 844]
    return np.array([[r, c, r + 224, c + 224] for r in offsets for c in offsets])


def timed(label: str, fn, count: int, unit: str):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"{label:<44} {seconds:8.3f} s  {count / seconds:12,.0f} {unit}/s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    boxes = boxes_224()
    samples = args.rows // len(boxes)
    rows = samples * len(boxes)
    emb = np.abs(rng.standard_normal((rows, args.dim))).astype(np.float32)
    big_boxes = np.tile(boxes, (samples, 1))

    timed("fragment_footprints, one call for all rows", lambda: gp.fragment_footprints(
        big_boxes, TRANSFORM, "EPSG:32633"), rows, "fragments")
    feet = gp.fragment_footprints(big_boxes, TRANSFORM, "EPSG:32633")
    timed(f"unique_ids ({args.dim}-d float32)", lambda: gp.unique_ids(
        feet.geometry_wkb, "2020-08-15T10:20:31Z", "P", emb), rows, "rows")

    def tables():
        return [gp.sample_table(emb[i * 25:(i + 1) * 25], grid_cell="451U_122R", grid_row_u=451,
                                grid_col_r=122, product_id=f"P{i}", timestamp="2020-08-15T10:20:31Z",
                                crs="EPSG:32633", transform=TRANSFORM, boxes=boxes) for i in range(samples)]

    built = timed("sample_table, per 25-fragment sample", tables, samples, "samples")
    info = gp.EmbeddingFileInfo(model="bench", weights="random", random_weights=True, embedding_dim=args.dim,
                                fragment_size=224, target_overlap=0.1, source_collection="bench")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        timed("write_embeddings (zstd, atomic)", lambda: gp.write_embeddings(path, built, info), rows, "rows")
        print(f"{'file size':<44} {path.stat().st_size / 2**20:8.1f} MiB "
              f"({path.stat().st_size / emb.nbytes:.2f} of raw float32)")
        report = timed("verify_file (recompute every id)", lambda: gp.verify_file(path), rows, "rows")
        assert report.ok, report
        timed("read_table + embedding_matrix", lambda: gp.embedding_matrix(gp.read_table(path)), rows, "rows")


if __name__ == "__main__":
    main()

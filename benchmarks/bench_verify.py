"""CPU cost of writing (with the content digest) and verifying one embedding file.

Run: PYTHONPATH=<tree> .venv/bin/python -m benchmarks.bench_verify [--samples 400] [--dim 2048]

Writes ``samples`` x 25 fragments with `write_embeddings` and verifies the file with
`verify_file`, best of 3 by CPU time (``time.process_time``), so the figures compare across trees
(run it once with PYTHONPATH pointing at each) even on a shared machine. Disk: one temp file of
about samples x 25 x dim x 4 bytes, removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from majortom_assets import geoparquet as gp

TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
OFFSETS = [0, 211, 422, 633, 844]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args(argv)
    boxes = np.array([[r, c, r + 224, c + 224] for r in OFFSETS for c in OFFSETS])
    emb = np.random.default_rng(0).standard_normal((args.samples * 25, args.dim)).astype(np.float32)
    tables = [gp.sample_table(emb[i * 25:(i + 1) * 25], grid_cell="451U_122R", grid_row_u=451, grid_col_r=122,
                              product_id=f"P{i}", timestamp="2020-08-15T10:20:31Z", crs="EPSG:32633",
                              transform=TRANSFORM, boxes=boxes) for i in range(args.samples)]
    info = gp.EmbeddingFileInfo(model="bench", weights="random", random_weights=True, embedding_dim=args.dim,
                                fragment_size=224, target_overlap=0.1, source_collection="bench")
    writes, verifies = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        for _ in range(3):
            start = time.process_time()
            gp.write_embeddings(path, tables, info)
            writes.append(time.process_time() - start)
            start = time.process_time()
            report = gp.verify_file(path)
            verifies.append(time.process_time() - start)
            assert report.ok, report
    rows = len(emb)
    print(f"{gp.__file__}: {rows} rows x {args.dim}: write_embeddings {min(writes):.3f} s CPU, "
          f"verify_file {min(verifies):.3f} s CPU")


if __name__ == "__main__":
    main()

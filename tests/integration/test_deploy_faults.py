"""Fault tolerance of partition writes: killed runs, re-runs, concurrent writers.

A run is SIGKILLed while its embedding step is writing a row; readers must never see a partial
file, and the re-run must reproduce the uninterrupted result byte for byte. Two runs of the same
partition at once must leave one complete file: writes go to a temp file that `os.replace`
renames into place, so the last writer wins with a complete, identical file (the pipeline is
deterministic), and no per-partition lock is needed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deploy_support import (
    REPO,
    ROW_CHAIN,
    driver_command,
    local_deployment,
    materialize,
    parse_driver,
)

from majortom_assets import geoparquet
from majortom_assets.layout import StorageLayout

pytestmark = pytest.mark.slow

ROW = "7U"
MODEL = "dinov2-rgb"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A storage root whose row 7U is ready to embed (metadata, shards, fragments done)."""
    root = tmp_path_factory.mktemp("faults")
    home, _, env = local_deployment(root, ROW, cells_per_row=6, timestamps=2, seed=21)
    results, output = materialize(env, ["core/s2l2a/metadata"], then=[(ROW_CHAIN, [ROW])])
    assert [r["success"] for r in results] == [True, True], output[-4000:]
    return home, env


def _embeddings_path(home):
    return home / "embeddings" / MODEL / f"row={ROW}" / "embeddings.parquet"


def _embed(env):
    results, output = materialize(env, ["embeddings/dinov2_rgb"], [ROW])
    assert results[0]["success"], output[-4000:]


def _content(path):
    table = pq.read_table(path)
    return geoparquet.embedding_matrix(table).tobytes(), table.column("unique_id").to_pylist()


def test_killed_run_leaves_no_partial_output_and_rerun_is_identical(deployment):
    home, env = deployment
    path = _embeddings_path(home)
    reference = _content(path)  # the fixture's uninterrupted run
    assert len(reference[1]) == 12 * 4  # 6 cells x 2 timestamps x 4 fragments
    path.unlink()

    # slow the step down (one fragment per model call) so the kill lands mid-partition
    proc = subprocess.Popen(driver_command(["embeddings/dinov2_rgb"], [ROW]), cwd=REPO,
                            env={**env, "MAJORTOM_BATCH_SIZE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(path.parent.glob(".embeddings.*.tmp.parquet")):
            assert proc.poll() is None, "the run ended before it started writing"
            assert time.monotonic() < deadline, "the embedding step never started writing"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # nothing partial is visible where readers look
    assert not path.exists()
    assert StorageLayout.at(home).embedding_files(MODEL) == []
    leftovers = list(path.parent.glob(".embeddings.*.tmp.parquet"))
    assert leftovers, "expected the killed writer's temp file (proves the kill was mid-write)"

    _embed(env)
    assert geoparquet.verify_file(path).ok
    assert _content(path) == reference  # byte-identical embeddings, identical unique_ids


def test_two_runs_of_one_partition_at_once_leave_one_complete_file(deployment):
    home, env = deployment
    path = _embeddings_path(home)
    if not path.exists():
        _embed(env)
    reference = _content(path)
    procs = [subprocess.Popen(driver_command(["embeddings/dinov2_rgb"], [ROW]), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(parse_driver(out)[0]["success"] for out in outputs), [o[-2000:] for o in outputs]
    assert geoparquet.verify_file(path).ok
    assert _content(path) == reference
    failures = home / "failures" / MODEL / f"row={ROW}" / "failures.parquet"
    assert pq.read_table(failures).num_rows == 0


# --- the write primitive itself, under a reader that never stops looking ---------------------

def _info(dim):
    return geoparquet.EmbeddingFileInfo(model="test", weights="random", weights_sha256="0" * 64,
                                        random_weights=True, embedding_dim=dim, dtype="float32",
                                        fragment_size=224, target_overlap=0.1, source_collection="test")


def _writer(path, seed, rounds):
    boxes = np.array([[0, 0, 224, 224], [0, 160, 224, 384]], dtype=np.int64)
    for i in range(rounds):
        rows = 2000 + 500 * seed  # each writer has its own, recognisable file size
        emb = np.random.default_rng(seed * 1000 + i).random((2, 8), dtype=np.float32)
        table = geoparquet.sample_table(emb, grid_cell="7U_10R", product_id=f"w{seed}", timestamp="2020-01-01T00:00:00Z",
                                        crs="EPSG:32633", transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 800000.0),
                                        boxes=boxes)
        geoparquet.write_embeddings(path, [table] * (rows // 2), _info(8))


def test_concurrent_atomic_writes_never_expose_a_partial_file(tmp_path):
    path = tmp_path / "row=7U" / "embeddings.parquet"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(path, seed, 4)) for seed in (1, 2)]
    for w in writers:
        w.start()
    seen, reads = set(), 0
    while any(w.is_alive() for w in writers) or reads == 0:
        if path.exists():
            try:
                # must always be a whole file: footer, row groups, rows (geoparquet.read_table reads
                # through one handle; pq.read_table(path) re-opens the path and can mix two files)
                table = geoparquet.read_table(path)
            except FileNotFoundError:  # pragma: no cover - replaced between exists() and open
                continue
            assert table.num_rows in (2000 + 500, 2000 + 1000), table.num_rows
            seen.add(table.column("product_id")[0].as_py())
            reads += 1
        time.sleep(0.002)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert reads > 0 and seen <= {"w1", "w2"}
    assert geoparquet.verify_file(path).ok
    assert not list(path.parent.glob(".*.tmp.parquet"))  # finished writers leave no temp files
    assert isinstance(pq.read_table(path), pa.Table)

"""Decode processes (``EngineConfig.decode_processes``) against decode threads.

Same rows, same embeddings and the same failures whichever prepares the samples; a worker
process that dies costs only its own sample; shared memory is released after the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from majortom_assets import engine
from majortom_assets.core import CoreCollection
from majortom_assets.models import load_embedder


class CrashingCollection(CoreCollection):
    """Kills the decode worker process that reads `crash_cell` (pickled along to the workers)."""

    crash_cell: str | None = None

    def read_raw(self, parquet_url, parquet_row, columns, *, product_id=None, grid_cell=None):
        if grid_cell == self.crash_cell:
            os._exit(13)
        return super().read_raw(parquet_url, parquet_row, columns, product_id=product_id, grid_cell=grid_cell)


def _shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


def _embed(collection, metadata, name: str, out: Path, processes: int):
    embedder = load_embedder(name, "random", tiny=True, seed=3)
    config = engine.EngineConfig(device="cpu", batch_size=7, decode_workers=2, decode_processes=processes)
    stats = engine.embed_to_file(collection, metadata, embedder, config, out)
    return stats, pq.read_table(out)


@pytest.mark.parametrize(("name", "fixture"), [("ssl4eo-s2", "s2l1c_collection"), ("ssl4eo-s1", "s1rtc_collection")])
def test_processes_give_the_threads_rows_and_failures(name, fixture, request, tmp_path):
    collection = CoreCollection(str(request.getfixturevalue(fixture)))
    metadata = collection.metadata().head(4).copy()
    metadata.loc[2, "parquet_row"] = 99   # one unreadable sample: a failure, never the others
    before = _shm_segments()
    threads, by_threads = _embed(collection, metadata, name, tmp_path / "threads.parquet", 0)
    procs, by_processes = _embed(collection, metadata, name, tmp_path / "processes.parquet", 2)
    assert procs.samples == threads.samples == 3
    assert procs.failures == threads.failures and "parquet_row 99" in procs.failures[0].reason
    assert by_processes.drop(["embedding"]).equals(by_threads.drop(["embedding"]))
    a = np.stack(by_threads.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(by_processes.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(a, b)
    assert _shm_segments() <= before   # every slot unlinked


def test_a_dying_worker_costs_only_its_sample(s2l1c_collection, tmp_path):
    collection = CrashingCollection(str(s2l1c_collection))
    metadata = collection.metadata().head(4)
    victim = collection.crash_cell = str(metadata.loc[1, "grid_cell"])
    stats, table = _embed(collection, metadata, "ssl4eo-s2", tmp_path / "out.parquet", 2)
    assert [f.grid_cell for f in stats.failures] == [victim]
    assert "decode worker process died" in stats.failures[0].reason
    assert stats.samples == 3 and set(table.column("grid_cell").to_pylist()) == set(metadata["grid_cell"]) - {victim}


def test_decode_processes_is_validated():
    with pytest.raises(ValueError, match="decode_processes"):
        engine.EngineConfig(decode_processes=-1)

"""Local sample copies: byte-identical row groups, only the selected ones read, skips reported."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from majortom_assets import mirror, synthetic
from majortom_assets.core import CoreCollection, SampleError, SampleFailure
from majortom_assets.standard import S2L2A_BANDS

SIZE = 60


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> CoreCollection:
    path = tmp_path_factory.mktemp("mirror") / "Core-S2L2A"
    synthetic.generate_collection(path, "S2L2A", cells=synthetic.default_cells()[:4], timestamps=2,
                                  size=SIZE, seed=11, samples_per_shard=3)   # 8 samples in 3 shards
    return CoreCollection(str(path))


@pytest.fixture()
def selection(source) -> pd.DataFrame:
    meta = source.metadata()
    assert meta["parquet_url"].nunique() == 3
    return meta.iloc[[1, 3, 4, 7]].reset_index(drop=True)


def _spy_row_group_reads(collection: CoreCollection, monkeypatch) -> list[tuple[str, int]]:
    """(shard file, row group) of every row group read through this collection's filesystem."""
    reads: list[tuple[str, int]] = []
    current = {}
    real_open, real_read = collection.fs.open, pq.ParquetFile.read_row_group

    def open_(path, *args, **kwargs):
        current["path"] = str(path).rsplit("/", 1)[-1]
        return real_open(path, *args, **kwargs)

    def read_row_group(self, i, *args, **kwargs):
        reads.append((current["path"], int(i)))
        return real_read(self, i, *args, **kwargs)

    monkeypatch.setattr(collection.fs, "open", open_)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    return reads


def test_copy_reads_only_the_selected_row_groups(source, selection, tmp_path, monkeypatch):
    reads = _spy_row_group_reads(source, monkeypatch)
    local, skipped = mirror.copy_samples(source, selection, tmp_path / "copy")
    monkeypatch.undo()
    assert skipped == []
    want = [(url.rsplit("/", 1)[-1], int(row)) for url, row in zip(selection.parquet_url, selection.parquet_row)]
    assert reads == want
    assert len(local) == len(selection)


def test_copy_is_a_core_collection_with_identical_samples(source, selection, tmp_path):
    local, _ = mirror.copy_samples(source, selection, tmp_path / "copy")
    copy, meta = mirror.open_copy(tmp_path / "copy")
    pd.testing.assert_frame_equal(meta, local)
    assert list(meta["parquet_row"]) == list(range(len(selection)))
    assert meta["parquet_url"].nunique() == 1 and meta["parquet_url"][0].startswith("images/samples-")
    keep = [c for c in selection.columns if c not in ("parquet_url", "parquet_row")]
    pd.testing.assert_frame_equal(meta[keep], selection[keep])
    # every shard column of every sample, byte for byte, and the decoded sample through both
    columns = pq.read_schema(source.shard_path(selection.parquet_url[0])).names
    copied = pq.ParquetFile(copy.shard_path(meta.parquet_url[0]))
    assert copied.num_row_groups == len(selection) and copied.schema_arrow.names == columns
    for (_, orig), (_, mine) in zip(selection.iterrows(), meta.iterrows()):
        assert copy.read_raw(mine.parquet_url, mine.parquet_row, columns) == source.read_raw(
            orig.parquet_url, orig.parquet_row, columns)
        a = source.read_sample(orig, S2L2A_BANDS, SIZE, max_workers=1)
        b = copy.read_sample(mine, S2L2A_BANDS, SIZE, max_workers=1)
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert (a.crs, a.transform, a.timestamp) == (b.crs, b.transform, b.timestamp)
    assert copy.metadata().shape[0] == len(selection)


def test_unreadable_samples_are_skipped_and_named(source, selection, tmp_path):
    bad = selection.copy()
    bad.loc[1, "parquet_row"] = 99                        # outside the shard
    bad.loc[2, "parquet_row"] = (bad.loc[2, "parquet_row"] + 1) % 3   # another sample's row group
    local, skipped = mirror.copy_samples(source, bad, tmp_path / "copy")
    assert list(local["product_id"]) == list(bad.product_id[[0, 3]])
    assert all(isinstance(s, SampleFailure) and s.stage == "shard copy" for s in skipped)
    assert [s.product_id for s in skipped] == list(bad.product_id[[1, 2]])
    assert [s.grid_cell for s in skipped] == list(bad.grid_cell[[1, 2]])
    assert "parquet_row 99" in skipped[0].reason and bad.product_id[1] in skipped[0].reason
    assert "not the metadata's sample" in skipped[1].reason
    assert f"row group {bad.parquet_row[2]} holds" in skipped[1].reason       # the row group and
    assert f"file={source.shard_path(bad.parquet_url[2])}" in skipped[1].reason   # the shard named
    copy, meta = mirror.open_copy(tmp_path / "copy")
    assert pq.ParquetFile(copy.shard_path(meta.parquet_url[0])).num_row_groups == 2


def test_recopy_replaces_the_sample_file_and_removes_stale_ones(source, selection, tmp_path):
    out = tmp_path / "copy"
    first, _ = mirror.copy_samples(source, selection, out)
    again, _ = mirror.copy_samples(source, selection, out)
    assert again.parquet_url[0] == first.parquet_url[0]   # named by content
    fewer, _ = mirror.copy_samples(source, selection.iloc[:2], out)
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == [fewer.parquet_url[0].removeprefix("images/")] != [first.parquet_url[0]]
    assert len(mirror.open_copy(out)[1]) == 2


def test_empty_selection_and_missing_copy(source, selection, tmp_path):
    local, skipped = mirror.copy_samples(source, selection.iloc[:0], tmp_path / "copy")
    assert local.empty and skipped == [] and list(local.columns) == list(selection.columns)
    assert list((tmp_path / "copy" / "images").iterdir()) == []
    assert mirror.open_copy(tmp_path / "copy")[1].empty
    with pytest.raises(FileNotFoundError, match="no local sample copy"):
        mirror.open_copy(tmp_path / "nowhere")


class _ShardWithoutB03(CoreCollection):
    """One sample's shard lacks the B03 column, the way an incomplete upstream shard would."""

    def __init__(self, url, product_id: str) -> None:
        super().__init__(url)
        self.product_id = product_id

    def read_raw(self, parquet_url, parquet_row, columns, *, product_id=None, grid_cell=None):
        if product_id == self.product_id:
            raise SampleError("column missing from shard", product_id=product_id, grid_cell=grid_cell,
                              band="B03", file=self.shard_path(parquet_url))
        return super().read_raw(parquet_url, parquet_row, columns, product_id=product_id, grid_cell=grid_cell)


def test_skipped_samples_are_recorded_in_the_copy_with_stage_and_full_reason(source, selection, tmp_path):
    from majortom_assets.defs.presentation import failures_markdown

    bad_id, bad_cell = selection.product_id[2], selection.grid_cell[2]
    faulty = _ShardWithoutB03(source.url, bad_id)
    local, skipped = mirror.copy_samples(faulty, selection, tmp_path / "copy")
    assert bad_id not in set(local["product_id"]) and len(local) == len(selection) - 1
    (failure,) = mirror.copy_failures(tmp_path / "copy")
    assert (failure.product_id, failure.grid_cell, failure.stage) == (bad_id, bad_cell, "shard copy")
    assert failure == skipped[0]   # the file holds the very record copy_samples returned
    for part in ("column missing from shard", bad_id, bad_cell, "band=B03", "images/part_"):
        assert part in failure.reason, part
    # the UI table shows the whole location even when the message itself is long
    long = SampleFailure(bad_id, bad_cell, "read failed: " + "GDAL says no; " * 60 + f"(product_id={bad_id}, "
                         f"grid_cell={bad_cell}, band=B03, file=/data/shards/images/samples-0123.parquet)", "decode")
    table = failures_markdown([failure, long])
    assert table.splitlines()[0] == "| product_id | grid_cell | stage | reason |"
    assert f"| shard copy | {failure.reason} |" in table
    assert "band=B03, file=/data/shards/images/samples-0123.parquet) |" in table and "…" in table

    # a clean re-copy clears the record; a copy made before failures were recorded reads as none
    mirror.copy_samples(source, selection, tmp_path / "copy")
    assert mirror.copy_failures(tmp_path / "copy") == []
    (tmp_path / "copy" / mirror.FAILURES_FILE).unlink()
    assert mirror.copy_failures(tmp_path / "copy") == []

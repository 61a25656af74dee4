"""Bad data through Dagster as a user runs it: `dagster asset materialize` on a fresh DAGSTER_HOME.

Kept to the cases Dagster adds to tests/test_bad_data.py (slow: each run starts a process):
duplicate and bad metadata rows are dropped once and counted per collection and per row in the
metadata asset's materialisation; a rerun whose every sample fails leaves the good row file as it
was and says so; the asset checks (file_check.check_file) fail, rather than crash, on a file
whose grid_row_u was edited.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_helpers import local_env, local_resources

from majortom_assets import geoparquet, synthetic
from majortom_assets.defs import keys
from majortom_assets.demo import prepare_dagster_home
from majortom_assets.layout import StorageLayout

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "ssl4eo-s2"
SIZE = 240
ROW = "136U"


def _materialize(home: Path, dagster_home: Path, select: str, partition: str | None = None,
                 image_size: int = SIZE) -> subprocess.CompletedProcess:
    args = [str(BIN / "dagster"), "asset", "materialize", "-m", "majortom_assets.definitions", "--select", select]
    if partition:
        args += ["--partition", partition]
    return subprocess.run(args, cwd=REPO, env=local_env(home, dagster_home, MODEL, image_size),
                          capture_output=True, text=True, timeout=400, check=False)


@pytest.fixture(scope="module")
def instance_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("dagster_bad")
    home = root / "home"
    collection = synthetic.generate_collection(home / "collections" / "Core-S2L1C", "S2L1C",
                                               cells=["136U_10R", "136U_11R"], size=SIZE, seed=5)
    meta = pq.read_table(collection / "metadata.parquet").to_pandas()
    bad = meta.iloc[[1]].assign(grid_cell="999Z_1R", product_id="NOT_A_CELL")
    meta = pd.concat([meta, meta.iloc[[0, 0]], bad], ignore_index=True)   # two repeats, one non-cell
    pq.write_table(pa.Table.from_pandas(meta, preserve_index=False), collection / "metadata.parquet")
    dagster_home = prepare_dagster_home(root / "dagster_home")
    return home, dagster_home   # every grid row is a static partition: nothing to register


def _latest_metadata(dagster_home: Path, key: dg.AssetKey) -> dict:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        record = instance.fetch_materializations(key, limit=1).records[0]
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def test_metadata_asset_drops_duplicates_once_and_reports_counts_per_row(instance_home):
    home, dagster_home = instance_home
    done = _materialize(home, dagster_home, "core/s2l1c/metadata")
    assert done.returncode == 0, done.stderr[-3000:]
    meta = _latest_metadata(dagster_home, keys.core_metadata_key("S2L1C"))
    assert meta["samples"] == 2 and meta["duplicates dropped"] == 2 and meta["rows rejected"] == 1
    assert "| 136U | 2 | 2 | 1 |" in meta["dropped per row"]
    assert "NOT_A_CELL" in meta["dropped rows"] and "'999Z_1R' is not a cell" in meta["dropped rows"]
    selection = pd.read_parquet(StorageLayout.at(home).selection_file("S2L1C"))
    assert sorted(selection["grid_cell"]) == ["136U_10R", "136U_11R"]


def test_rerun_where_every_sample_fails_leaves_the_row_file_untouched(instance_home):
    home, dagster_home = instance_home
    first = _materialize(home, dagster_home, "core/s2l1c/metadata")
    assert first.returncode == 0, first.stderr[-3000:]
    done = _materialize(home, dagster_home, "core/s2l1c/shards,embeddings/ssl4eo_s2", ROW)
    assert done.returncode == 0, done.stderr[-3000:]
    path = home / "embeddings" / MODEL / f"row={ROW}" / "embeddings.parquet"
    good = path.read_bytes()
    table = pq.read_table(path, columns=["unique_id", "grid_cell"])
    assert table.num_rows == 2 * 4 and len(set(table["unique_id"].to_pylist())) == table.num_rows
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(keys.embeddings_key(MODEL), "unique_ids"), limit=1)
        assert checks and checks[0].status.value == "SUCCEEDED"
    # a wrong image size fails every sample of the row
    again = _materialize(home, dagster_home, "embeddings/ssl4eo_s2", ROW, image_size=SIZE + 12)
    assert again.returncode != 0
    assert f"row {ROW}: every one of the 2 S2L1C samples failed" in again.stderr + again.stdout
    assert "embeddings.parquet of the last good run was left untouched" in again.stderr + again.stdout
    assert path.read_bytes() == good and geoparquet.verify_file(path).ok


def test_asset_checks_fail_instead_of_crashing_on_an_edited_grid_row(instance_home):
    from dagster_helpers import pipeline_assets

    home, _ = instance_home
    path = home / "embeddings" / MODEL / f"row={ROW}" / "embeddings.parquet"
    assert path.exists(), "the previous test materialises the row file"
    table = pq.read_table(path)
    footer = pq.read_schema(path).metadata
    rows = table["grid_row_u"].to_pylist()
    rows[0] = 9999
    table = table.set_column(table.schema.get_field_index("grid_row_u"), table.schema.field("grid_row_u"),
                             pa.array(rows, pa.int32()))
    pq.write_table(table.replace_schema_metadata(footer), path)
    assets = pipeline_assets("S2L1C", MODEL)
    embeddings = next(a for a in assets if keys.embeddings_key(MODEL) in a.keys)
    checks = next(a for a in assets if a.check_keys and not a.keys)
    with dg.instance_for_test() as instance:
        result = dg.materialize([embeddings, checks], instance=instance, resources=local_resources(home, MODEL, SIZE),
                                selection=dg.AssetSelection.checks_for_assets(keys.embeddings_key(MODEL)),
                                raise_on_error=False)
    assert result.success   # the check step ran; its results say what is wrong
    outcome = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert outcome["inside_grid_cell"].passed is False and outcome["unique_ids"].passed is False
    assert outcome["table2_schema"].passed is True
    assert ROW in outcome["inside_grid_cell"].metadata["failing rows"].value

"""Grid rows a user can name from every entry point, on a fresh instance, with no registration.

As a new user would: a synthetic Core-S2L2A collection somewhere on disk, the code location
pointed at it with `MAJORTOM_COLLECTION_S2L2A`, an empty `DAGSTER_HOME`, then the Dagster CLIs as
subprocesses: `dagster asset materialize --partition`, `--partition-range`, a key that is not a
row, and `dg launch`. Row 3U holds one cell, 5U two, 7U one whose every sample is corrupt; 2U,
4U and 6U hold nothing (cheap no-ops that still record `samples: 0`). DINOv2 tiny, random weights,
384 px images: each run takes seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_helpers import local_env

from majortom_assets import geoparquet, synthetic
from majortom_assets.defs import keys
from majortom_assets.defs.resources import MajorTomSettings, build_resources
from majortom_assets.defs.schedules import missing_row_requests
from majortom_assets.demo import prepare_dagster_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL, SIZE = "dinov2-rgb", 384
CELLS = ["3U_4R", "5U_10R", "5U_11R", "7U_20R"]
CORRUPT_CELL = "7U_20R"
ROW_CHAIN = "core/s2l2a/shards,fragments/grid_224px,embeddings/dinov2_rgb"
EMBEDDINGS = keys.embeddings_key(MODEL)


def write_collection(folder: Path) -> None:
    """Synthetic Core-S2L2A whose B04 band is not a GeoTIFF in every sample of `CORRUPT_CELL`."""
    synthetic.generate_collection(folder, "S2L2A", cells=CELLS, size=SIZE, timestamps=1, seed=9)
    shard = folder / "images" / "part_00000.parquet"
    table = pq.read_table(shard)
    b04 = [
        b"not a geotiff" if cell == CORRUPT_CELL else value
        for cell, value in zip(table.column("grid_cell").to_pylist(), table.column("B04").to_pylist(), strict=True)
    ]
    table = table.set_column(table.schema.get_field_index("B04"), "B04", pa.array(b04, pa.binary()))
    with pq.ParquetWriter(shard, table.schema) as writer:  # one sample per row group, as in Core
        for i in range(table.num_rows):
            writer.write_table(table.slice(i, 1))


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """A collection of one's own, a storage root and a fresh DAGSTER_HOME; the metadata selection
    materialised by the CLI (the only step before naming rows)."""
    root = tmp_path_factory.mktemp("grid_rows")
    collection = root / "my-collection"
    write_collection(collection)
    home, dagster_home = root / "home", prepare_dagster_home(root / "dagster_home")
    env = {**local_env(home, dagster_home, MODEL, SIZE), "MAJORTOM_COLLECTION_S2L2A": str(collection)}
    done = cli(env, "dagster", "asset", "materialize", "-m", "majortom_assets", "--select", "core/s2l2a/metadata")
    assert done.returncode == 0, done.stderr[-3000:]
    return home, dagster_home, env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], check=False, cwd=REPO, env=env, capture_output=True, text=True,
        timeout=400,
    )


def materialize(env: dict[str, str], *partition_args: str) -> subprocess.CompletedProcess:
    return cli(env, "dagster", "asset", "materialize", "-m", "majortom_assets", "--select", ROW_CHAIN,
               *partition_args)


def latest(instance: dg.DagsterInstance, key: dg.AssetKey, row: str):
    """The latest materialisation record of one row of one asset."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[row]), limit=1
    ).records
    return records[0] if records else None


def test_one_row_by_name_on_a_fresh_instance(newcomer):
    home, dagster_home, env = newcomer
    done = materialize(env, "--partition", "5U")
    assert done.returncode == 0, done.stderr[-3000:]
    path = home / "embeddings" / MODEL / "row=5U" / "embeddings.parquet"
    assert geoparquet.verify_file(path).ok
    assert set(pq.read_table(path, columns=["grid_cell"]).column("grid_cell").to_pylist()) == {"5U_10R", "5U_11R"}
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for key in (keys.core_shards_key("S2L2A"), keys.fragments_key(224), EMBEDDINGS):
            assert "5U" in instance.get_materialized_partitions(key), key
        assert latest(instance, EMBEDDINGS, "5U").asset_materialization.metadata["samples"].value == 2
        assert instance.get_dynamic_partitions("grid_rows") == []  # nothing was registered


def test_a_range_of_rows_runs_once_and_empty_rows_record_zero_samples(newcomer):
    home, dagster_home, env = newcomer
    done = materialize(env, "--partition-range", "2U...4U")
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert output.count(f"loaded {MODEL}") == 1  # one run for three rows: the model loads once
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        records = {row: latest(instance, EMBEDDINGS, row) for row in ("2U", "3U", "4U")}
        assert len({r.run_id for r in records.values()}) == 1
        samples = {row: r.asset_materialization.metadata["samples"].value for row, r in records.items()}
        shards = latest(instance, keys.core_shards_key("S2L2A"), "4U").asset_materialization.metadata
    assert samples == {"2U": 0, "3U": 1, "4U": 0}
    assert shards["samples"].value == 0
    assert pq.read_metadata(home / "embeddings" / MODEL / "row=4U" / "embeddings.parquet").num_rows == 0


@pytest.mark.parametrize(
    "args",
    [("--partition", "5u"), ("--partition", "0005U"), ("--partition", "947U"), ("--partition-range", "3U...5X")],
)
def test_a_key_that_is_not_a_grid_row_shows_the_row_format(newcomer, args):
    _, _, env = newcomer
    done = materialize(env, *args)
    assert done.returncode != 0
    assert "e.g. 136U, 12D" in done.stderr, done.stderr[-3000:]
    bad = args[1].split("...")[-1]
    assert repr(bad) in done.stderr


def test_dg_launch_names_a_row(newcomer):
    _, dagster_home, env = newcomer
    done = cli(env, "dg", "launch", "--assets", ROW_CHAIN, "--partition", "6U")
    assert done.returncode == 0, done.stderr[-3000:]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        record = latest(instance, EMBEDDINGS, "6U")
        assert record is not None and record.asset_materialization.metadata["samples"].value == 0


def test_a_row_that_loses_every_sample_fails_alone_and_keeps_the_finished_rows(newcomer):
    """Rows 5U..7U in one run: 7U's every sample is corrupt. 5U and 6U are recorded as
    materialised by that run; only 7U is left for a re-run (here: the nightly catch-up)."""
    home, dagster_home, env = newcomer
    done = materialize(env, "--partition-range", "5U...7U")
    assert done.returncode != 0
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        run = instance.get_runs(limit=1)[0]
        assert run.status == dg.DagsterRunStatus.FAILURE
        assert run.tags["dagster/asset_partition_range_start"] == "5U"
        for row in ("5U", "6U"):
            record = latest(instance, EMBEDDINGS, row)
            assert record.run_id == run.run_id, row  # recorded by the failed run itself
        assert "7U" not in instance.get_materialized_partitions(EMBEDDINGS)
        failures = [
            e.dagster_event.step_failure_data.error.message
            for e in instance.all_logs(run.run_id)
            if e.dagster_event and e.dagster_event.is_step_failure
        ]
        assert len(failures) == 1 and "row 7U" in failures[0] and "2 recorded as materialised" in failures[0]
        # shards and fragments of all three rows succeeded in that run
        assert {"5U", "6U", "7U"} <= instance.get_materialized_partitions(keys.fragments_key(224))

        storage = build_resources(MajorTomSettings(home=home, models=(MODEL,)))["storage"]
        requests = missing_row_requests(instance, storage, (MODEL,))
    requested = {r.partition_key: r.asset_selection for r in requests}
    assert requested["7U"] == [EMBEDDINGS] and not {"5U", "6U"} & set(requested)

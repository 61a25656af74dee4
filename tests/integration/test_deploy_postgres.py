"""The production instance (deploy/dagster.postgres.yaml) stores runs and materialisations in Postgres.

A fresh database per test run; the project's real assets materialise against it, then the records
are read back through Dagster and, independently, straight from the database tables.
"""

from __future__ import annotations

import dagster as dg
import pytest
from deploy_support import IMAGE_SIZE, postgres_database, postgres_instance_home, synthetic_rows

from majortom_assets import geoparquet
from majortom_assets.defs import keys
from majortom_assets.defs.embeddings import build_embeddings_asset
from majortom_assets.defs.fragments import build_fragments_asset
from majortom_assets.defs.resources import MajorTomSettings, build_resources
from majortom_assets.defs.shards import build_core_metadata_asset, build_core_shards_asset
from majortom_assets.deployment import GPU_POOL
from majortom_assets.fragment import fragment_layout

pytestmark = pytest.mark.services

MODEL = "dinov2-rgb"
ROWS = ["4U", "5U"]


@pytest.fixture
def pg_instance(tmp_path, monkeypatch):
    with postgres_database() as db:
        for key, value in postgres_instance_home(tmp_path / "dagster_home", db).items():
            monkeypatch.setenv(key, value)
        with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
            yield instance, db


def test_materialisations_are_recorded_in_postgres(tmp_path, pg_instance, monkeypatch):
    import psycopg2

    instance, db = pg_instance
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

    monkeypatch.delenv("MAJORTOM_HOME", raising=False)
    home = tmp_path / "home"
    synthetic_rows(home, ROWS, cells_per_row=2, seed=5)
    settings = MajorTomSettings(home=home, models=(MODEL,), compute={"image_size": IMAGE_SIZE, "batch_size": 8})
    assets = [build_core_metadata_asset("S2L2A"), build_core_shards_asset("S2L2A"),
              build_fragments_asset(224, ("S2L2A",)), build_embeddings_asset(MODEL)]
    resources = build_resources(settings)
    # the gpu pool limit lives in the instance's database, shared by every process
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, 1)

    runs = [dg.materialize(assets, instance=instance, resources=resources,
                           selection=[keys.core_metadata_key("S2L2A")])]
    row_keys = [keys.core_shards_key("S2L2A"), keys.fragments_key(224), keys.embeddings_key(MODEL)]
    runs += [dg.materialize(assets, instance=instance, resources=resources, selection=row_keys, partition_key=row)
             for row in ROWS]
    assert all(run.success for run in runs)

    # read back through a second instance object, as the webserver or daemon would
    with dg.DagsterInstance.from_config(instance.root_directory) as reader:
        for run in runs:
            record = reader.get_run_record_by_id(run.run_id)
            assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert reader.get_materialized_partitions(keys.embeddings_key(MODEL)) == set(ROWS)
        assert reader.get_materialized_partitions(keys.core_shards_key("S2L2A")) == set(ROWS)
        per_sample = fragment_layout(IMAGE_SIZE, IMAGE_SIZE, 224, 0.1).count
        found = reader.fetch_materializations(keys.embeddings_key(MODEL), limit=10).records
        assert sorted(r.partition_key for r in found) == sorted(ROWS)
        for record in found:
            metadata = record.asset_materialization.metadata
            path = home / "embeddings" / MODEL / f"row={record.partition_key}" / "embeddings.parquet"
            assert metadata["path"].value == str(path.resolve())
            assert metadata["samples"].value == 2 and metadata["fragments"].value == 2 * per_sample
            assert geoparquet.verify_file(path).rows == 2 * per_sample
        assert reader.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 1

        # Dagster's view agrees with the database's own tables
        expected = {run.run_id: len(run.get_asset_materialization_events()) for run in runs}
        with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db) as conn, conn.cursor() as cur:
            cur.execute("SELECT run_id, count(*) FROM event_logs WHERE dagster_event_type = "
                        "'ASSET_MATERIALIZATION' GROUP BY run_id")
            assert dict(cur.fetchall()) == expected
            cur.execute("SELECT count(*) FROM runs WHERE status = 'SUCCESS'")
            assert cur.fetchone()[0] == len(runs)
        assert sum(expected.values()) == 1 + 3 * len(ROWS)

"""Drive Dagster for real on a small synthetic collection: in-process runs, the CLI, the webserver.

The collection is S2L2A only (the DINOv2 model, tiny, random weights), two timestamps per cell, with
384 px images so a run
takes seconds: row 195D holds the two cells next to +-180 degrees, one of them with a corrupt
B04 band (a failing sample); row 506U holds one cell whose every sample is corrupt (a failing
partition).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_helpers import local_env, local_resources, materialize, pipeline_assets

from majortom_assets import geoparquet, synthetic
from majortom_assets.defs import keys
from majortom_assets.defs.embeddings import build_embeddings_asset
from majortom_assets.defs.maps import build_pca_map_asset
from majortom_assets.demo import prepare_dagster_home
from majortom_assets.fragment import fragment_layout

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = "dinov2-rgb"
SIZE = 384
GOOD_ROW, BAD_ROW = "195D", "506U"
CELLS = ["195D_1911L", "195D_1910R", "506U_71R"]
CORRUPT_CELLS = {"195D_1910R", "506U_71R"}


def make_home(root: Path) -> Path:
    """Storage root with a synthetic Core-S2L2A collection whose B04 is corrupt in two cells."""
    collection = root / "collections" / "Core-S2L2A"
    synthetic.generate_collection(
        collection, "S2L2A", cells=CELLS, size=SIZE, timestamps=2, seed=3, samples_per_shard=8
    )
    shard = collection / "images" / "part_00000.parquet"
    table = pq.read_table(shard)
    b04 = [
        b"not a geotiff" if cell in CORRUPT_CELLS else value
        for cell, value in zip(
            table.column("grid_cell").to_pylist(), table.column("B04").to_pylist(), strict=True
        )
    ]
    table = table.set_column(table.schema.get_field_index("B04"), "B04", pa.array(b04, pa.binary()))
    with pq.ParquetWriter(shard, table.schema) as writer:  # keep one sample per row group
        for i in range(table.num_rows):
            writer.write_table(table.slice(i, 1))
    return root


def env_for(home: Path, dagster_home: Path) -> dict[str, str]:
    return local_env(home, dagster_home, MODEL, SIZE)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("home"))
    return home, pipeline_assets("S2L2A", MODEL), local_resources(home, MODEL, SIZE)


def test_asset_graph_materialises_end_to_end_and_isolates_failures(graph):
    home, assets, resources = graph
    row_assets = [keys.core_shards_key("S2L2A"), keys.fragments_key(224), keys.embeddings_key(MODEL)]
    with dg.instance_for_test() as instance:
        assert materialize(assets, resources, instance, [keys.core_metadata_key("S2L2A")]).success
        good = materialize(assets, resources, instance, row_assets, GOOD_ROW)
        bad = materialize(assets, resources, instance, row_assets, BAD_ROW)
        pca = materialize(assets, resources, instance, [keys.pca_map_key(MODEL)])

        # the failing sample is reported while its partition succeeds
        assert good.success
        emb = good.asset_materializations_for_node(build_embeddings_asset(MODEL).op.name)[0]
        md = emb.metadata
        per_sample = fragment_layout(SIZE, SIZE, 224, 0.1).count  # two readable timestamps of one cell
        assert (md["samples"].value, md["fragments"].value, md["samples skipped"].value) == (
            2,
            2 * per_sample,
            2,
        )
        assert "195D_1910R" in md["skipped samples"].value
        assert md["random weights"].value is True and "RANDOM" in md["WARNING"].value
        assert len(md["weights sha256"].value) == 64 and md["device"].value == "cpu"
        path = Path(md["path"].value)
        assert path == home.resolve() / "embeddings" / MODEL / f"row={GOOD_ROW}" / "embeddings.parquet"
        assert geoparquet.verify_file(path).ok and geoparquet.read_info(path).random_weights
        assert "195D_1911L" in md["preview"].value

        # every check of the good row passes, each evaluated against the independent recomputation
        evaluations = {e.check_name: e for e in good.get_asset_check_evaluations()}
        assert set(evaluations) == {
            "table2_schema",
            "fragments_per_cell",
            "finite_embeddings",
            "unique_ids",
            "inside_grid_cell",
        }
        assert all(e.passed for e in evaluations.values()), {n: e.metadata for n, e in evaluations.items()}

        # the partition whose every sample is corrupt fails its own run only
        assert not bad.success
        failed_steps = [e.step_key for e in bad.all_events if e.is_step_failure]
        assert failed_steps == [build_embeddings_asset(MODEL).op.name]
        assert instance.get_materialized_partitions(keys.embeddings_key(MODEL)) == {GOOD_ROW}
        assert geoparquet.verify_file(path).ok  # the good row's file is untouched

        # the global map streams the materialised rows and shows the image inline
        assert pca.success
        map_md = pca.asset_materializations_for_node(build_pca_map_asset(MODEL).op.name)[0].metadata
        assert map_md["map"].value.startswith("![") and "data:image/png;base64," in map_md["map"].value
        png = Path(map_md["png"].value)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and map_md["cells"].value == 1


def test_checks_catch_a_tampered_embedding(graph):
    """A check that always passes proves nothing: flip one value and unique_ids must fail."""
    home, assets, resources = graph
    path = home / "embeddings" / MODEL / f"row={GOOD_ROW}" / "embeddings.parquet"
    row_assets = [keys.core_shards_key("S2L2A"), keys.fragments_key(224), keys.embeddings_key(MODEL)]
    if not path.exists():  # run on its own (e.g. with -k): materialise the good row first
        with dg.instance_for_test() as instance:
            assert materialize(assets, resources, instance, [keys.core_metadata_key("S2L2A")]).success
            assert materialize(assets, resources, instance, row_assets, GOOD_ROW).success
    table = pq.read_table(path)
    matrix = geoparquet.embedding_matrix(table).copy()
    matrix[0, 0] += 1.0
    matrix[1, 0] = np.nan
    columns = table.columns
    columns[1] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
    tampered = pa.Table.from_arrays(columns, schema=table.schema)  # same schema and file metadata
    pq.write_table(tampered, path)
    with dg.instance_for_test() as instance:
        embeddings = next(a for a in assets if keys.embeddings_key(MODEL) in a.keys)
        checks = next(a for a in assets if a.check_keys and not a.keys)
        # run on its own (no partition), the check verifies every row file of the model
        result = dg.materialize(
            [embeddings, checks],
            instance=instance,
            resources=resources,
            selection=dg.AssetSelection.checks_for_assets(keys.embeddings_key(MODEL)),
            raise_on_error=False,
        )
    outcome = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert outcome["unique_ids"] is False and outcome["finite_embeddings"] is False
    assert outcome["table2_schema"] is True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A storage root and a persistent DAGSTER_HOME holding one materialised row, as after a demo."""
    root = tmp_path_factory.mktemp("served")
    home = make_home(root / "home")
    dagster_home = prepare_dagster_home(root / "dagster_home")
    assets = pipeline_assets("S2L2A", MODEL, products=False)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        resources = local_resources(home, MODEL, SIZE)
        assert materialize(assets, resources, instance, [keys.core_metadata_key("S2L2A")]).success
        assert materialize(assets, resources, instance, [a.key for a in assets[1:]], GOOD_ROW).success
    return home, dagster_home


@pytest.mark.slow
def test_cli_materialises_one_partition(served):
    home, dagster_home = served
    path = home / "embeddings" / MODEL / f"row={GOOD_ROW}" / "embeddings.parquet"
    before = path.stat().st_mtime_ns
    done = subprocess.run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "majortom_assets.definitions",
            "--select",
            "core/s2l2a/shards,fragments/grid_224px,embeddings/dinov2_rgb",
            "--partition",
            GOOD_ROW,
        ],
        check=False,
        cwd=REPO,
        env=env_for(home, dagster_home),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert path.stat().st_mtime_ns > before and geoparquet.verify_file(path).ok  # replaced, still valid
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        records = instance.fetch_materializations(keys.embeddings_key(MODEL), limit=10).records
        assert [r.partition_key for r in records] == [GOOD_ROW, GOOD_ROW]  # the demo-like run and the CLI run


@pytest.mark.slow
def test_webserver_serves_the_asset_graph_and_recorded_materialisations(served):
    home, dagster_home = served
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO,
        env=env_for(home, dagster_home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 150
        nodes = None
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                nodes = _graphql(port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
                if nodes:
                    break
            except (OSError, AssertionError):
                pass
            time.sleep(2)
        assert nodes, "webserver did not serve the asset graph in time"
        paths = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert {
            "core/s2l2a/shards",
            "fragments/grid_224px",
            "embeddings/dinov2_rgb",
            "maps/dinov2_rgb/pca",
        } <= paths
        assert "embeddings/ssl4eo_s2" not in paths  # MAJORTOM_MODELS limits the graph

        query = """
        query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
          assetMaterializations(limit: 5) { partition runId metadataEntries { label
            ... on IntMetadataEntry { intValue } ... on BoolMetadataEntry { boolValue } } } } } }"""
        asset = _graphql(port, query, {"key": {"path": ["embeddings", "dinov2_rgb"]}})["assetOrError"]
        event = asset["assetMaterializations"][0]
        entries = {e["label"]: e for e in event["metadataEntries"]}
        assert event["partition"] == GOOD_ROW
        assert entries["samples"]["intValue"] == 2 and entries["samples skipped"]["intValue"] == 2
        assert entries["random weights"]["boolValue"] is True
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_checks_fail_when_there_is_no_file_to_check(tmp_path):
    """Checks run on their own over a model with no embedding files must not report a pass."""
    assets = pipeline_assets("S2L2A", MODEL)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            assets,
            instance=instance,
            resources=local_resources(tmp_path, MODEL, SIZE),
            selection=dg.AssetSelection.checks_for_assets(keys.embeddings_key(MODEL)),
            raise_on_error=False,
        )
    outcome = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert len(outcome) == 5 and not any(outcome.values()), outcome

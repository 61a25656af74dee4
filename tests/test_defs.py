"""The Dagster layer loads, names what it promises, validates its inputs, and automates correctly."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from majortom_assets import grid
from majortom_assets.defs import keys
from majortom_assets.defs.partitions import GRID_ROWS, ROW_NAMES, change_bands, row_bands, row_sample_counts
from majortom_assets.defs.resources import MajorTomSettings, build_resources
from majortom_assets.defs.schedules import missing_row_requests
from majortom_assets.defs.sensors import evaluate_new_samples
from majortom_assets.layout import StorageLayout, StoragePathError, validate_row_key
from majortom_assets.models.spec import MODEL_SPECS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def definitions() -> dg.Definitions:
    from majortom_assets.definitions import defs

    return defs()


def test_definitions_load_with_every_asset_check_and_automation(definitions):
    graph = definitions.resolve_asset_graph()
    names = {k.to_user_string() for k in graph.get_all_asset_keys()}
    expected = {f"core/{s.lower()}/{kind}" for s in keys.SOURCES for kind in ("metadata", "shards")}
    expected |= {f"fragments/grid_{size}px" for size in {s.fragment_size for s in MODEL_SPECS.values()}}
    for model in MODEL_SPECS:
        slug = model.replace("-", "_")
        expected |= {
            f"embeddings/{slug}",
            f"maps/{slug}/pca",
            f"vectors/{slug}/index",
            f"vectors/{slug}/float16",
            f"vectors/{slug}/int8",
            f"vectors/{slug}/evaluation",
            f"vectors/{slug}/change",
        }
    expected.add("vectors/sql_catalog")
    assert expected <= names, expected - names

    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    for model in MODEL_SPECS:
        for name in (
            "table2_schema",
            "fragments_per_cell",
            "finite_embeddings",
            "unique_ids",
            "inside_grid_cell",
        ):
            assert (f"embeddings/{model.replace('-', '_')}", name) in checks

    assert {s.name for s in definitions.schedules} == {"missing_rows_nightly"}
    assert {s.name for s in definitions.sensors} == {"new_core_samples"}
    assert {f"embedder_{m.replace('-', '_')}" for m in MODEL_SPECS} <= set(definitions.resources)


def test_row_assets_share_the_grid_row_partitions_and_embeddings_use_the_gpu_pool(definitions):
    graph = definitions.resolve_asset_graph()
    for model, spec in MODEL_SPECS.items():
        node = graph.get(keys.embeddings_key(model))
        assert node.partitions_def == GRID_ROWS
        assert node.pools == {"gpu"}
        # one run per backfill / --partition-range, so a run loads each model once
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
        assert keys.core_shards_key(spec.source) in node.parent_keys
        assert keys.fragments_key(spec.fragment_size) in node.parent_keys
        pca = graph.get(keys.pca_map_key(model))
        assert pca.partitions_def is None and keys.embeddings_key(model) in pca.parent_keys
    shards = definitions.resolve_assets_def(keys.core_shards_key("S2L1C"))
    policy = shards.op.retry_policy
    assert policy.max_retries >= 1 and policy.backoff is not None and policy.jitter is not None


def test_dagster_yaml_caps_the_gpu_pool_and_turns_telemetry_off(tmp_path, monkeypatch):
    from majortom_assets.demo import prepare_dagster_home

    prepare_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert instance.get_settings("telemetry")["enabled"] is False
        assert Path(instance.root_directory) == tmp_path


@pytest.mark.parametrize("bad", ["136u", "0136U", "0D", "136U/../x", "../136U", "", "12X"])
def test_partition_keys_that_are_not_canonical_rows_never_reach_a_path(tmp_path, bad):
    layout = StorageLayout.at(tmp_path)
    with pytest.raises(StoragePathError):
        layout.embeddings_file("dinov2-rgb", bad)


def test_paths_stay_inside_the_storage_root(tmp_path):
    layout = StorageLayout.at(tmp_path)
    assert validate_row_key("12D") == "12D"
    path = layout.embeddings_file("dinov2-rgb", "136U")
    assert path == tmp_path.resolve() / "embeddings" / "dinov2-rgb" / "row=136U" / "embeddings.parquet"
    with pytest.raises(StoragePathError):
        layout.inside("..", "etc")
    with pytest.raises(StoragePathError):
        layout.map_dir("../../x")
    with pytest.raises(StoragePathError):
        layout.export_dir("dinov2-rgb", "int4")
    # one place decides where an evaluation goes, for the CLI and the asset alike
    assert layout.evaluation_dir(["dinov2-rgb"]) == layout.report_dir("dinov2-rgb")
    assert layout.evaluation_dir(["dinov2-rgb", "siglip-rgb"]) == tmp_path.resolve() / "reports" / "comparison"
    with pytest.raises(StoragePathError, match="reserved"):
        layout.report_dir("comparison")
    assert StorageLayout.of_sql_database(layout.sql_database()) == layout
    with pytest.raises(StoragePathError, match="sql/ folder"):
        StorageLayout.of_sql_database(tmp_path / "catalog.duckdb")


def test_settings_switch_resource_sets_by_environment(tmp_path):
    local = MajorTomSettings.from_env({"MAJORTOM_HOME": str(tmp_path)})
    assert local.environment == "local" and local.compute.device == "cpu" and local.weights == "random" and local.tiny
    assert local.collections["S2L1C"] == "collections/Core-S2L1C"
    prod = MajorTomSettings.from_env({"MAJORTOM_ENV": "prod", "MAJORTOM_MODELS": "siglip-rgb"})
    assert prod.collections["S2L2A"] == "hf://datasets/Major-TOM/Core-S2L2A"
    assert (prod.compute.device, prod.weights, prod.tiny, prod.models) == (
        "auto",
        "pretrained",
        False,
        ("siglip-rgb",),
    )
    resources = build_resources(local)
    assert resources["collections"].url("S1RTC") == str(tmp_path.resolve() / "collections" / "Core-S1RTC")
    assert resources["embedder_dinov2_rgb"].tiny and resources["embedder_dinov2_rgb"].weights == "random"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"MAJORTOM_ENV": "staging"}, "MAJORTOM_ENV"),
        ({"MAJORTOM_MODELS": "resnet"}, "MAJORTOM_MODELS"),
        ({"MAJORTOM_DEVICE": "tpu"}, "MAJORTOM_DEVICE"),
        ({"MAJORTOM_BATCH_SIZE": "0"}, "MAJORTOM_BATCH_SIZE"),
        ({"MAJORTOM_PRECISION": "fp8"}, "MAJORTOM_PRECISION: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"MAJORTOM_DECODE_WORKERS": "0", "MAJORTOM_DEVICE": "gpu"},
         "MAJORTOM_DEVICE: .*'gpu'; MAJORTOM_DECODE_WORKERS: .* greater than or equal to 1"),
    ],
)
def test_bad_settings_name_the_variable_to_fix(env, names):
    with pytest.raises(ValueError, match=names):
        MajorTomSettings.from_env(env)


def test_compute_settings_and_resource_are_the_engine_config(tmp_path):
    """Device, precision, batch size, ... are declared once, by engine.EngineConfig: the settings
    hold one, every field has its MAJORTOM_<FIELD> variable, and ComputeResource has its fields."""
    from majortom_assets.defs.resources import COMPUTE_FIELDS, ComputeResource
    from majortom_assets.engine import EngineConfig

    assert COMPUTE_FIELDS == tuple(EngineConfig.model_fields)
    assert tuple(ComputeResource.model_fields) == COMPUTE_FIELDS
    for name, info in EngineConfig.model_fields.items():
        field = ComputeResource.model_fields[name]
        assert (field.default, field.description, field.metadata) == (info.default, info.description, info.metadata)
    env = {"MAJORTOM_HOME": str(tmp_path), "MAJORTOM_DECODE_WORKERS": "3", "MAJORTOM_PREFETCH_SAMPLES": "7",
           "MAJORTOM_CHANNELS_LAST": "false", "MAJORTOM_IMAGE_SIZE": "96"}
    settings = MajorTomSettings.from_env(env)
    assert settings.compute == EngineConfig(device="cpu", precision="fp32", batch_size=16, decode_workers=3,
                                            prefetch_samples=7, channels_last=False, image_size=96)
    assert MajorTomSettings.from_env({"MAJORTOM_ENV": "prod"}).compute == EngineConfig(batch_size=64)
    compute = build_resources(settings)["compute"]
    assert isinstance(compute, ComputeResource) and compute.engine_config() == settings.compute
    # a value set in the launchpad that the engine refuses fails the step in one line
    with pytest.raises(dg.Failure, match=r"^compute resource device: device must be auto, cpu, cuda"):
        ComputeResource(device="tpu").engine_config()


def test_every_row_of_the_10km_grid_is_a_partition_in_latitude_order():
    rows = grid.get_grid(10.0).rows()
    assert len(ROW_NAMES) == len(rows) == 1893
    assert GRID_ROWS.get_partition_keys() == list(ROW_NAMES)
    assert (ROW_NAMES[0], ROW_NAMES[946], ROW_NAMES[-1]) == ("946D", "0U", "946U")
    assert [grid.parse_row_name(r) for r in ROW_NAMES] == rows.tolist()  # south to north
    assert all(validate_row_key(r) == r for r in ROW_NAMES)  # canonical, path-safe names
    assert GRID_ROWS.has_partition_key("136U") and not GRID_ROWS.has_partition_key("947U")


@pytest.mark.parametrize(
    ("bad", "message"),
    [("5u", "e.g. 136U, 12D"), ("05U", "e.g. 136U, 12D"), ("947U", "946D .. 946U"), ("", "e.g. 136U")],
)
def test_a_key_that_is_not_a_grid_row_names_the_row_format(bad, message):
    with pytest.raises(StoragePathError, match=message):
        GRID_ROWS.validate_partition_key(bad)


def test_row_sample_counts_and_bands_of_rows():
    meta = pd.DataFrame({"grid_row_u": [136, -12, 136, 0]})
    assert row_sample_counts(meta) == {"12D": 1, "0U": 1, "136U": 2}
    assert row_bands(["136U", "12D", "0U", "3U", "12U"], max_gap=8) == [
        ("12D", "12D"),
        ("0U", "12U"),
        ("136U", "136U"),
    ]
    assert row_bands([]) == []
    # a band of changed rows bridges empty rows but never an up-to-date row that holds samples
    assert change_bands(["3U", "5U"], holding={"3U", "5U"}) == [("3U", "5U")]
    assert change_bands(["3U", "5U"], holding={"3U", "4U", "5U"}) == [("3U", "3U"), ("5U", "5U")]
    assert change_bands(["3U", "30U"], holding={"3U", "30U"}) == [("3U", "3U"), ("30U", "30U")]
    with pytest.raises(StoragePathError):
        row_bands(["136U/.."])


def _metadata(path: Path, rows: list[int]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    cells = [str(grid.cell_name(r, 5)) for r in rows]
    pd.DataFrame(
        {
            "grid_cell": cells,
            "grid_row_u": rows,
            "grid_col_r": [5] * len(rows),
            "product_id": [f"p{i}" for i in range(len(rows))],
            "timestamp": ["20230415T181919"] * len(rows),   # required: unique_ids hash it
            "parquet_url": ["images/part_00000.parquet"] * len(rows),
            "parquet_row": list(range(len(rows))),
        }
    ).to_parquet(path / "metadata.parquet")


def _materialise_selection(instance, source: str, selection: dict) -> None:
    """What a metadata run records: the filter it applied."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=keys.core_metadata_key(source), metadata={"filter": dg.MetadataValue.json(selection)}
        )
    )


def _band(request: dg.RunRequest) -> tuple[str, str]:
    return request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]


def test_sensor_refreshes_the_selection_once_then_requests_only_changed_rows(tmp_path):
    settings = MajorTomSettings(home=tmp_path, models=("dinov2-rgb",))
    collections = build_resources(settings)["collections"]
    meta_dir = tmp_path / "collections" / "Core-S2L2A"
    _metadata(meta_dir, [136, 136, -12])
    metadata_key = keys.core_metadata_key("S2L2A")
    with dg.instance_for_test() as instance:
        first = evaluate_new_samples(instance, collections, None, settings.models)
        # one refresh of the metadata selection, and no row before it has materialised
        assert [r.asset_selection for r in first.run_requests] == [[metadata_key]]
        assert first.run_requests[0].run_config == {"ops": {"core__s2l2a__metadata": {"config": {}}}}
        waiting = evaluate_new_samples(instance, collections, first.cursor, settings.models)
        assert waiting.run_requests == []

        _materialise_selection(instance, "S2L2A", {})
        rows = evaluate_new_samples(instance, collections, waiting.cursor, settings.models)
        assert [_band(r) for r in rows.run_requests] == [("12D", "12D"), ("136U", "136U")]
        for request in rows.run_requests:  # the rows only: the selection is not rebuilt per row
            assert metadata_key not in request.asset_selection
            assert keys.embeddings_key("dinov2-rgb") in request.asset_selection
            assert keys.embeddings_key("ssl4eo-s2") not in request.asset_selection

        unchanged = evaluate_new_samples(instance, collections, rows.cursor, settings.models)
        assert unchanged.run_requests == []

        # a user narrows the selection to rows 7U and 12D; then 12D gains a sample, 7U is new and
        # 136U (outside the filter) gains one too
        user_filter = {"rows": ["7U", "12D"]}
        _materialise_selection(instance, "S2L2A", user_filter)
        _metadata(meta_dir, [136, 136, 136, -12, -12, 7])
        later = evaluate_new_samples(instance, collections, unchanged.cursor, settings.models)
        assert len(later.run_requests) == 1  # once per changed stamp, with the user's filter
        assert later.run_requests[0].run_config["ops"]["core__s2l2a__metadata"]["config"] == user_filter
        _materialise_selection(instance, "S2L2A", user_filter)
        after = evaluate_new_samples(instance, collections, later.cursor, settings.models)
        # 136U is outside the selection now: its files are rebuilt empty; 12D and 7U changed
        assert [_band(r) for r in after.run_requests] == [("12D", "12D"), ("7U", "7U"), ("136U", "136U")]
        assert json.loads(after.cursor)["S2L2A"]["rows"] == {"12D": 2, "7U": 1}

        # the decorated sensor gets the collections resource injected
        from majortom_assets.defs.sensors import new_core_samples

        with dg.build_sensor_context(
            instance=instance, cursor=after.cursor, resources={"collections": collections}
        ) as ctx:
            assert new_core_samples(ctx).run_requests == []


def test_schedule_requests_rows_with_selected_samples_that_miss_an_asset(tmp_path):
    models = ("dinov2-rgb",)
    settings = MajorTomSettings(home=tmp_path, models=models)
    storage = build_resources(settings)["storage"]
    with dg.instance_for_test() as instance:
        # no selection yet: one metadata run, no rows
        requests = missing_row_requests(instance, storage, models)
        assert [r.asset_selection for r in requests] == [[keys.core_metadata_key("S2L2A")]]

        selection = storage.layout.selection_file("S2L2A")
        selection.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"grid_row_u": [-12, 136, 136]}).to_parquet(selection)
        chain = keys.row_chain_keys("S2L2A", models)
        for key in chain:
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition="12D"))
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=keys.core_shards_key("S2L2A"), partition="136U")
        )
        requests = missing_row_requests(instance, storage, models)
        assert [r.partition_key for r in requests] == ["136U"]  # not the 1,891 rows without samples
        assert set(requests[0].asset_selection) == set(chain) - {keys.core_shards_key("S2L2A")}
        assert requests[0].tags.get("majortom/compute") == "gpu"


def test_dg_cli_sees_the_project():
    import subprocess

    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "dg"), "list", "defs", "--json"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listed = json.loads(result.stdout)
    assets = {a["asset_key"] for a in listed["assets"]}
    assert "embeddings/dinov2_rgb" in assets and "maps/siglip_rgb/pca" in assets

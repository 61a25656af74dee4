"""Released sets and AlphaEarth in the Dagster graph, through the real entry point.

`dagster asset materialize -m majortom_assets.definitions` runs on a fresh DAGSTER_HOME with the
sets configured by environment; the released quirks arrive as WARN check results (the run still
succeeds), and the observable source asset records a data version that follows the files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from majortom_assets import alphaearth, geoparquet, released
from majortom_assets import released_fixtures as rf
from majortom_assets.demo import prepare_dagster_home
from majortom_assets.vectors import files

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROW = "136U"


def _env(home: Path, dagster_home: Path, **extra) -> dict[str, str]:
    return {**os.environ, "MAJORTOM_HOME": str(home), "DAGSTER_HOME": str(dagster_home), "MAJORTOM_ENV": "local",
            "MAJORTOM_EXECUTOR": "in_process",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra}


def _materialize(env, select: str, partition: str | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "majortom_assets.definitions", "--select", select]
    if partition:
        cmd += ["--partition", partition]
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_released_view_materialises_with_warning_checks(tmp_path):
    folder = rf.write_reference_set(tmp_path / "Core-S2RGB-DINOv2", [ROW, "12D"], 2, 768, files=2)
    home, dagster_home = tmp_path / "home", prepare_dagster_home(tmp_path / "dh")
    env = _env(home, dagster_home, MAJORTOM_RELEASED_S2RGB_DINOV2=str(folder))
    done = _materialize(env, "released/s2rgb_dinov2/view", ROW)
    assert done.returncode == 0, done.stderr[-3000:]
    view = released.default_view_root(str(folder), home=home)     # shared with `--released`
    assert view.parent == home / "released" and view.name.startswith("Core-S2RGB-DINOv2-")
    paths = files.model_paths(view, "dinov2-rgb")
    assert [files.partition_row(p) for p in paths] == [ROW]
    assert geoparquet.read_info(paths[0]).weights == "released:Core-S2RGB-DINOv2"
    key = dg.AssetKey(["released", "s2rgb_dinov2", "view"])
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_materialized_partitions(key) == {ROW}
        failed = {}
        for name in ("utm_footprint_follows_pixels", "geo_crs_declared", "unique_id_verifiable",
                     "embedding_lengths_equal"):
            record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [dg.AssetCheckKey(key, name)])[dg.AssetCheckKey(key, name)]
            evaluation = record.event.dagster_event.event_specific_data
            failed[name] = (evaluation.passed, evaluation.severity)
    assert failed["utm_footprint_follows_pixels"] == (False, dg.AssetCheckSeverity.WARN)
    assert failed["geo_crs_declared"] == (False, dg.AssetCheckSeverity.WARN)
    assert failed["unique_id_verifiable"][0] is False
    assert failed["embedding_lengths_equal"][0] is True


def test_observation_follows_the_files(tmp_path, monkeypatch):
    folder = rf.write_reference_set(tmp_path / "Core-S2RGB-SigLIP", [ROW], 1, 1152, fragment_size=384)
    monkeypatch.setenv("MAJORTOM_RELEASED_S2RGB_SIGLIP", str(folder))
    from majortom_assets.defs.released import build_source_asset

    source = build_source_asset("Core-S2RGB-SigLIP")
    from dagster._core.definitions.observe import observe  # in-process observation (no public alias)

    def version(instance) -> str:
        assert observe([source], instance=instance).success
        record = instance.fetch_observations(source.key, limit=1).records[0]
        return record.asset_observation.data_version

    with dg.instance_for_test() as instance:
        v1 = version(instance)
        assert v1 and version(instance) == v1
        path = next(folder.rglob("*.parquet"))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert version(instance) != v1


def test_sets_are_off_unless_configured(monkeypatch):
    for name in ("S2L1C_SSL4EO", "S1RTC_SSL4EO", "S2RGB_SIGLIP", "S2RGB_DINOV2"):
        monkeypatch.delenv(f"MAJORTOM_RELEASED_{name}", raising=False)
    from majortom_assets.defs import released as defs_released

    assert defs_released.configured() == {}
    monkeypatch.setenv("MAJORTOM_RELEASED_S1RTC_SSL4EO", "hf://datasets/Major-TOM/Core-S1RTC-SSL4EO")
    assert defs_released.configured() == {"Core-S1RTC-SSL4EO": "hf://datasets/Major-TOM/Core-S1RTC-SSL4EO"}


@pytest.mark.slow
def test_alphaearth_asset_by_row(tmp_path):
    index = rf.write_aef_tiles(tmp_path / "aef", ["500U_20R"], 2021)
    home, dagster_home = tmp_path / "home", prepare_dagster_home(tmp_path / "dh")
    env = _env(home, dagster_home, MAJORTOM_ALPHAEARTH_TILES=str(index), MAJORTOM_ALPHAEARTH_YEAR="2021")
    done = _materialize(env, "embeddings/alphaearth", "500U")
    assert done.returncode == 0, done.stderr[-3000:]
    path = home / "embeddings" / alphaearth.MODEL_NAME / "row=500U" / "embeddings.parquet"
    table = geoparquet.read_table(path)
    # the tile's no-data strip (50 px at the west edge, 30 inside the image) leaves every fragment valid pixels
    assert table.num_rows > 25 - 1 and set(table.column("grid_cell").to_pylist()) >= {"500U_20R"}
    assert geoparquet.verify_file(path).ok
    done = _materialize(env, "vectors/alphaearth/index")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (home / "indexes" / "alphaearth").is_dir()

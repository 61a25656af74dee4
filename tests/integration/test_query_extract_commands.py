"""The issue-13 commands as a user runs them: `majortom search --text/--image`, `majortom extract`,
`majortom timeseries --window/--compare` in subprocesses, the `timeseries/<model>/window_change`
asset through `dagster asset materialize`, and point extraction over HTTP (fsspec).

Subprocesses get this checkout first on PYTHONPATH (copied from the environment), so they test
this tree. Embeddings are synthetic (vectors/testdata.py) or made by tiny random models here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from http_fixtures import serve_directory
from PIL import Image

from majortom_assets.models.siglip import SIGLIP_TINY_CONFIG
from majortom_assets.vectors import extract, testdata, windows
from majortom_assets.vectors.iocount import ByteCounter

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def _env(**extra) -> dict:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _majortom(*argv, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "majortom"), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env), cwd=REPO, check=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """dinov2-rgb-named synthetic embeddings: 3 rows x 8 cells, 4 monthly dates, a few changed cells."""
    return testdata.write_synthetic(tmp_path_factory.mktemp("store"), "dinov2-rgb", dim=32, timestamps=4,
                                    cells=testdata.cells_in_rows([40, 41, 42], 8, first_col=10, step=1),
                                    changed_fraction=0.25, seed=8, row_group_size=128)


# ----------------------------------------------------------------------------- time windows
def test_timeseries_windows_command(store, tmp_path):
    a, b = "2021-01-01/2021-01-31", "2021-03-01/2021-04-30"
    out = tmp_path / "change.parquet"
    proc = _majortom("timeseries", "--root", store.root, "--model", "dinov2-rgb", "--window", a, "--compare", b,
                     "--out", out, "--top", "5")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOMLY INITIALISED" in proc.stdout and f"{a} vs {b}: 24 cells in both windows" in proc.stdout
    written = pd.read_parquet(out)
    expected = windows.compare_windows(store.paths, a, b)
    assert list(written["grid_cell"]) == list(expected["grid_cell"])
    np.testing.assert_allclose(written["change_score"], expected["change_score"])
    jumped = {c for c, k in store.changed_cells.items() if k == 2}      # between the windows
    assert jumped and jumped <= set(written.loc[written["changed"], "grid_cell"])

    bad = _majortom("timeseries", "--root", store.root, "--model", "dinov2-rgb", "--window", "2021-05-01/2021-01-01")
    assert bad.returncode == 2 and "ends (2021-01-01) before it starts (2021-05-01)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_window_change_asset_through_dagster_cli(store, tmp_path):
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    env = {"DAGSTER_HOME": str(dagster_home), "MAJORTOM_HOME": str(store.root), "MAJORTOM_MODELS": "dinov2-rgb",
           "MAJORTOM_ENV": "local", "MAJORTOM_EXECUTOR": "in_process"}
    op = "timeseries__dinov2_rgb__window_change"
    config = {"ops": {op: {"config": {"window_a": "2021-01-01/2021-01-31", "window_b": "2021-03-01/2021-04-30",
                                      "level": "fragment"}}}}
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "majortom_assets.definitions",
           "--select", "timeseries/dinov2_rgb/window_change"]
    proc = subprocess.run([*cmd, "--config-json", json.dumps(config)], capture_output=True, text=True,
                          timeout=400, env=_env(**env), cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = store.root / "reports" / "dinov2-rgb" / "window_change.parquet"
    got = pd.read_parquet(path)
    expected = windows.compare_windows(store.paths, "2021-01-01/2021-01-31", "2021-03-01/2021-04-30",
                                       level="fragment")
    assert len(got) == len(expected) == 24 * 25
    np.testing.assert_allclose(np.sort(got["change_score"]), np.sort(expected["change_score"]))
    assert b"level=fragment" in pq.read_schema(path).metadata[b"majortom:windows"]

    config["ops"][op]["config"]["window_b"] = "2021-04-30/2021-03-01"      # refused before any work
    bad = subprocess.run([*cmd, "--config-json", json.dumps(config)], capture_output=True, text=True,
                         timeout=400, env=_env(**env), cwd=REPO, check=False)
    assert bad.returncode != 0 and "before it starts" in bad.stdout + bad.stderr


# ----------------------------------------------------------------------------------- extract
def test_extract_command_points_and_areas(store, tmp_path):
    lab = store.labels
    pts = pd.DataFrame({"site": ["a", "b", "far"], "lat": [lab.centre_lat[0], lab.centre_lat[9], -60.0],
                        "lon": [lab.centre_lon[0], lab.centre_lon[9], 10.0]})
    pts.to_csv(tmp_path / "sites.csv", index=False)
    out = tmp_path / "sites.parquet"
    proc = _majortom("extract", "--root", store.root, "--model", "dinov2-rgb", "--points", tmp_path / "sites.csv",
                     "--out", out, "--start", "2021-01-31", "--end", "2021-01-31")
    assert proc.returncode == 0, proc.stderr
    assert "2 of 3 points matched" in proc.stdout and "RANDOMLY INITIALISED" in proc.stdout
    assert "1 points fall in no fragment" in proc.stdout and "skipped unopened" in proc.stdout
    got = gpd.read_parquet(out)
    assert set(got["site"]) == {"a", "b"} and set(got["timestamp"].dt.strftime("%F")) == {"2021-01-31"}
    expected = extract.extract(store.paths, extract.read_points(tmp_path / "sites.csv"),
                               start="2021-01-31", end="2021-01-31T23:59:59")
    assert sorted(got["unique_id"]) == sorted(expected.table.column("unique_id").to_pylist())
    assert got.geometry.contains(got["place_geometry"]).all() and len(got["embedding"][0]) == 32

    area = gpd.GeoDataFrame({"name": ["box"]}, crs="EPSG:4326", geometry=[
        __import__("shapely").box(lab.centre_lon[3] - 0.01, lab.centre_lat[3] - 0.01,
                                  lab.centre_lon[3] + 0.01, lab.centre_lat[3] + 0.01)])
    area.to_file(tmp_path / "area.geojson", driver="GeoJSON")
    proc = _majortom("extract", "--root", store.root, "--model", "dinov2-rgb", "--geometry",
                     tmp_path / "area.geojson", "--out", tmp_path / "area.parquet", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["places_matched"] == 1 and summary["rows"] > 0 and summary["random_weights"]
    assert summary["row_groups_read"] < summary["row_groups"]
    assert gpd.read_parquet(tmp_path / "area.parquet").geometry.intersects(area.geometry[0]).all()

    missing = _majortom("extract", "--root", store.root, "--model", "dinov2-rgb", "--points",
                        tmp_path / "nope.csv", "--out", tmp_path / "x.parquet")
    assert missing.returncode == 2 and "points file" in missing.stderr and "nope.csv" in missing.stderr


def test_extract_over_http_reads_the_same_rows_and_few_bytes(store):
    lab = store.labels
    rng = np.random.default_rng(0)
    places = extract.Places.points(lab.centre_lat[4] + rng.uniform(-0.01, 0.01, 40),
                                   lab.centre_lon[4] + rng.uniform(-0.01, 0.01, 40))
    local = extract.extract(store.paths, places)
    with serve_directory(store.root, "alice", "pw") as port:
        urls = [f"http://alice:pw@127.0.0.1:{port}/{p.relative_to(store.root).as_posix()}" for p in store.paths]
        counter = ByteCounter()
        remote = extract.extract(urls, places, counter=counter)
    assert remote.table.column("unique_id").to_pylist() == local.table.column("unique_id").to_pylist()
    sources = set(remote.table.column("source").to_pylist())
    assert sources and all(s.startswith("http://***@127.0.0.1") for s in sources)     # no password stored
    assert sum(p.skipped for p in remote.plans) == 2            # other rows: no request at all
    assert counter.bytes_read < 0.6 * counter.bytes_total, counter.summary()


# ---------------------------------------------------------------------------- text / image
@pytest.fixture(scope="module")
def siglip_store(tmp_path_factory):
    """Tiny random SigLIP (seed 0) embeddings of a small synthetic S2L2A collection, indexed."""
    from siglip_helpers import tiny_siglip_checkpoint

    from majortom_assets import synthetic
    from majortom_assets.core import CoreCollection
    from majortom_assets.engine import EngineConfig, embed_to_file
    from majortom_assets.models import load_embedder
    from majortom_assets.vectors.search import build_index

    root = tmp_path_factory.mktemp("siglip")
    ckpt = tiny_siglip_checkpoint(root / "ckpt")
    coll = synthetic.generate_collection(root / "Core-S2L2A", "S2L2A", rows=["9U"], cells_per_row=3, size=768,
                                         seed=1)
    collection = CoreCollection(str(coll))
    out = root / "embeddings" / "siglip-rgb" / "row=9U" / "embeddings.parquet"
    embed_to_file(collection, collection.metadata(), load_embedder("siglip-rgb", "random", tiny=True, seed=0),
                  EngineConfig(batch_size=8, image_size=768, device="cpu"), out)
    build_index([out], root / "indexes" / "siglip-rgb", model="siglip-rgb", progress=False)
    return root, ckpt


def test_search_by_text_and_by_image(siglip_store, tmp_path):
    root, ckpt = siglip_store
    proc = _majortom("search", "--root", root, "--model", "siglip-rgb", "--text", "solar farm", "--text",
                     "solar panels", "--weights", "random", "--tiny", "--tokenizer", ckpt, "-k", "3",
                     "--format", "json", timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(proc.stdout)
    assert len(hits) == 3 and all(-1 <= h["similarity"] <= 1 for h in hits)
    assert "RANDOM WEIGHTS" in proc.stderr and "2 prompts averaged" in proc.stderr
    assert "mean nothing" not in proc.stderr                  # same seeded checkpoint as the files

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 420, 3), dtype=np.uint8)).save(tmp_path / "q.png")
    proc = _majortom("search", "--root", root, "--model", "siglip-rgb", "--image", tmp_path / "q.png",
                     "--image-mode", "fragments", "--weights", "random", "--tiny", "-k", "2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RANDOM WEIGHTS" in proc.stdout and "4 fragment(s) of 384 px (2x2) from 500x420 px" in proc.stdout
    assert proc.stdout.count("q.png [") == 8                   # 4 query fragments x k=2

    other = _majortom("search", "--root", root, "--model", "siglip-rgb", "--text", "forest", "--weights", ckpt,
                      "-k", "1", timeout=400)
    assert other.returncode == 0 and "similarities between them mean nothing" in other.stdout
    import rasterio

    s1 = np.random.default_rng(2).uniform(0.01, 0.3, (2, 240, 240)).astype(np.float32)
    with rasterio.open(tmp_path / "s1.tif", "w", driver="GTiff", width=240, height=240, count=2,
                       dtype="float32") as dst:
        dst.write(s1)
    wrong = _majortom("search", "--root", root, "--index", root / "indexes" / "siglip-rgb", "--model", "ssl4eo-s1",
                      "--image", tmp_path / "s1.tif", "--weights", "random", "--tiny", "-k", "1", timeout=400)
    assert wrong.returncode == 2 and f"256-d vectors but the index holds {SIGLIP_TINY_CONFIG['hidden_size']}-d" in wrong.stderr

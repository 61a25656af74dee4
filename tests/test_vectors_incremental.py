"""The incremental index: trained once, extended per row, exact after re-ranking, consistent on disk.

Small synthetic data throughout; re-ranking depth >= the number of vectors makes the index exact,
so results can be compared with numpy brute force id for id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
from majortom_assets.defs import keys
from majortom_assets.vectors import files, incremental, search, testdata

REPO = Path(__file__).resolve().parents[1]
#: fragments spread wider than cells: new rows come from the distribution the codebooks saw
#: (with the default tight per-cell clusters, a tiny index memorises cells and every new row drifts)
SPREAD = {"cell_scale": 0.05, "fragment_scale": 0.3}
BIN = Path(sys.executable).parent
K = 10


def _brute(x: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    xn, qn = files.l2_normalise(x), files.l2_normalise(q)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def _space(n: int, dim: int = 32, point_seed: int = 1) -> np.ndarray:
    return testdata.cnn_like_vectors(n, dim, np.random.default_rng(0), np.random.default_rng(point_seed),
                                     rank=16, n_classes=50)


def _config(**kw) -> incremental.IncrementalConfig:
    return incremental.IncrementalConfig(**{"nlist": 16, "nprobe": 4, "rerank": 50, **kw})


# ----------------------------------------------------------------------------------- engine
def test_rows_added_replaced_removed_stay_exact_and_consistent(tmp_path):
    x = _space(6000)
    rows = {f"r{i}": x[i * 1000:(i + 1) * 1000] for i in range(6)}
    index = incremental.IncrementalIndex.create(tmp_path / "idx", x[:4000], _config(), expected=6000)
    for name, v in rows.items():
        index.add_row(name, v)
    assert index.verify() == [] and index.count == 6000
    assert index.manifest["packed"]["count"] > 0   # packing happened along the way
    q = _space(20, point_seed=9)
    s = index.open_searcher()
    _, pos = s.search(q, K, nprobe=16, rerank=6000)   # every list, every candidate: exact
    np.testing.assert_array_equal(np.sort(pos, 1), np.sort(_brute(x, q), 1))

    # replace r2 with new vectors, drop r4: old ids die, positions follow the live rows in id order
    new = _space(700, point_seed=5)
    index.add_row("r2", new, pack=False)
    # unpacked: the new r2 is searched from memory on top of the packed lists, the old r2 masked
    assert index.manifest["packed"]["rows"]["r2"] != index.manifest["rows"]["r2"]["start"]
    s = index.open_searcher()
    assert s.index.ntotal == 6700 and len(s) == 5700
    live5 = np.concatenate([rows["r0"], rows["r1"], rows["r3"], rows["r4"], rows["r5"], new])
    _, pos = s.search(q, K, nprobe=16, rerank=6700)
    np.testing.assert_array_equal(np.sort(pos, 1), np.sort(_brute(live5, q), 1))
    index.remove_row("r4")
    assert index.verify() == []
    live = np.concatenate([rows["r0"], rows["r1"], rows["r3"], rows["r5"], new])
    s = index.open_searcher()
    assert len(s) == len(live) == 4700
    np.testing.assert_allclose(s.vectors(np.arange(len(live))), files.l2_normalise(live), atol=1e-6)
    sims, pos = s.search(q, K, nprobe=16, rerank=6000)
    np.testing.assert_array_equal(np.sort(pos, 1), np.sort(_brute(live, q), 1))
    np.testing.assert_allclose(sims[:, 0], np.max(files.l2_normalise(q) @ files.l2_normalise(live).T, 1),
                               atol=1e-5)
    # a filter mask restricts results to allowed positions even when they are far away
    allowed = np.zeros(len(live), bool)
    allowed[-700:] = True
    _, pos = s.search(q, K, nprobe=16, rerank=6000, allowed=allowed)
    assert (pos >= len(live) - 700).all()
    # only the manifest's segments remain on disk
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "idx" / "rows").iterdir()) == ["r0", "r1", "r2", "r3", "r5"]


def test_recall_climbs_with_nprobe_and_reranking_recovers_pq_error(tmp_path):
    x = _space(20_000)
    index = incremental.IncrementalIndex.create(tmp_path / "idx", x[:10_000], _config(nlist=64), expected=20_000)
    for i in range(4):
        index.add_row(f"r{i}", x[i * 5000:(i + 1) * 5000])
    s = index.open_searcher()
    q = _space(100, point_seed=42)
    truth = _brute(x, q)
    curve = [_recall(s.search(q, K, nprobe=p, rerank=200)[1], truth) for p in (1, 4, 16, 64)]
    assert curve == sorted(curve) and curve[0] < 0.8 and curve[-1] >= 0.97, curve
    no_rerank = _recall(s.search(q, K, nprobe=64, rerank=0)[1], truth)
    assert no_rerank < curve[-1]   # PQ codes alone misorder near neighbours; exact vectors fix it


def test_drift_check_flags_a_row_from_another_distribution(tmp_path):
    x = _space(4000)
    index = incremental.IncrementalIndex.create(tmp_path / "idx", x, _config(), expected=4000)
    same = index.add_row("same", _space(1000, point_seed=3))
    assert same["residual_ratio"] < 1.5 and index.needs_retrain() == []
    other = testdata.clustered_vectors(1000, 32, 3, np.random.default_rng(8))   # not CNN-like at all
    entry = index.add_row("other", other)
    assert entry["residual_ratio"] > 1.5
    assert any("row other" in why for why in index.needs_retrain())
    index.remove_row("other")
    assert index.needs_retrain() == []


def test_verify_reports_damage(tmp_path):
    x = _space(3000)
    index = incremental.IncrementalIndex.create(tmp_path / "idx", x, _config(), expected=3000)
    index.add_row("a", x[:1500])
    index.add_row("b", x[1500:])
    assert index.verify() == []
    seg = {s.name: s for s in index.segments()}
    np.save(seg["b"].directory / "vectors.npy", x[:10])
    (seg["a"].directory / "codes.npy").unlink()
    problems = index.verify()
    assert any("row b: vectors.npy has shape (10, 32)" in p for p in problems)
    assert any(p.startswith("row a: unreadable") for p in problems)


def test_failed_row_write_leaves_the_index_as_it_was(tmp_path, monkeypatch):
    x = _space(3000)
    index = incremental.IncrementalIndex.create(tmp_path / "idx", x, _config(), expected=3000)
    index.add_row("a", x[:1500])
    before = (tmp_path / "idx" / "manifest.json").read_text()
    real_save = np.save

    def failing_save(path, arr, *a, **kw):
        if Path(path).name == "vectors.npy":
            raise OSError("disk full (simulated)")
        return real_save(path, arr, *a, **kw)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        index.add_row("a", x[1500:])
    monkeypatch.setattr(np, "save", real_save)
    assert (tmp_path / "idx" / "manifest.json").read_text() == before
    assert [p.name for p in (tmp_path / "idx" / "rows").iterdir()] == ["a-0"]   # no temp dir left
    assert incremental.IncrementalIndex(tmp_path / "idx").verify() == []


# ----------------------------------------------------------------------------------- from row files
@pytest.fixture
def emb(tmp_path):
    cells = testdata.cells_in_rows([3, 4, 5], 8)
    return testdata.write_synthetic(tmp_path / "home", "m1", cells=cells, dim=16, timestamps=2, seed=3,
                                    **SPREAD)


def _rewrite_with_noise(path: Path, seed: int, scale: float = 0.05) -> np.ndarray:
    """Rewrite a row file in place with slightly different vectors (same distribution, same
    unique_ids and metadata), as a re-run of the row would; returns the new vectors."""
    table = pq.read_table(path)
    x = geoparquet.embedding_matrix(table)
    x = (x + scale * np.random.default_rng(seed).standard_normal(x.shape)).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    table = table.set_column(table.schema.get_field_index("embedding"), table.schema.field("embedding"), col)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return x


def _hold_back(path: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Move a row directory aside (returns its place and where it went) to add it later."""
    aside = tmp_path / "aside" / path.parent.name
    aside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path.parent, aside)
    return path, aside


def _count_reads(monkeypatch) -> list[Path]:
    """Record every embedding-file read (the only way vectors leave a row file)."""
    reads: list[Path] = []
    real = files.iter_embeddings

    def counting(path, *a, **kw):
        reads.append(Path(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(files, "iter_embeddings", counting)
    return reads


def test_update_reads_only_new_and_changed_rows(tmp_path, monkeypatch):
    cells = testdata.cells_in_rows([3, 4, 5, 6], 8)
    emb = testdata.write_synthetic(tmp_path / "home", "m1", cells=cells, dim=16, timestamps=2, seed=3,
                                    **SPREAD)
    added, aside = _hold_back(emb.paths[3], tmp_path)          # row 6U arrives later
    out = tmp_path / "idx"
    first = incremental.update(emb.paths[:3], out, model="m1", meta_columns=search.META_COLUMNS)
    assert first["retrained"] and first["count"] == files.row_count(emb.paths[:3])
    # one row re-written with new vectors, one row added, one untouched
    changed = emb.paths[1]
    new_x = _rewrite_with_noise(changed, seed=1)
    shutil.move(aside, added.parent)
    paths = files.model_paths(emb.root, "m1")
    assert paths == emb.paths
    reads = _count_reads(monkeypatch)
    report = incremental.update(paths, out, model="m1", meta_columns=search.META_COLUMNS)
    assert not report["retrained"], report["reasons"]
    assert sorted(set(reads)) == sorted([changed, added])   # the unchanged rows were never opened
    assert sorted(report["rows_read"]) == ["4U", "6U"] and sorted(report["rows_kept"]) == ["3U", "5U"]
    assert incremental.IncrementalIndex(out).verify() == []

    # the index now holds the new vectors and answers exactly (re-rank depth >= N)
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    x = geoparquet.embedding_matrix(table)
    idx = search.SearchIndex.load(out)
    assert isinstance(idx, search.IncrementalSearchIndex) and len(idx) == len(x)
    uid = pq.read_table(changed).column("unique_id")[5].as_py()
    np.testing.assert_allclose(idx.vectors_at([idx.id_of(uid)])[0], files.l2_normalise(new_x[5]), atol=1e-6)
    res = idx.query(unique_id=uid, k=K, rerank=len(x), nprobe=10_000)
    assert res["unique_id"].iloc[0] == uid and res["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    truth = _brute(x, x[table.column("unique_id").to_pylist().index(uid)][None])[0]
    assert set(res["unique_id"]) == set(np.asarray(table.column("unique_id").to_pylist())[truth])
    # filters and cell queries work as on the flat index
    row4 = idx.query(unique_id=uid, k=5, filters=search.SearchFilter(rows=["4U"]))
    assert (row4["grid_cell"].str.startswith("4U_")).all() and len(row4) == 5
    cell = emb.labels.grid_cell[0]
    assert idx.query(cell=cell, k=3, rerank=len(x))["grid_cell"].iloc[0] == cell

    # removing a row file drops its row; nothing else is read
    reads.clear()
    n_added = pq.ParquetFile(added).metadata.num_rows
    shutil.rmtree(added.parent)
    report = incremental.update(files.model_paths(emb.root, "m1"), out)
    assert reads == [] and report["rows_removed"] == ["6U"] and not report["retrained"]
    assert len(search.SearchIndex.load(out)) == len(x) - n_added


def test_update_retrains_on_drift_or_request(emb, tmp_path):
    out = tmp_path / "idx"
    incremental.update(emb.paths, out, model="m1")
    # a row from a very different distribution: the drift check asks for a retrain
    weird = testdata.write_synthetic(tmp_path / "home", "m1", cells=testdata.cells_in_rows([9], 8), dim=16,
                                     timestamps=2, seed=6, class_scale=40.0, fragment_scale=0.01).paths[0]
    paths = files.model_paths(emb.root, "m1")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(incremental.DriftError, match="--retrain"):
        incremental.update(paths, copy, retrain="never")
    report = incremental.update(paths, out)
    assert report["retrained"] and any("residual" in r for r in report["reasons"]), report["reasons"]
    assert report["needs_retrain"] == [] and incremental.IncrementalIndex(out).verify() == []
    assert weird in paths
    forced = incremental.update(paths, out, retrain="always")
    assert forced["retrained"] and "retrain requested" in forced["reasons"]


# ----------------------------------------------------------------------------------- entry points
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "majortom_assets.cli", *map(str, argv)], check=False,
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)


@pytest.mark.slow
def test_cli_index_updates_incrementally_and_search_reranks(emb, tmp_path):
    root = emb.root
    done = _cli("index", "--root", root, "--model", "m1", "--kind", "incremental", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "rebuilt (no index yet)" in done.stdout
    _rewrite_with_noise(emb.paths[1], seed=9)
    done = _cli("index", "--root", root, "--model", "m1", "--no-progress")   # kind follows the existing index
    assert done.returncode == 0, done.stderr
    assert "updated; rows read 1, unchanged 2, removed 0" in done.stdout
    cell = emb.labels.grid_cell[1]
    done = _cli("search", "--root", root, "--model", "m1", "--cell", cell, "-k", "3", "--rerank", "500",
                "--format", "json")
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)
    assert len(hits) == 3 and hits[0]["grid_cell"] == cell
    done = _cli("index", "--root", root, "--model", "m1", "--retrain", "--no-progress")
    assert done.returncode == 0 and "rebuilt (retrain requested)" in done.stdout
    done = _cli("index", "--root", root, "--model", "m1", "--kind", "flat", "--retrain")
    assert done.returncode == 2 and "--retrain applies to the incremental index" in done.stderr


@pytest.mark.slow
def test_dagster_index_asset_reads_only_the_changed_row(tmp_path):
    """`dagster asset materialize` twice on a fresh DAGSTER_HOME: the second run, after one row
    file changed, reads that row only (materialisation metadata) and the index holds its vectors."""
    from dagster_helpers import local_env

    model = "dinov2-rgb"
    home, dagster_home = tmp_path / "home", tmp_path / "dagster"
    dagster_home.mkdir()
    data = testdata.write_synthetic(home, model, cells=testdata.cells_in_rows([3, 4, 5], 8), dim=16,
                                    timestamps=2, seed=3, **SPREAD)
    env = {**local_env(home, dagster_home, model, 384), "PYTHONPATH": _env()["PYTHONPATH"]}
    select = keys.index_key(model).to_user_string()

    def materialise():
        done = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-m", "majortom_assets.definitions",
                               "--select", select], check=False, cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            event = instance.get_latest_materialization_event(keys.index_key(model))
            return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    first = materialise()
    assert first["retrained"] is True and first["rows read"] == 3 and first["vectors"] == files.row_count(data.paths)
    changed = data.paths[2]
    _rewrite_with_noise(changed, seed=8)
    second = materialise()
    assert second["retrained"] is False, second["retrain reasons"]
    assert (second["rows read"], second["rows unchanged"]) == (1, 2)
    idx = search.SearchIndex.load(home / "indexes" / model)
    uid = pq.read_table(changed).column("unique_id")[0].as_py()
    assert idx.query(unique_id=uid, k=1)["unique_id"].iloc[0] == uid

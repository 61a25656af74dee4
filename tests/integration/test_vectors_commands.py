"""The vector subcommands through the `majortom` CLI parser."""

from __future__ import annotations

import json

import numpy as np
import pytest

from majortom_assets.cli import main
from majortom_assets.vectors import testdata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return testdata.write_synthetic(tmp_path_factory.mktemp("cli"), "m1", cells=testdata.cells_in_rows([5, 6], 12),
                                    dim=16, timestamps=2, seed=4)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_index_and_search(data, capsys):
    root = data.root
    assert _run(capsys, "index", "--root", root, "--model", "m1", "--no-progress")[0] == 0
    cell = data.labels.grid_cell[2]
    code, out, _ = _run(capsys, "search", "--root", root, "--model", "m1", "--cell", cell, "-k", "4",
                        "--format", "json", "--rows", cell.split("_")[0])
    assert code == 0
    hits = json.loads(out)
    assert len(hits) == 4 and hits[0]["grid_cell"] == cell and hits[0]["geometry"].startswith("POLYGON")
    vec = root / "q.npy"
    np.save(vec, np.ones(16, np.float32))
    code, out, _ = _run(capsys, "search", "--root", root, "--model", "m1", "--vector-file", vec, "-k", "3")
    assert code == 0 and "similarity" in out
    code, out, _ = _run(capsys, "search", "--root", root, "--model", "m1", "--latlon",
                        data.labels.centre_lat[0], data.labels.centre_lon[0], "--start", "2021-01-15")
    assert code == 0 and "2021-01-31" in out and "2021-01-01" not in out


def test_evaluate_several_models_writes_one_comparison(tmp_path, capsys):
    cells = testdata.cells_in_rows([5, 6], 12)
    first = testdata.write_synthetic(tmp_path, "m1", cells=cells, dim=16, seed=4)
    testdata.write_synthetic(tmp_path, "m2", cells=cells, dim=8, seed=5)
    collection = tmp_path / "collections" / "Core-S2L2A"   # labels where a Core collection keeps them
    collection.mkdir(parents=True)
    first.labels.to_parquet(collection / "labels.parquet")
    code, out, err = _run(capsys, "evaluate", "--root", tmp_path, "--labels", collection, "--folds", "3")
    assert code == 0, err
    report = json.loads((tmp_path / "reports" / "comparison" / "evaluation.json").read_text())
    assert [m["model"] for m in report["models"]] == ["m1", "m2"] and "| m2 |" in out
    assert (tmp_path / "reports" / "comparison" / "evaluation.md").is_file()
    assert not (tmp_path / "reports" / "m1").exists()
    code, _, err = _run(capsys, "evaluate", "--root", tmp_path, "--labels", tmp_path / "collections")
    assert code == 2 and "collections has no labels.parquet" in err


def test_bad_arguments_name_the_value(data, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--root", str(data.root), "--model", "m1", "--cell", "12Q_3R"])
    assert exc.value.code == 2 and "12Q_3R" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--root", str(data.root), "--model", "m1", "--cell", "5U_1R", "-k", "0"])
    assert "'0'" in capsys.readouterr().err
    code, _, err = _run(capsys, "export", "--root", data.root, "--model", "nope")
    assert code == 2 and "known models: m1" in err
    code, _, err = _run(capsys, "export", "--root", data.root, "--model", "m1", "--rows", "99U")
    assert code == 2 and "99U" in err
    code, _, err = _run(capsys, "search", "--root", data.root, "--model", "m1", "--cell", "5U_3R",
                        "--index", data.root / "missing")
    assert code == 2 and "majortom index" in err


def test_export_pca_timeseries_evaluate_sql(data, capsys, tmp_path):
    root = data.root
    code, out, _ = _run(capsys, "export", "--root", root, "--model", "m1", "--precision", "int8", "--verify",
                        "--no-progress")
    assert code == 0 and "verify: ok" in out
    assert (root / "exports" / "m1" / "int8" / "embeddings.int8.bin").is_file()
    code, out, _ = _run(capsys, "pca-map", "--root", root, "--model", "m1", "--tif", "--no-progress")
    assert code == 0 and (root / "maps" / "m1" / "pca.png").is_file() and (root / "maps" / "m1" / "pca.tif").is_file()
    code, out, _ = _run(capsys, "timeseries", "--root", root, "--model", "m1", "--cell", data.labels.grid_cell[0],
                        "--format", "json")
    assert code == 0 and len(json.loads(out)["per_cell"]) == 1
    labels = tmp_path / "labels.csv"
    data.labels.to_csv(labels, index=False)
    code, out, _ = _run(capsys, "evaluate", "--root", root, "--labels", labels, "--folds", "3")
    # one model: its own report folder, where the vectors/<model>/evaluation asset writes
    report = root / "reports" / "m1" / "evaluation.json"
    assert code == 0 and "| m1 |" in out and report.is_file()
    assert [m["model"] for m in json.loads(report.read_text())["models"]] == ["m1"]
    assert not (root / "reports" / "evaluation").exists()
    code, out, _ = _run(capsys, "sql", "--root", root)
    assert code == 0 and "m1" in out
    code, out, _ = _run(capsys, "sql", "--root", root, "SELECT count(*) AS n FROM m1", "--format", "csv")
    assert code == 0 and out.split() == ["n", str(24 * 25 * 2)]
    code, _, err = _run(capsys, "sql", "--root", root, "SELECT * FROM nope")
    assert code == 2 and "nope" in err

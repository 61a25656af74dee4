"""Every product command on a released-shaped folder through `--released`, as a user runs it.

The folder is written in exactly the reference embedder's shape (released_fixtures); each command
runs as a subprocess of `python -m majortom_assets.cli` with this tree on PYTHONPATH, and the view
lands under $MAJORTOM_HOME/released/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from majortom_assets import released_fixtures as rf
from majortom_assets import synthetic

ROWS = ["136U", "12D"]


@pytest.fixture(scope="module")
def env_and_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("released")
    folder = rf.write_reference_set(base / "Core-S2RGB-DINOv2", ROWS, 4, 768, timestamps=3, files=2)
    home = base / "home"
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "MAJORTOM_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    return env, folder, home


def _cli(env, *argv):
    res = subprocess.run([sys.executable, "-m", "majortom_assets.cli", *map(str, argv)],
                         capture_output=True, text=True, env=env, check=False)
    return res.returncode, res.stdout, res.stderr


def test_check_reports_quirks(env_and_set):
    env, folder, _ = env_and_set
    code, out, err = _cli(env, "released", "check", folder, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    failed = {c["name"] for c in report["checks"] if c["status"] == "fail"}
    assert {"embedding_fixed_size", "geo_crs_declared", "utm_footprint_follows_pixels",
            "unique_id_verifiable", "preprocessing_as_standard"} <= failed
    code, _, _ = _cli(env, "released", "check", folder, "--strict")
    assert code == 1


def test_products_run_on_the_released_set(env_and_set, tmp_path):
    env, folder, home = env_and_set
    code, out, err = _cli(env, "index", "--released", folder, "--model", "dinov2-rgb", "--no-progress")
    assert code == 0, err
    assert "index of 600 vectors (dim 768)" in out
    assert "fails" in err and "utm_footprint_follows_pixels" in err     # quirks summarised, not hidden
    views = list((home / "released").iterdir())
    assert len(views) == 1 and views[0].name.startswith("Core-S2RGB-DINOv2-")

    cell = synthetic.cells_for_rows(["136U"], 4)[1]
    code, out, err = _cli(env, "search", "--released", folder, "--model", "dinov2-rgb", "--cell", cell,
                          "-k", "5", "--format", "json")
    assert code == 0, err
    hits = json.loads(out)
    assert hits[0]["grid_cell"] == cell and len(hits) == 5

    code, out, err = _cli(env, "export", "--released", folder, "--model", "dinov2-rgb", "--precision", "int8",
                          "--verify", "--no-progress")
    assert code == 0, err
    assert "600 × 768 int8" in out and "verify: ok" in out

    code, out, err = _cli(env, "pca-map", "--released", folder, "--model", "dinov2-rgb", "--no-progress",
                          "--width", "256", "--height", "128")
    assert code == 0, err
    assert (views[0] / "maps" / "dinov2-rgb" / "pca.png").is_file()

    code, out, err = _cli(env, "sql", "--released", folder, "--format", "json",
                          "SELECT count(*) AS n, count(DISTINCT grid_cell) AS cells FROM dinov2_rgb")
    assert code == 0, err
    assert json.loads(out) == [{"n": 600, "cells": 8}]

    code, out, err = _cli(env, "timeseries", "--released", folder, "--model", "dinov2-rgb", "--cell", cell,
                          "--format", "json")
    assert code == 0, err
    series = json.loads(out)["series"]
    assert len(series) == 25 and all(len(s["dates"]) == 3 for s in series)

    cells = synthetic.cells_for_rows(ROWS, 4)
    labels = tmp_path / "labels.csv"
    # two classes of four cells each (one per row): every class has cells for each fold
    pd.DataFrame({"grid_cell": cells, "class_id": [int(c.startswith("12D")) for c in cells]}).to_csv(
        labels, index=False)
    code, out, err = _cli(env, "evaluate", "--released", folder, "--labels", labels, "--folds", "2", "-k", "1",
                          "--out", tmp_path / "report")
    assert code == 0, err
    assert "dinov2-rgb" in out


def test_released_and_root_are_exclusive_and_errors_are_one_line(env_and_set, tmp_path):
    env, folder, _ = env_and_set
    code, _, err = _cli(env, "index", "--released", folder, "--root", tmp_path, "--model", "dinov2-rgb")
    assert code == 2 and "not allowed with argument" in err
    code, _, err = _cli(env, "index", "--released", folder, "--model", "siglip-rgb")
    assert code == 2 and "holds dinov2-rgb embeddings, not 'siglip-rgb'" in err and "Traceback" not in err
    code, _, err = _cli(env, "export", "--released", tmp_path / "missing", "--model", "dinov2-rgb")
    assert code == 2 and "does not exist" in err
    code, _, err = _cli(env, "export", "--released", folder, "--model", "dinov2-rgb", "--rows", "99U")
    assert code == 2 and "99U" in err


def test_unreachable_hub_set_is_one_line(env_and_set):
    env, _, _ = env_and_set
    code, _, err = _cli({**env, "HF_HUB_OFFLINE": "1"}, "released", "check",
                        "hf://datasets/Major-TOM/Core-S2RGB-DINOv2")
    assert code == 2 and "hf://datasets/Major-TOM/Core-S2RGB-DINOv2" in err and "Traceback" not in err

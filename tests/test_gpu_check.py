"""The GPU check rehearsed on the CPU, in an environment shaped like the GPU machine.

The rehearsal runs ``benchmarks/gpu_check.py --device cpu --quick`` as a subprocess with the
packages the GPU machine lacks made unimportable (``benchmarks/gpu_blocker/sitecustomize.py``):
Dagster, DuckDB, FAISS, GeoPandas, torchgeo, rasterio, imagecodecs. So the engine, the models, the
synthetic collection writer (numpy GeoTIFF writer) and the decoder (zlib path) must all work
without them, and every section of the table must come out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = ROOT / "benchmarks" / "gpu_blocker"
BLOCKED = ("dagster", "duckdb", "faiss", "geopandas", "torchgeo", "rasterio", "imagecodecs")
LABELS = ("SSL4EO-S2", "SSL4EO-S1", "DINOv2-base", "SigLIP SO400M-384")


def _gpu_like_env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BLOCKER), str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MAJORTOM_BLOCK_IMPORTS"] = ",".join(BLOCKED)
    return env


def test_blocker_makes_the_missing_packages_unimportable():
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    try:\n        importlib.import_module(n)\n" \
           "    except ModuleNotFoundError as e:\n        print('blocked', n, e.name)\n"
    run = subprocess.run([sys.executable, "-c", code, *BLOCKED, "rasterio.io"], env=_gpu_like_env(),
                         capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    assert [line.split()[1] for line in run.stdout.splitlines()] == [*BLOCKED, "rasterio.io"]


def test_engine_models_and_synthetic_import_without_optional_packages():
    code = ("import sys\nimport majortom_assets, majortom_assets.engine, majortom_assets.synthetic, "
            "majortom_assets.decode_processes\nfrom majortom_assets.models import load_embedder\n"
            "load_embedder('ssl4eo-s2', 'random', tiny=True)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")
    run = subprocess.run([sys.executable, "-c", code, *BLOCKED], env=_gpu_like_env(), capture_output=True,
                         text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"


def test_gpu_check_sh_installs_nothing_without_wheels_and_reaches_the_check(tmp_path):
    env = _gpu_like_env() | {"PYTHON": sys.executable, "MAJORTOM_GPU_WHEEL_DIR": str(tmp_path / "none")}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out"), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--out-dir" in run.stdout and "--quick" in run.stdout


def test_gpu_check_quick_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out-dir", str(out), "--device", "cpu", "--quick",
         "--work-dir", str(tmp_path)],
        cwd=ROOT, env=_gpu_like_env(), capture_output=True, text=True, check=False, timeout=840,
    )
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    table = (out / "gpu_check.md").read_text()
    assert table in run.stdout   # the printed table is the written one
    data = json.loads((out / "gpu_check.json").read_text())
    env = data["environment"]
    assert data["finished"] and env["device"] == "cpu"
    assert env["rasterio"] is False and env["imagecodecs"] is False   # the GPU machine's decode path
    rows = data["rows"]
    assert not [r for r in rows if r["verdict"] in ("ERROR", "out of time")], rows
    assert not [r for r in rows if "FAILED" in r["note"]], rows

    def value(section: str, model: str, measure: str) -> float:
        found = [r for r in rows if r["section"] == section and r["model"] == model and r["measure"].startswith(measure)]
        assert len(found) == 1, (section, model, measure, rows)
        assert found[0]["value"] is not None, found[0]
        return found[0]["value"]

    assert value("setup", "", "synthetic collections") > 0
    for label in LABELS:
        assert value("forward", label, "bf16 fragments/s") > 0
        assert 0.99 <= value("cosine", label, "bf16 vs fp32 cosine, min") <= 1.0 + 1e-6
        assert 0.99 <= value("cosine", label, "bf16 vs fp32 cosine, mean") <= 1.0 + 1e-6
        assert value("end-to-end", label, "cells/s") > 0
        assert value("end-to-end", label, "pipeline efficiency") > 0
        assert f"| forward | {label} | bf16 fragments/s" in table
    assert value("forward", "SSL4EO-S2", "fp32 fragments/s") > 0
    targets = {r["model"]: r["target"] for r in rows if r["section"] == "end-to-end" and r["measure"].startswith("cells/s")}
    assert targets["SSL4EO-S2"] == "≥ 150" and targets["SigLIP SO400M-384"] == "≥ 25"
    for mode in ("threads", "processes"):
        for workers in (1, 2):
            assert value("decode workers", "SSL4EO-S2", f"cells/s, {workers} decode {mode}") > 0

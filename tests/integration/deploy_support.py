"""Shared helpers of the deployment tests (no tests here).

The deployment tests drive the real code location, `majortom_assets.definitions`, in subprocesses
the way production does: settings come from `MAJORTOM_*` variables read once per process, so each
scenario gets its own environment and nothing leaks between test files. Runs are launched with
`execute_job` on the reconstructable implicit asset job (what `dagster asset materialize` does),
selecting assets by key.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE_SIZE = 384  # small samples: a 224 px model cuts 2 x 2 fragments from each

# Runs in a subprocess, one process for a list of batches (the code location loads once):
# [{"select": ["core/s2l2a/metadata", ...], "partitions": ["1U", ...] | null}, ...]
DRIVER = r"""
import json, os, sys
from dagster import AssetKey, DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

batches = json.loads(sys.argv[1])
repo = ReconstructableRepository.for_module(
    "majortom_assets.definitions", "defs", working_directory=os.getcwd()
)
job = repo.get_reconstructable_job("__ASSET_JOB")
results = []
with DagsterInstance.get() as instance:
    for spec in batches:
        keys = [AssetKey(s.split("/")) for s in spec["select"]]
        for partition in spec.get("partitions") or [None]:
            tags = {"dagster/partition": partition} if partition else {}
            result = execute_job(job, instance, tags=tags, asset_selection=keys, raise_on_error=False)
            results.append({"run_id": result.run_id, "success": result.success, "partition": partition})
print("DRIVER_RESULT " + json.dumps(results), flush=True)
"""

# The documented start command of each local service (machine facts / docs/deployment.md).
SERVICES = {
    "postgres": (5432, "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"),
    "redis": (
        6379,
        (
            'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
            "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
        ),
    ),
    "rabbitmq": (5672, "rabbitmq-server -detached"),
}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def ensure_service(name: str, wait_s: float = 60.0) -> None:
    """Make sure a local service answers; start it once with its documented command, else fail."""
    port, command = SERVICES[name]
    if port_open(port):
        return
    subprocess.run(["bash", "-c", command], capture_output=True, timeout=120, check=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.5)
    pytest.fail(f"{name} is not listening on 127.0.0.1:{port} and `{command}` did not start it")


@contextlib.contextmanager
def postgres_database(prefix: str = "majortom_test"):
    """A fresh database on 127.0.0.1:5432 (trust auth, user postgres), dropped afterwards."""
    import psycopg2

    ensure_service("postgres")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_instance_home(directory: Path, db_name: str) -> dict[str, str]:
    """A DAGSTER_HOME holding deploy/dagster.postgres.yaml; returns the variables it reads."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "deploy" / "dagster.postgres.yaml", directory / "dagster.yaml")
    return {
        "DAGSTER_HOME": str(directory),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": "5432",
        "DAGSTER_PG_USER": "postgres",
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_DB": db_name,
    }


def project_env(home: Path, dagster_home: Path, models: str = "dinov2-rgb", **extra: str) -> dict[str, str]:
    """Environment of a local (synthetic, tiny, CPU) deployment rooted at `home`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MAJORTOM_", "DAGSTER_"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "DAGSTER_HOME": str(dagster_home),
            "MAJORTOM_ENV": "local",
            "MAJORTOM_HOME": str(home),
            "MAJORTOM_MODELS": models,
            "MAJORTOM_IMAGE_SIZE": str(IMAGE_SIZE),
            "MAJORTOM_BATCH_SIZE": "8",
            "MAJORTOM_EXECUTOR": "in_process",
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.update(extra)
    return env


def synthetic_rows(home: Path, rows: list[str], *, cells_per_row: int, seed: int, timestamps: int = 1) -> Path:
    """Small Core-S2L2A rows under `home`, where a local code location looks for the collection."""
    from majortom_assets import synthetic

    return synthetic.generate_collection(
        home / "collections" / "Core-S2L2A", "S2L2A", rows=rows, cells_per_row=cells_per_row,
        timestamps=timestamps, size=IMAGE_SIZE, seed=seed, samples_per_shard=4,
    )


def local_deployment(
    root: Path, row: str, *, cells_per_row: int, seed: int, timestamps: int = 1, **extra_env: str
) -> tuple[Path, Path, dict[str, str]]:
    """`root/home` with one synthetic row and an empty `root/dagster_home` (every grid row is a
    partition already), plus the environment of a deployment over them."""
    home, dagster_home = root / "home", root / "dagster_home"
    dagster_home.mkdir()
    synthetic_rows(home, [row], cells_per_row=cells_per_row, seed=seed, timestamps=timestamps)
    env = project_env(home, dagster_home, **extra_env)
    return home, dagster_home, env


def driver_command(select: list[str], partitions: list[str] | None = None,
                   then: list[tuple[list[str], list[str] | None]] = ()) -> list[str]:
    batches = [{"select": select, "partitions": partitions}]
    batches += [{"select": sel, "partitions": parts} for sel, parts in then]
    return [sys.executable, "-c", DRIVER, json.dumps(batches)]


def parse_driver(output: str) -> list[dict]:
    for line in output.splitlines():
        if line.startswith("DRIVER_RESULT "):
            return json.loads(line.removeprefix("DRIVER_RESULT "))
    raise AssertionError(f"the run driver printed no result; output tail:\n{output[-4000:]}")


def materialize(env: dict[str, str], select: list[str], partitions: list[str] | None = None,
                timeout: float = 240, then: list[tuple[list[str], list[str] | None]] = ()) -> tuple[list[dict], str]:
    """Materialise `select` (one run per partition), then each `then` batch, in one subprocess."""
    proc = subprocess.run(driver_command(select, partitions, then), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    return parse_driver(output), output


def step_failure_messages(instance, run_id: str) -> list[str]:
    """Error text of every failed step of a run (message plus the error's own message)."""
    texts = []
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None and event.is_step_failure:
            error = event.step_failure_data.error
            texts.append(f"{event.message}\n{error.to_string() if error else ''}")
    return texts


ROW_CHAIN = ["core/s2l2a/shards", "fragments/grid_224px", "embeddings/dinov2_rgb"]

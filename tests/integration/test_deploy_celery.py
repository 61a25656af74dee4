"""Distributed execution: a real dagster-celery worker runs the steps of real runs.

The worker listens on a default (I/O) queue and a GPU queue, both named uniquely per test run so
other users of the machine's RabbitMQ never see these tasks. Runs and worker share a Postgres
instance built from deploy/dagster.postgres.yaml and one storage root, as in production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from deploy_support import (
    REPO,
    ROW_CHAIN,
    ensure_service,
    materialize,
    postgres_database,
    postgres_instance_home,
    project_env,
    synthetic_rows,
)

from majortom_assets import geoparquet
from majortom_assets.fragment import fragment_layout

pytestmark = [pytest.mark.services, pytest.mark.slow]

ROWS = ["1U", "2U", "3U"]
BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"


def _ppid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..." -- comm may hold spaces, so split after ')'
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = _ppid(pid)
        except (FileNotFoundError, ProcessLookupError):
            return False
    return False


def _wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; worker log tail:\n{log.read_text()[-3000:]}")


def test_row_partitions_run_in_a_celery_worker_on_their_queues(tmp_path, monkeypatch):
    ensure_service("postgres")
    ensure_service("rabbitmq")
    tag = uuid.uuid4().hex[:8]
    io_queue, gpu_queue, worker_name = f"mt-{tag}-io", f"mt-{tag}-gpu", f"majortom-test-{tag}"
    home = tmp_path / "home"
    synthetic_rows(home, ROWS, cells_per_row=2, seed=11)

    with postgres_database() as db:
        pg_env = postgres_instance_home(tmp_path / "dagster_home", db)
        env = project_env(home, tmp_path / "dagster_home", **pg_env, MAJORTOM_EXECUTOR="celery",
                          MAJORTOM_CELERY_BROKER=BROKER, MAJORTOM_CELERY_BACKEND="rpc://",
                          MAJORTOM_CELERY_QUEUE=io_queue, MAJORTOM_CELERY_GPU_QUEUE=gpu_queue)
        for key, value in pg_env.items():  # this process reads the same instance afterwards
            monkeypatch.setenv(key, value)

        log = tmp_path / "worker.log"
        step_pids: set[int] = set()
        with log.open("w") as out:
            worker = subprocess.Popen(
                ["dagster-celery", "worker", "start", "-A", "dagster_celery.app",
                 "-y", str(REPO / "deploy" / "dagster.celery.yaml"), "-q", f"{io_queue},{gpu_queue}",
                 "-n", worker_name, "--", "--concurrency=2"],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            _wait_for(lambda: " ready." in log.read_text(), 90, "the worker to be ready", log)
            assert gpu_queue in log.read_text() and io_queue in log.read_text()

            runs, output = materialize(env, ["core/s2l2a/metadata"], then=[(ROW_CHAIN, ROWS)])
            assert [r["success"] for r in runs] == [True] * 4, output[-5000:]
            results, rows = runs[:1], runs[1:]

            # every row's embeddings exist and verify: 2 cells x 4 fragments (384 px, 224 px fragments)
            per_sample = fragment_layout(384, 384, 224, 0.1).count
            for row in ROWS:
                path = home / "embeddings" / "dinov2-rgb" / f"row={row}" / "embeddings.parquet"
                report = geoparquet.verify_file(path)
                assert report.ok and report.rows == 2 * per_sample, (row, report)

            from dagster import DagsterEventType, DagsterInstance

            with DagsterInstance.from_config(pg_env["DAGSTER_HOME"]) as instance:
                for run in results + rows:
                    records = instance.all_logs(run["run_id"])
                    events = [r.dagster_event for r in records if r.dagster_event is not None]
                    orchestrator = {e.pid for e in events if e.event_type == DagsterEventType.RUN_START}
                    starts = [e for e in events if e.event_type == DagsterEventType.STEP_START]
                    assert starts, f"run {run['run_id']} started no step"
                    step_pids.update(e.pid for e in starts)
                    for event in starts:
                        # the step ran in a process of our worker, not in the run's own process
                        assert event.pid not in orchestrator
                        assert _descends_from(event.pid, worker.pid), (event.step_key, event.pid)
                    submitted = {
                        e.step_key: e.message for e in events
                        if e.event_type == DagsterEventType.ENGINE_EVENT and "Submitting celery task" in e.message
                    }
                    for step_key, message in submitted.items():
                        queue = gpu_queue if step_key.startswith("embeddings") else io_queue
                        assert f'to queue "{queue}"' in message, message
                    executed = [e for e in events if e.event_type == DagsterEventType.ENGINE_EVENT
                                and "in celery worker" in e.message]
                    assert len(executed) == len(starts)
                    for event in executed:  # the worker that took the task is ours, by name
                        worker_meta = event.engine_event_data.metadata["Celery worker"]
                        assert str(worker_meta.value).startswith(f"{worker_name}@"), worker_meta
                    # the broker password reaches the run only through the environment
                    stored = instance.get_run_by_id(run["run_id"])
                    assert "guest:guest" not in str(stored.run_config)
                    assert not any("guest:guest" in (r.user_message or "") for r in records)
                embedding_steps = [
                    e for r in rows for e in instance.all_logs(r["run_id"])
                    if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_SUCCESS
                    and e.step_key.startswith("embeddings")
                ]
                assert len(embedding_steps) == len(ROWS)
        finally:
            _stop_worker(worker, worker_name, log)
        assert worker.returncode == 0, log.read_text()[-3000:]
        assert "Got shutdown from remote" in log.read_text()
        # the pool processes that ran the steps are gone with it
        assert not [pid for pid in step_pids if Path(f"/proc/{pid}").exists()], step_pids


def _stop_worker(worker: subprocess.Popen, name: str, log: Path) -> None:
    """Ask the worker to shut down through the broker (a clean, warm shutdown); kill only as a fallback."""
    if worker.poll() is not None:
        return
    from celery import Celery

    app = Celery(broker=BROKER)
    try:
        app.control.shutdown(destination=[f"{name}@{os.uname().nodename}"])
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=15)
    finally:
        app.close()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

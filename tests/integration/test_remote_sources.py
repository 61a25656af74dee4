"""Collections behind URLs: credentials are used but never shown or stored; a stalled server ends.

Before the fix, `http://user:password@host/x` reached every output file's `source_collection`,
error messages, the Dagster event log and asset metadata; a server that accepted connections and
never answered hung `majortom embed` until it was killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from http_fixtures import serve_directory, stalling_server

from majortom_assets.remote import RemoteTimeoutError, call_with_retries, redact_text, redact_url

SECRET = "s3cretPW"
REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"


@pytest.mark.parametrize("url, expected", [
    ("http://alice:pw@host:8080/core?x=1", "http://***@host:8080/core?x=1"),
    ("https://token@host/core", "https://***@host/core"),
    ("s3://bucket/core?X-Amz-Signature=abc&X-Amz-Date=1&region=eu", "s3://bucket/core?X-Amz-Signature=***&X-Amz-Date=***&region=eu"),
    ("https://h/f.parquet?sig=abc&sv=2020&token=t", "https://h/f.parquet?sig=***&sv=2020&token=***"),
    ("hf://datasets/Major-TOM/Core-S2L1C", "hf://datasets/Major-TOM/Core-S2L1C"),
    ("/data/collections/Core-S2L1C", "/data/collections/Core-S2L1C"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_text_finds_urls_in_messages():
    msg = "ClientResponseError: 500, url=URL('http://alice:pw@h:1/images/a.parquet?token=zz') failed"
    out = redact_text(msg)
    assert "pw" not in out.replace("***", "") and "zz" not in out and "http://***@h:1/images/a.parquet" in out


def test_retries_are_bounded_and_name_the_redacted_url(monkeypatch):
    monkeypatch.setenv("MAJORTOM_REMOTE_ATTEMPTS", "3")
    calls = []

    def stalled():
        calls.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(RemoteTimeoutError, match=r"http://\*\*\*@h/x: read timed out 3 times"):
        call_with_retries(stalled, "http://u:p@h/x", backoff_s=0)
    assert len(calls) == 3
    with pytest.raises(FileNotFoundError):   # not a timeout: no retry
        call_with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "http://h/x", backoff_s=0)


def _no_secret_under(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and SECRET.encode() in path.read_bytes():
                found.append(str(path))
    return found


def _embed(url: str, out: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "majortom_assets.cli", "embed", "--collection", url, "--model", "ssl4eo-s2",
         "--weights", "random", "--tiny", "--limit", "2", "--out", str(out), "--no-progress"],
        check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_cli_over_http_uses_credentials_and_stores_none(s2l1c_collection, tmp_path):
    with serve_directory(s2l1c_collection, "alice", SECRET) as port:
        url = f"http://alice:{SECRET}@127.0.0.1:{port}"
        proc = _embed(url, tmp_path / "out")
        assert proc.returncode == 0, proc.stderr
        assert SECRET not in proc.stdout + proc.stderr
        files = list((tmp_path / "out").rglob("embeddings.parquet"))
        assert files and pq.read_metadata(files[0]).num_rows > 0
        meta = pq.read_metadata(files[0]).metadata
        assert f"http://***@127.0.0.1:{port}".encode() in meta[b"majortom"]
        assert not _no_secret_under(tmp_path / "out")

        wrong = _embed(f"http://alice:wrong@127.0.0.1:{port}", tmp_path / "wrong")
        assert wrong.returncode == 2 and "wrong" not in wrong.stderr.replace("--", "")
        assert "http://***@127.0.0.1" in wrong.stderr


def test_cli_failing_shards_report_without_secret(s2l1c_collection, tmp_path):
    with serve_directory(s2l1c_collection, "alice", SECRET, fail_prefix="images/") as port:
        proc = _embed(f"http://alice:{SECRET}@127.0.0.1:{port}", tmp_path / "out")
    assert proc.returncode == 1 and "skipped 2 sample(s)" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr and "http://***@127.0.0.1" in proc.stdout
    assert not _no_secret_under(tmp_path / "out")


def test_cli_stalled_server_ends_with_a_named_error(tmp_path):
    env = {"MAJORTOM_CONNECT_TIMEOUT_S": "1", "MAJORTOM_READ_TIMEOUT_S": "1", "MAJORTOM_REMOTE_ATTEMPTS": "2"}
    with stalling_server() as port:
        started = time.monotonic()
        proc = _embed(f"http://alice:{SECRET}@127.0.0.1:{port}/Core-S2L1C", tmp_path / "out", env=env, timeout=120)
        elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert f"http://***@127.0.0.1:{port}/Core-S2L1C" in proc.stderr and "timed out 2 times" in proc.stderr
    assert SECRET not in proc.stderr and elapsed < 60


@pytest.mark.slow
def test_dagster_metadata_asset_keeps_credentials_out_of_the_instance(s2l1c_collection, tmp_path):
    home, dagster_home = tmp_path / "data", tmp_path / "dagster_home"
    dagster_home.mkdir()
    with serve_directory(s2l1c_collection, "alice", SECRET) as port:
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "MAJORTOM_HOME": str(home),
               "MAJORTOM_MODELS": "ssl4eo-s2",
               "MAJORTOM_COLLECTION_S2L1C": f"http://alice:{SECRET}@127.0.0.1:{port}"}
        proc = subprocess.run(check=False, args=[str(BIN / "dagster"), "asset", "materialize", "-m", "majortom_assets",
                               "--select", "core/s2l1c/metadata"], capture_output=True, text=True,
                              timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stdout + proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert (home / "shards" / "S2L1C" / "selection.parquet").is_file()
    assert not _no_secret_under(dagster_home, home)

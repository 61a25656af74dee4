"""`majortom sql` only reads: the attacks of issue 11 ("can write and read anything") are refused.

Each case ran before the fix and did damage (overwrote an embeddings file, wrote a CSV, created a
database file, read a system file, reached for the network) or crashed with
`'NoneType' object has no attribute 'df'`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from majortom_assets.cli import main
from majortom_assets.vectors import testdata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return testdata.write_synthetic(tmp_path_factory.mktemp("sqlro"), "m1", cells=testdata.cells_in_rows([5], 3),
                                    dim=8, seed=2)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.mark.parametrize("query, refused", [
    ("COPY (SELECT 1 AS x) TO '{victim}' (FORMAT parquet)", "COPY"),
    ("COPY (SELECT 1 AS x) TO '{root}/leak.csv'", "COPY"),
    ("ATTACH '{root}/new.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("DROP VIEW m1", "DROP"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("SET enable_external_access = true", "SET"),
    ("SELECT 1; COPY (SELECT 1) TO '{root}/second.csv'", "COPY"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/explained.csv'", "COPY"),
    ("CALL pragma_version()", "CALL"),
])
def test_writes_attaches_installs_and_settings_are_refused(data, capsys, query, refused):
    victim = data.paths[0]
    before = _digest(data.paths)
    listing = sorted(p.relative_to(data.root) for p in data.root.rglob("*"))
    code, out, err = _run(capsys, "sql", "--root", data.root, query.format(victim=victim, root=data.root))
    assert code == 2, (out, err)
    assert f"{refused} statements are not allowed" in err and "only reads" in err
    assert "Traceback" not in err and "NoneType" not in err
    assert _digest(data.paths) == before
    assert sorted(p.relative_to(data.root) for p in data.root.rglob("*")) == listing


def test_files_outside_the_root_cannot_be_read(data, capsys, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    for query in (f"SELECT * FROM read_text('{secret}')", "SELECT * FROM read_text('/etc/hostname')",
                  "SELECT * FROM read_csv('https://example.invalid/x.csv')"):
        code, out, err = _run(capsys, "sql", "--root", data.root, query)
        assert code == 2 and "password" not in out
        assert "disabled by config" in err or "not allowed" in err, err


def test_reads_still_work_and_describe_explain_are_reads(data, capsys):
    code, out, _ = _run(capsys, "sql", "--root", data.root, "SELECT count(*) AS n FROM m1", "--format", "csv")
    assert code == 0 and out.split() == ["n", str(3 * 25)]
    code, out, _ = _run(capsys, "sql", "--root", data.root, "DESCRIBE m1")
    assert code == 0 and "embedding" in out
    code, out, _ = _run(capsys, "sql", "--root", data.root, "EXPLAIN SELECT grid_cell FROM m1")
    assert code == 0 and "READ_PARQUET" in out.upper() or "PARQUET" in out.upper()


def test_subprocess_copy_is_refused_without_traceback(data):
    before = _digest(data.paths)
    proc = subprocess.run(check=False, args=[sys.executable, "-m", "majortom_assets.cli", "sql", "--root", str(data.root),
                           f"COPY m1 TO '{data.paths[0]}'"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "COPY statements are not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _digest(data.paths) == before

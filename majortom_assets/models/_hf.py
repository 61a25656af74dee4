"""Shared builder for the Hugging Face vision towers (DINOv2, SigLIP).

Pretrained weights resolve through the normal HF cache (HF_HOME / HF_HUB_CACHE) and honour
HF_HUB_OFFLINE; a folder is anything `from_pretrained` accepts; a file is a plain state dict of
the model class, loaded strictly into a model built from the hard-coded config (no download).
Random weights are built from that config as well, so they never touch the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from majortom_assets.models.base import (
    BuiltModel,
    WeightsUnavailableError,
    identity_for,
    load_weights_file,
    offline,
    random_weights_name,
    refuse_tiny_pretrained,
    seeded,
    weights_kind,
)
from majortom_assets.models.spec import ModelSpec


def build_hf(
    spec: ModelSpec,
    weights: str | os.PathLike[str],
    *,
    model_class: Any,
    config_class: Any,
    full_config: dict[str, Any],
    tiny_config: dict[str, Any],
    head: Callable[[nn.Module], nn.Module],
    tiny: bool,
    seed: int,
) -> BuiltModel:
    """Build `head(backbone)`, where the head turns the HF output into a (B, dim) tensor."""
    kind = weights_kind(weights)
    config_values = tiny_config if tiny else full_config
    arch = f"{model_class.__name__}({'tiny' if tiny else spec.default_weights} config)"
    refuse_tiny_pretrained(kind, tiny)
    if kind == "pretrained":
        backbone = _from_pretrained(model_class, spec.default_weights)
        name, random, source = spec.default_weights, False, f"hf://{spec.default_weights}"
    elif kind == "folder":
        path = Path(weights).resolve()
        backbone = _from_pretrained(model_class, str(path))
        name, random, source = path.name, False, str(path)
    else:
        with seeded(seed):
            backbone = model_class(config_class(**config_values))
        if kind == "random":
            name, random, source = random_weights_name(tiny, seed), True, f"{arch}, seeded init"
        else:
            path = load_weights_file(backbone, weights)
            name, random, source = path.name, False, str(path)
    backbone = backbone.to(torch.float32).eval()
    identity = identity_for(backbone, name=name, random=random, source=source)
    return BuiltModel(module=head(backbone), weights=identity, embedding_dim=int(backbone.config.hidden_size))


def _from_pretrained(model_class: Any, id_or_path: str) -> nn.Module:
    local_only = offline()
    try:
        return model_class.from_pretrained(id_or_path, dtype=torch.float32, local_files_only=local_only)
    except OSError as exc:
        hub = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise WeightsUnavailableError(
            f"could not load {model_class.__name__} weights {id_or_path!r} "
            f"({'offline, ' if local_only else ''}HF cache under {hub}): {exc}. On a connected machine run "
            f"`hf download {id_or_path}` and copy the cache, or pass --weights /path/to/model-folder."
        ) from exc

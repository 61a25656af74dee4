"""SSL4EO-S12 ResNet-50 (torchgeo weights) for Sentinel-2 L1C and Sentinel-1 RTC.

The model is timm's resnet50 with `in_chans` from the torchgeo weights' meta and the classifier
replaced by identity, so the output is the 2048-d globally pooled feature vector. Pretrained
weights come from torchgeo's pinned URL through the torch hub cache (``$TORCH_HOME/hub/checkpoints``);
a local file is a plain timm resnet50 state dict (``.pth``/``.pt`` via ``torch.load(weights_only=True)``
or ``.safetensors``), e.g. the very file torchgeo downloads.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from majortom_assets.models.base import (
    BuiltModel,
    WeightsUnavailableError,
    identity_for,
    load_strict,
    load_weights_file,
    offline,
    random_weights_name,
    refuse_tiny_pretrained,
    seeded,
    weights_kind,
)
from majortom_assets.models.spec import ModelSpec

# The classifier is dropped (num_classes=0), so its keys may be absent from or extra in a file.
CLASSIFIER_KEYS = frozenset({"fc.weight", "fc.bias"})

# Tiny stand-in for tests and demos: the same timm ResNet/Bottleneck classes, one block per stage
# and 1/8 of the width, so its embedding has 64 * 4 = 256 dimensions instead of 2048. Its stem is
# timm's deep stem (3 convs, 8-8-16 channels) whose first conv is an 8x8 stride-8 patchify: the
# 224 px fragment is 28 px after one conv (every pixel still seen), so the network costs ~5 M
# multiply-adds per fragment instead of the ~600 M of a 7x7 stride-2 stem, which at 13 bands and
# 112 px (timm's default stem is 64 channels wide whatever `stem_width`) was 0.5 s of CPU per cell.
# See docs/benchmarks.md ("Tiny models").
TINY_LAYERS = (1, 1, 1, 1)
TINY_CHANNELS = (8, 16, 32, 64)
TINY_STEM_WIDTH = 8
TINY_STEM_PATCH = 8
TINY_ARCHITECTURE = "tiny resnet (bottleneck, 1 block/stage, widths 8-64, deep stem with 8x8/8 patchify)"


def torchgeo_weights(spec: ModelSpec):
    """The torchgeo weights enum member named by the spec, checked against the spec."""
    from torchgeo.models import ResNet50_Weights

    enum_name, _, member = spec.default_weights.partition(".")
    if enum_name != "ResNet50_Weights" or member not in ResNet50_Weights.__members__:
        raise ValueError(f"model {spec.name}: {spec.default_weights!r} is not a torchgeo ResNet50_Weights member")
    weights = ResNet50_Weights[member]
    # torchgeo's own meta has had wrong entries; refuse weights that do not fit the spec.
    if weights.meta.get("model") != "resnet50" or weights.meta.get("in_chans") != spec.in_channels:
        raise ValueError(
            f"model {spec.name}: torchgeo weights {spec.default_weights} describe model "
            f"{weights.meta.get('model')!r} with {weights.meta.get('in_chans')} channels, expected resnet50 "
            f"with {spec.in_channels} ({list(spec.bands)})"
        )
    return weights


def _resnet(in_chans: int, tiny: bool) -> nn.Module:
    if tiny:
        module = ResNet(
            block=Bottleneck, layers=TINY_LAYERS, channels=TINY_CHANNELS, stem_type="deep",
            stem_width=TINY_STEM_WIDTH, in_chans=in_chans, num_classes=0,
        )
        module.conv1[0] = nn.Conv2d(in_chans, TINY_STEM_WIDTH, kernel_size=TINY_STEM_PATCH, stride=TINY_STEM_PATCH,
                                    bias=False)
        return module
    return timm.create_model("resnet50", in_chans=in_chans, num_classes=0, pretrained=False)


def _pretrained_state(spec: ModelSpec) -> tuple[dict[str, torch.Tensor], str]:
    weights = torchgeo_weights(spec)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    help_text = (
        f"Pre-seed the torch hub cache by placing the file {weights.url} at {cached} "
        f"(set TORCH_HOME to move the cache), or pass --weights /path/to/{cached.name}."
    )
    if not cached.is_file() and offline():
        raise WeightsUnavailableError(f"{spec.default_weights} is not cached and offline mode is set. {help_text}")
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, HTTPError, OSError, hash mismatch...
        raise WeightsUnavailableError(
            f"could not load torchgeo weights {spec.default_weights} ({exc.__class__.__name__}: {exc}). {help_text}"
        ) from exc
    return state, weights.url


def build(spec: ModelSpec, weights: str, *, tiny: bool = False, seed: int = 0) -> BuiltModel:
    kind = weights_kind(weights)
    if kind == "folder":
        raise ValueError(f"model {spec.name} needs a weights file (.pth/.pt/.safetensors), got folder {weights}")
    refuse_tiny_pretrained(kind, tiny)
    with seeded(seed):
        module = _resnet(spec.in_channels, tiny)
    arch = TINY_ARCHITECTURE if tiny else "timm resnet50"
    if kind == "random":
        name = random_weights_name(tiny, seed)
        identity = identity_for(module, name=name, random=True, source=f"{arch}, seeded init")
    elif kind == "pretrained":
        state, url = _pretrained_state(spec)
        load_strict(module, state, origin=url, ignorable=CLASSIFIER_KEYS)
        identity = identity_for(module, name=spec.default_weights, random=False, source=url)
    else:
        path = load_weights_file(module, weights, ignorable=CLASSIFIER_KEYS)
        identity = identity_for(module, name=path.name, random=False, source=str(path))
    return BuiltModel(
        module=module.eval(), weights=identity, embedding_dim=int(module.num_features), prefers_channels_last=True
    )

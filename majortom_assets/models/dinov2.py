"""DINOv2 ViT-B/14 (facebook/dinov2-base) on true-colour Sentinel-2 L2A fragments.

The embedding is the mean of the last hidden state over all tokens (CLS + patches), as the Major
TOM DINOv2 release defines it. The checkpoint's position embeddings are for 518 px; HF's Dinov2
interpolates them to the 224 px fragment (16 x 16 patches) on every forward.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from majortom_assets.models._hf import build_hf
from majortom_assets.models.base import BuiltModel
from majortom_assets.models.spec import ModelSpec

# config.json of facebook/dinov2-base, so random weights need no download.
DINOV2_BASE_CONFIG = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}

# Same classes and patch size (so the same 257 tokens per 224 px fragment and the same position
# embedding interpolation from 518 px), 2 layers of width 32: embedding dim 32 (tests and demos
# only; ~0.02 s of CPU per cell, docs/benchmarks.md "Tiny models").
DINOV2_TINY_CONFIG = {**DINOV2_BASE_CONFIG, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


class MeanTokenEmbedding(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).last_hidden_state.mean(dim=1)


def build(spec: ModelSpec, weights: str | os.PathLike[str], *, tiny: bool = False, seed: int = 0) -> BuiltModel:
    return build_hf(
        spec, weights, model_class=Dinov2Model, config_class=Dinov2Config, full_config=DINOV2_BASE_CONFIG,
        tiny_config=DINOV2_TINY_CONFIG, head=MeanTokenEmbedding, tiny=tiny, seed=seed,
    )

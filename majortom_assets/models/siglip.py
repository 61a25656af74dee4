"""SigLIP SO400M patch14-384 vision tower on true-colour Sentinel-2 L2A fragments.

The embedding is the vision model's `pooler_output`: the multihead-attention-pooling (MAP) head
applied to the last hidden state. This is what `SiglipModel.get_image_features` returns and what
open_clip's `encode_image` gives for the same checkpoint (SigLIP has no extra projection).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from majortom_assets.models._hf import build_hf
from majortom_assets.models.base import BuiltModel
from majortom_assets.models.spec import ModelSpec

# vision_config of google/siglip-so400m-patch14-384, so random weights need no download.
SIGLIP_SO400M_CONFIG = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
    "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": True,
}

# Same classes and patch size (729 tokens per 384 px fragment, MAP head), 2 layers of width 32:
# embedding dim 32 (tests and demos only; docs/benchmarks.md "Tiny models").
SIGLIP_TINY_CONFIG = {
    **SIGLIP_SO400M_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


class PooledEmbedding(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).pooler_output


def build(spec: ModelSpec, weights: str | os.PathLike[str], *, tiny: bool = False, seed: int = 0) -> BuiltModel:
    return build_hf(
        spec, weights, model_class=SiglipVisionModel, config_class=SiglipVisionConfig,
        full_config=SIGLIP_SO400M_CONFIG, tiny_config=SIGLIP_TINY_CONFIG, head=PooledEmbedding, tiny=tiny,
        seed=seed,
    )

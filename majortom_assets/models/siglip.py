"""SigLIP SO400M patch14-384 vision tower on true-colour Sentinel-2 L2A fragments.

The embedding is the vision model's `pooler_output`: the multihead-attention-pooling (MAP) head
applied to the last hidden state. This is what `SiglipModel.get_image_features` returns and what
open_clip's `encode_image` gives for the same checkpoint (SigLIP has no extra projection).
"""

from __future__ import annotations

import os
from pathlib import Path

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


# ------------------------------------------------------------------------------ text tower
# text_config of google/siglip-so400m-patch14-384 (random text weights need no download).
SIGLIP_SO400M_TEXT_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "max_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}

# Width taken from SIGLIP_TINY_CONFIG, so tiny text and image embeddings share one space.
SIGLIP_TINY_TEXT_CONFIG = {
    **SIGLIP_SO400M_TEXT_CONFIG, "hidden_size": SIGLIP_TINY_CONFIG["hidden_size"],
    "intermediate_size": SIGLIP_TINY_CONFIG["intermediate_size"], "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 16,
}


class TextTower(nn.Module):
    """SigLIP's text tower: token ids (B, L) -> (B, dim) `pooler_output` (the text head's output).

    This is `SiglipModel.get_text_features`: in SigLIP's shared space it is compared with the
    image tower's `pooler_output` (what the embedding files store) by cosine similarity.
    """

    def __init__(self, text_model: nn.Module, max_length: int) -> None:
        super().__init__()
        self.text_model = text_model
        self.max_length = max_length

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids).pooler_output


def build_text(weights: str | os.PathLike[str], *, default_weights: str, tiny: bool = False, seed: int = 0):
    """(TextTower, text WeightsIdentity, sha256 of the same checkpoint's vision tower or None).

    "pretrained" / a folder load the full `SiglipModel` with `from_pretrained`, so text and image
    towers come from one checkpoint and the vision tower's sha256 (computed exactly as the image
    embedder computes it) can be checked against the embedding files. "random" builds a seeded text
    tower; the caller derives the vision sha from the seeded image embedder.
    """
    from transformers import SiglipModel, SiglipTextConfig, SiglipTextModel

    from majortom_assets.models._hf import _from_pretrained
    from majortom_assets.models.base import (
        identity_for,
        random_weights_name,
        refuse_tiny_pretrained,
        seeded,
        state_dict_sha256,
        weights_kind,
    )

    kind = weights_kind(weights)
    refuse_tiny_pretrained(kind, tiny)
    if kind == "file":
        raise ValueError(f"SigLIP text queries need a checkpoint folder (config, weights and tokenizer), "
                         f"got the file {weights}")
    if kind == "random":
        with seeded(seed):
            text = SiglipTextModel(SiglipTextConfig(**(SIGLIP_TINY_TEXT_CONFIG if tiny else SIGLIP_SO400M_TEXT_CONFIG)))
        text = text.to(torch.float32).eval()
        identity = identity_for(text, name=random_weights_name(tiny, seed), random=True,
                                source="SiglipTextModel, seeded init")
        return TextTower(text, int(text.config.max_position_embeddings)), identity, None
    source = default_weights if kind == "pretrained" else str(Path(weights).resolve())
    full = _from_pretrained(SiglipModel, source).to(torch.float32).eval()
    vision_sha = state_dict_sha256(full.vision_model.state_dict())
    name = default_weights if kind == "pretrained" else Path(source).name
    identity = identity_for(full.text_model, name=name, random=False,
                            source=f"hf://{source}" if kind == "pretrained" else source)
    max_length = int(full.config.text_config.max_position_embeddings)
    return TextTower(full.text_model, max_length), identity, vision_sha

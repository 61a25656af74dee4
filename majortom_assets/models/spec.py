"""Typed registry of the embedding models of the Major TOM standard (STANDARD.md §4, Table 1).

A model is one `ModelSpec` entry plus one builder module. The spec names its builder as
``"module:function"`` and the builder is imported only when the model is loaded, so adding a model
(DeCUR, MMEarth, ...) means adding one entry here and one small module beside this file; nothing
else changes. Builders have the signature::

    build(spec, weights, *, tiny, seed) -> BuiltModel
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from majortom_assets.standard import RGB_BANDS, S1RTC_BANDS, S2L1C_BANDS, Source

#: Names of the input normalisations (`normalise.NORMALISERS` implements each; it checks that the
#: two agree). Listed here so the registry loads without torch: the Dagster code location reads
#: the specs at load time and would otherwise pay for importing torch.
NORMALISATIONS: tuple[str, ...] = ("s2-reflectance", "s1-db-minmax", "rgb-siglip", "rgb-imagenet")


class ModelSpec(BaseModel):
    """What the engine needs to know about a model before it is built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    source: Source
    bands: tuple[str, ...] = Field(min_length=1)
    fragment_size: int = Field(gt=0)
    target_overlap: float = Field(default=0.1, ge=0.0, lt=1.0)
    embedding_dim: int = Field(gt=0)
    normalisation: str
    default_weights: str
    builder: str = Field(pattern=r"^[\w.]+:\w+$")
    description: str = ""

    @field_validator("normalisation")
    @classmethod
    def _known_normalisation(cls, value: str) -> str:
        if value not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {value!r}; known: {sorted(NORMALISATIONS)}")
        return value

    @model_validator(mode="after")
    def _bands_unique(self) -> ModelSpec:
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"model {self.name!r}: duplicate band in {self.bands}")
        return self

    @property
    def in_channels(self) -> int:
        return len(self.bands)


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="ssl4eo-s2",
            source="S2L1C",
            bands=S2L1C_BANDS,
            fragment_size=224,
            embedding_dim=2048,
            normalisation="s2-reflectance",
            default_weights="ResNet50_Weights.SENTINEL2_ALL_DINO",
            builder="majortom_assets.models.ssl4eo:build",
            description="SSL4EO-S12 ResNet-50 (DINO) on 13 Sentinel-2 L1C bands; pooled features, fc removed.",
        ),
        ModelSpec(
            name="ssl4eo-s1",
            source="S1RTC",
            bands=S1RTC_BANDS,
            fragment_size=224,
            embedding_dim=2048,
            normalisation="s1-db-minmax",
            default_weights="ResNet50_Weights.SENTINEL1_ALL_MOCO",
            builder="majortom_assets.models.ssl4eo:build",
            description="SSL4EO-S12 ResNet-50 (MoCo) on Sentinel-1 RTC VV/VH in dB; pooled features.",
        ),
        ModelSpec(
            name="siglip-rgb",
            source="S2L2A",
            bands=RGB_BANDS,
            fragment_size=384,
            embedding_dim=1152,
            normalisation="rgb-siglip",
            default_weights="google/siglip-so400m-patch14-384",
            builder="majortom_assets.models.siglip:build",
            description="SigLIP SO400M patch14-384 vision tower on Sentinel-2 L2A true colour; MAP-head image embedding.",
        ),
        ModelSpec(
            name="dinov2-rgb",
            source="S2L2A",
            bands=RGB_BANDS,
            fragment_size=224,
            embedding_dim=768,
            normalisation="rgb-imagenet",
            default_weights="facebook/dinov2-base",
            builder="majortom_assets.models.dinov2:build",
            description="DINOv2 ViT-B/14 on Sentinel-2 L2A true colour; mean of the last hidden state over all tokens.",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name; the error lists the names that exist."""
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODEL_SPECS))}") from None

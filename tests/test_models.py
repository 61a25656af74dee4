"""Model registry, normalisation (checked against hand-computed values) and weights handling."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from majortom_assets.models import (
    MODEL_SPECS,
    WeightsUnavailableError,
    find_invalid_values,
    get_spec,
    load_embedder,
    load_state_file,
    state_dict_sha256,
)
from majortom_assets.models import normalise as N
from majortom_assets.models.spec import ModelSpec


def _const(values_per_channel, size=4, dtype=torch.uint16):
    """(1, C, size, size) tensor whose channel c holds values_per_channel[c] everywhere."""
    data = torch.tensor(values_per_channel, dtype=torch.float64).view(1, -1, 1, 1).expand(1, -1, size, size)
    return data.to(dtype).contiguous()


# ---------------------------------------------------------------- registry


def test_registry_matches_table_1():
    expected = {
        "ssl4eo-s2": ("S2L1C", 224, 2048, 13),
        "ssl4eo-s1": ("S1RTC", 224, 2048, 2),
        "siglip-rgb": ("S2L2A", 384, 1152, 3),
        "dinov2-rgb": ("S2L2A", 224, 768, 3),
    }
    assert set(MODEL_SPECS) == set(expected)
    for name, (source, size, dim, channels) in expected.items():
        spec = get_spec(name)
        assert (spec.source, spec.fragment_size, spec.embedding_dim, spec.in_channels) == (source, size, dim, channels)
        assert spec.target_overlap == 0.1
    assert get_spec("ssl4eo-s2").bands == (
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
    )
    assert get_spec("ssl4eo-s1").bands == ("vv", "vh")
    assert get_spec("siglip-rgb").bands == get_spec("dinov2-rgb").bands == ("B04", "B03", "B02")


def test_unknown_model_and_normalisation_are_clear_errors():
    with pytest.raises(ValueError, match="known models: dinov2-rgb, siglip-rgb, ssl4eo-s1, ssl4eo-s2"):
        get_spec("resnet")
    with pytest.raises(ValueError, match="unknown normalisation"):
        ModelSpec(name="x", source="S2L2A", bands=("B04",), fragment_size=8, embedding_dim=4,
                  normalisation="div255", default_weights="w", builder="m:build")


def test_torchgeo_weights_meta_fits_specs():
    from majortom_assets.models.ssl4eo import torchgeo_weights

    for name in ("ssl4eo-s2", "ssl4eo-s1"):
        weights = torchgeo_weights(get_spec(name))
        assert weights.meta["in_chans"] == get_spec(name).in_channels
        assert weights.meta["model"] == "resnet50"


# ---------------------------------------------------------------- normalisation by hand


def test_s2_reflectance_divides_by_1e4_without_clipping():
    out = N.s2_reflectance(_const([0, 1000, 10000, 65535]))
    assert out.dtype == torch.float32
    expected = torch.tensor([0.0, 0.1, 1.0, 6.5535]).view(1, 4, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def _s1_by_hand(x: float, mean: float, std: float) -> float:
    linear = 1e-10 if (math.isnan(x) or x < 1e-10) else x
    db = 10.0 * math.log10(linear)
    return min(1.0, max(0.0, (db - (mean - 2 * std)) / (4 * std)))


@pytest.mark.parametrize("vv,vh", [(0.01, 0.001), (0.05, 0.02), (1.0, 0.5), (1e-4, 1e-5), (0.0, -0.3),
                                   (float("nan"), 0.003)])
def test_s1_db_minmax_matches_hand_computation(vv, vh):
    out = N.s1_db_minmax(_const([vv, vh], dtype=torch.float32))
    expected_vv = _s1_by_hand(vv, -12.548, 5.257)
    expected_vh = _s1_by_hand(vh, -20.192, 5.912)
    assert torch.isfinite(out).all()
    assert out[0, 0, 0, 0].item() == pytest.approx(expected_vv, abs=2e-6)
    assert out[0, 1, 0, 0].item() == pytest.approx(expected_vh, abs=2e-6)


def test_s1_db_values_inside_the_range_are_not_clipped():
    # 0.05 linear = -13.0103 dB: vv (-13.0103 + 23.062) / 21.028 = 0.47802...
    out = N.s1_db_minmax(_const([0.05, 0.05], dtype=torch.float32))
    assert out[0, 0, 0, 0].item() == pytest.approx((-13.010299956639812 + 23.062) / 21.028, abs=1e-6)
    assert 0.0 < out[0, 1, 0, 0].item() < 1.0


def test_rgb_siglip_constants_and_clipping():
    out = N.rgb_siglip(_const([1000, 2000, 5000]))
    # 2.5 * 1000 / 1e4 = 0.25 -> (0.25 - 0.5) / 0.5; 0.5 -> 0; 1.25 clipped to 1 -> 1
    assert out[0, :, 0, 0].tolist() == [-0.5, 0.0, 1.0]


def test_rgb_imagenet_exact_value_for_red_1000_no_255_rescale():
    out = N.rgb_imagenet(_const([1000, 1000, 1000]))
    red, green, blue = out[0, :, 0, 0].tolist()
    assert red == pytest.approx((0.25 - 0.485) / 0.229, abs=1e-6)
    assert green == pytest.approx((0.25 - 0.456) / 0.224, abs=1e-6)
    assert blue == pytest.approx((0.25 - 0.406) / 0.225, abs=1e-6)
    double_scaled = (0.25 / 255 - 0.485) / 0.229
    assert abs(red - double_scaled) > 0.5


def test_rgb_clips_to_one_before_normalising():
    out = N.rgb_imagenet(_const([4000, 20000, 65535]))  # 1.0, 5.0, 16.4 -> all clip to 1
    expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    assert out[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_embedder_preprocess_keeps_size_and_rejects_wrong_size():
    embedder = load_embedder("dinov2-rgb", "random", tiny=True)
    raw = torch.randint(0, 4000, (2, 3, 224, 224), dtype=torch.int32).to(torch.uint16)
    x = embedder.preprocess(raw)
    assert x.shape == (2, 3, 224, 224)
    torch.testing.assert_close(x, N.rgb_imagenet(raw))
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        embedder.preprocess(torch.zeros(1, 3, 256, 256, dtype=torch.uint16))
    with pytest.raises(ValueError, match="B04"):
        embedder.preprocess(torch.zeros(1, 4, 224, 224, dtype=torch.uint16))


def test_reference_compatible_dinov2_reproduces_double_scaling_and_crop():
    default = load_embedder("dinov2-rgb", "random", tiny=True)
    reference = load_embedder("dinov2-rgb", "random", tiny=True, reference_compatible=True)
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 4000, (1, 3, 224, 224), generator=generator, dtype=torch.int32).to(torch.uint16)
    ours, theirs = default.preprocess(raw), reference.preprocess(raw)
    assert theirs.shape == ours.shape == (1, 3, 224, 224)
    assert ours.std(dim=(2, 3)).min() > 1.0          # properly scaled: unit-ish variance
    assert theirs.std(dim=(2, 3)).max() < 0.01       # 1/255 twice: a near-constant image
    # the reference crop discards the fragment's border: changing only the outer 10 px is invisible to it
    bordered = raw.clone()
    bordered[..., :10, :] = 0
    bordered[..., -10:, :] = 0
    assert torch.equal(reference.preprocess(bordered), theirs)
    assert not torch.equal(default.preprocess(bordered), ours)
    with pytest.raises(ValueError, match="reference-compatible"):
        load_embedder("siglip-rgb", "random", tiny=True, reference_compatible=True)


def test_find_invalid_values_names_bands():
    good = np.full((2, 8, 8), 0.02, dtype=np.float32)
    assert find_invalid_values(good, "s1-db-minmax", ["vv", "vh"]) is None
    bad = good.copy()
    bad[1, 0, 0] = np.nan
    bad[0, 1, 1] = -0.5
    reason = find_invalid_values(bad, "s1-db-minmax", ["vv", "vh"])
    assert "NaN" in reason and "vh: 1" in reason and "negative" in reason and "vv: 1" in reason
    s2 = np.ones((3, 8, 8), dtype=np.uint16)
    s2[2] = 0
    assert find_invalid_values(s2, "rgb-imagenet", ["B04", "B03", "B02"]) == "only nodata (0) in band(s) B02"


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name,dim", [("ssl4eo-s2", 256), ("ssl4eo-s1", 256), ("siglip-rgb", 32), ("dinov2-rgb", 32)])
def test_tiny_models_shapes_and_determinism(name, dim):
    spec = get_spec(name)
    first = load_embedder(name, "random", tiny=True, seed=0)
    again = load_embedder(name, "random", tiny=True, seed=0)
    other = load_embedder(name, "random", tiny=True, seed=1)
    assert first.embedding_dim == dim
    assert first.weights.random and first.weights.name == "tiny-random(seed=0)"
    assert first.weights.sha256 == again.weights.sha256 != other.weights.sha256
    dtype = torch.float32 if spec.source == "S1RTC" else torch.uint16
    raw = (torch.rand(2, spec.in_channels, spec.fragment_size, spec.fragment_size) * 3000).to(dtype)
    with torch.inference_mode():
        out = first.embed(raw)
        assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(again.embed(raw), out, rtol=0, atol=0)
        assert not torch.allclose(other.embed(raw), out)


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_tiny_models_are_genuinely_small(name):
    """Demos, tests and CLI examples run the tiny configurations on CPU: each must cost a few tens
    of MFLOP per fragment (the 13-band tiny ResNet once cost ~1 GFLOP through its 64-channel 7x7
    stem, 0.67 s of CPU per cell) while keeping the real model class."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = get_spec(name)
    embedder = load_embedder(name, "random", tiny=True)
    x = torch.rand(1, spec.in_channels, spec.fragment_size, spec.fragment_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = embedder.model(x)
    assert out.shape == (1, embedder.embedding_dim)
    assert counter.get_total_flops() < 60e6, f"{name} tiny: {counter.get_total_flops() / 1e6:.0f} MFLOP/fragment"
    assert sum(p.numel() for p in embedder.parameters()) < 300_000
    network = getattr(embedder.model, "backbone", embedder.model)   # the HF towers sit under a pooling head
    assert type(network).__name__ in {"ResNet", "Dinov2Model", "SiglipVisionModel"}
    assert embedder.weights.random   # a tiny model is never mistaken for a trained one


def test_full_size_resnet50_gives_2048_pooled_features():
    embedder = load_embedder("ssl4eo-s1", "random")
    assert embedder.embedding_dim == 2048 and embedder.weights.name == "random(seed=0)"
    assert not any(k.startswith("fc.") for k in embedder.model.state_dict())
    with torch.inference_mode():
        out = embedder.embed(torch.rand(1, 2, 224, 224))
    assert out.shape == (1, 2048)


def test_sha256_follows_documented_recipe():
    state = load_embedder("ssl4eo-s1", "random", tiny=True).model.state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{len(raw)}\0".encode())
        digest.update(raw)
    reordered = dict(reversed(list(state.items())))
    assert state_dict_sha256(reordered) == state_dict_sha256(state) == digest.hexdigest()


def test_state_dict_file_round_trip_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    original = load_embedder("ssl4eo-s2", "random", tiny=True, seed=3)
    state = original.model.state_dict()
    pth = tmp_path / "tiny.pth"
    torch.save({**state, "fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}, pth)  # classifier ok
    sft = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(sft))
    raw = torch.randint(0, 5000, (2, 13, 224, 224), dtype=torch.int32).to(torch.uint16)
    with torch.inference_mode():
        expected = original.embed(raw)
        for path in (pth, sft):
            loaded = load_embedder("ssl4eo-s2", path, tiny=True, seed=99)
            assert loaded.weights.random is False and loaded.weights.name == path.name
            assert loaded.weights.sha256 == original.weights.sha256
            torch.testing.assert_close(loaded.embed(raw), expected, rtol=0, atol=0)


def test_hf_state_dict_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    original = load_embedder("dinov2-rgb", "random", tiny=True, seed=5)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in original.model.backbone.state_dict().items()}, str(path))
    loaded = load_embedder("dinov2-rgb", path, tiny=True)
    assert loaded.weights.sha256 == original.weights.sha256 and not loaded.weights.random
    raw = torch.randint(0, 5000, (1, 3, 224, 224), dtype=torch.int32).to(torch.uint16)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.embed(raw), original.embed(raw), rtol=0, atol=0)


def test_weights_files_with_wrong_content_are_rejected(tmp_path):
    state = load_embedder("ssl4eo-s2", "random", tiny=True).model.state_dict()
    extra = tmp_path / "extra.pth"
    torch.save({**state, "layer9.0.conv1.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match=r"unexpected keys \['layer9.0.conv1.weight'\]"):
        load_embedder("ssl4eo-s2", extra, tiny=True)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "conv1.0.weight"}, missing)   # the stem's patchify conv
    with pytest.raises(ValueError, match=r"missing keys \['conv1.0.weight'\]"):
        load_embedder("ssl4eo-s2", missing, tiny=True)
    pickled = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "hook": np.random.default_rng(0)}, pickled)
    with pytest.raises(ValueError, match="holds pickled Python objects besides tensors; they are never executed"):
        load_state_file(pickled)
    with pytest.raises(ValueError, match="'nope.pth' does not exist"):
        load_embedder("ssl4eo-s2", "nope.pth", tiny=True)


def test_pretrained_resnet_loads_from_seeded_torch_hub_cache(tmp_path, monkeypatch):
    from majortom_assets.models.ssl4eo import torchgeo_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("MAJORTOM_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="Pre-seed the torch hub cache"):
        load_embedder("ssl4eo-s1", "pretrained")
    seeded_model = load_embedder("ssl4eo-s1", "random", seed=7)
    url = torchgeo_weights(get_spec("ssl4eo-s1")).url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(
        {**seeded_model.model.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)},
        cache / url.rsplit("/", 1)[1],
    )
    embedder = load_embedder("ssl4eo-s1", "pretrained")
    assert embedder.weights.name == "ResNet50_Weights.SENTINEL1_ALL_MOCO"
    assert embedder.weights.random is False and embedder.weights.source == url
    assert embedder.weights.sha256 == seeded_model.weights.sha256


def test_pretrained_hf_offline_error_is_actionable(monkeypatch, tmp_path):
    monkeypatch.setenv("MAJORTOM_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="facebook/dinov2-base.*--weights"):
        load_embedder("dinov2-rgb", "pretrained")


def test_uint16_widening_used_on_accelerators_is_exact():
    values = np.array([0, 1, 1000, 32767, 32768, 40000, 65535], dtype=np.uint16)
    widened = N.widen_uint16(torch.from_numpy(values))
    assert widened.dtype == torch.float32
    assert widened.tolist() == values.astype(np.float64).tolist()

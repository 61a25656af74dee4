"""Pieces every model builder shares: weights identity, safe state-dict loading, the Embedder."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from majortom_assets.models.normalise import get_normaliser
from majortom_assets.models.spec import ModelSpec

WEIGHT_CHOICES = ("pretrained", "random")
_STATE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says how to provide them."""


@dataclass(frozen=True)
class WeightsIdentity:
    """Which weights produced an embedding file; written into its metadata by the engine.

    `sha256` is `state_dict_sha256` of the weights as loaded, so two files agree on it exactly when
    their models computed with the same numbers. `random` is True for untrained (seeded) weights:
    such embeddings carry no meaning and every consumer must be able to tell.
    """

    name: str
    sha256: str
    random: bool
    source: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class BuiltModel:
    """What a builder returns: a module mapping model input (B, C, s, s) to (B, dim)."""

    module: nn.Module
    weights: WeightsIdentity
    embedding_dim: int
    prefers_channels_last: bool = False


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict, independent of key insertion order and device.

    Recipe: for each key in sorted order, feed ``key NUL dtype NUL shape NUL nbytes NUL`` (UTF-8,
    e.g. ``conv1.weight\\0torch.float32\\0(64, 13, 7, 7)\\0163072\\0``) followed by the tensor's raw
    little-endian bytes in C order.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is {type(tensor).__name__}, not a tensor")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()
        header = f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{raw.nbytes}\0"
        digest.update(header.encode())
        digest.update(raw.data)
    return digest.hexdigest()


def load_state_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain state dict (name -> tensor) without executing pickled code.

    `.safetensors` files use safetensors; anything else goes through ``torch.load(weights_only=True)``,
    which refuses arbitrary pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError: the file is the problem
            raise ValueError(
                f"weights file {path} is not a valid .safetensors file ({_first_line(exc)}); re-download it "
                "or save the state dict again with safetensors.torch.save_file"
            ) from None
    else:
        state = _torch_load_tensors_only(path)
    if not isinstance(state, Mapping):
        raise TypeError(f"weights file {path} holds a {type(state).__name__}, expected a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(
            f"weights file {path} is not a plain state dict: entries {not_tensors[:5]} are not tensors "
            "(extract the model's state dict, e.g. checkpoint['state_dict'], and save that)"
        )
    return dict(state)


_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")   # zip container (torch >= 1.6) or a raw pickle stream


def _first_line(exc: BaseException) -> str:
    """The gist of a library error, without advice that does not apply here."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln]
    first = lines[0] if lines else type(exc).__name__
    return first.split(". ", 1)[0][:200]


def _torch_load_tensors_only(path: Path) -> object:
    """``torch.load(weights_only=True)`` with errors that say what is wrong with the file.

    torch's own message for a pickle with Python objects recommends ``weights_only=False``,
    which would run the file's code: that advice is never passed on.
    """
    with path.open("rb") as fh:
        head = fh.read(8)
    if not head.startswith(_TORCH_MAGICS):
        raise ValueError(
            f"weights file {path} is not a PyTorch checkpoint (it starts with {head!r}); give a .pt/.pth "
            "state dict saved with torch.save(model.state_dict(), path) or a .safetensors file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors have many types; the file is the problem either way
        if "weights only load failed" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise ValueError(
                f"weights file {path} holds pickled Python objects besides tensors; they are never "
                "executed here (a pickle can run arbitrary code). Save a plain state dict "
                "(torch.save(model.state_dict(), path)) or convert it to .safetensors"
            ) from None
        raise ValueError(
            f"weights file {path} is not a loadable torch state dict ({_first_line(exc)}); re-download "
            "or re-save it"
        ) from None


def load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, origin: str, ignorable: frozenset[str] = frozenset()
) -> None:
    """Load `state` into `module`; only keys in `ignorable` may be missing or unexpected."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"weights from {origin} do not fit the model: {exc}") from exc
    bad_missing = sorted(set(missing) - ignorable)
    bad_unexpected = sorted(set(unexpected) - ignorable)
    if bad_missing or bad_unexpected:
        raise ValueError(
            f"weights from {origin} do not match the model: "
            f"{len(bad_missing)} missing keys {bad_missing[:5]}, "
            f"{len(bad_unexpected)} unexpected keys {bad_unexpected[:5]}"
        )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def weights_kind(weights: str | os.PathLike[str]) -> str:
    """'pretrained', 'random', 'file' or 'folder'; anything else is an error the user can act on."""
    if isinstance(weights, str) and weights in WEIGHT_CHOICES:
        return weights
    path = Path(weights)
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    raise ValueError(
        f"weights must be 'pretrained', 'random' or an existing weights file/folder; {str(weights)!r} "
        "does not exist"
    )


def refuse_tiny_pretrained(kind: str, tiny: bool) -> None:
    """Tiny models are shrunken stand-ins for tests and demos: no published weights fit them."""
    if kind == "pretrained" and tiny:
        raise ValueError("tiny models have no pretrained weights; use weights='random' or a file")


def random_weights_name(tiny: bool, seed: int) -> str:
    """The identity name of seeded random weights; the seed makes them reproducible."""
    return f"{'tiny-' if tiny else ''}random(seed={seed})"


def load_weights_file(
    module: nn.Module, weights: str | os.PathLike[str], *, ignorable: frozenset[str] = frozenset()
) -> Path:
    """Load a local state-dict file strictly into `module`; returns the resolved path the identity records."""
    path = Path(weights).resolve()
    load_strict(module, load_state_file(path), origin=str(path), ignorable=ignorable)
    return path


def offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE or MAJORTOM_OFFLINE set to 1/true/yes)."""
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "MAJORTOM_OFFLINE"))


def identity_for(module: nn.Module, *, name: str, random: bool, source: str) -> WeightsIdentity:
    return WeightsIdentity(name=name, sha256=state_dict_sha256(module.state_dict()), random=random, source=source)


class Embedder(nn.Module):
    """A model of the registry with its normalisation: raw band values in, (B, dim) float32 out."""

    def __init__(
        self,
        spec: ModelSpec,
        built: BuiltModel,
        *,
        tiny: bool = False,
        reference_compatible: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.model = built.module
        self.weights = built.weights
        self.embedding_dim = built.embedding_dim
        self.prefers_channels_last = built.prefers_channels_last
        self.tiny = tiny
        self.reference_compatible = reference_compatible
        self._normalise = get_normaliser(spec.normalisation, reference_compatible=reference_compatible)

    def preprocess(self, raw: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """Raw band values (B, C, s, s), uint16 or float32, in `spec.bands` order -> model input.

        Inputs must already have the fragment size: nothing is resized (except in the explicit
        reference-compatible mode), so a wrong size is an error rather than a silent resample.
        `inplace=True` may overwrite a float32 `raw` instead of copying it.
        """
        size = self.spec.fragment_size
        if raw.ndim != 4 or raw.shape[1] != self.spec.in_channels or raw.shape[-2:] != (size, size):
            raise ValueError(
                f"model {self.spec.name} expects raw fragments of shape (B, {self.spec.in_channels}, {size}, "
                f"{size}) for bands {list(self.spec.bands)}, got {tuple(raw.shape)}"
            )
        return self._normalise(raw, inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        """preprocess + forward, for callers that do not manage devices themselves."""
        return self(self.preprocess(raw))

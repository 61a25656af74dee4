"""Shared fixtures: small synthetic Core collections, generated once per test session.

Layout follows the storage root of docs/architecture.md:
``<synthetic_root>/collections/Core-S2L1C``, ``Core-S2L2A`` (two timestamps per cell, for time
series) and ``Core-S1RTC``. All three hold the same six cells (``synthetic.default_cells()``:
both ends of a row at ±180°, Svalbard, the Norway 32V exception, a southern and a mid-latitude
cell) at the real size 1068, so fragment counts are the published ones, and share labels.
Shards hold 4 samples each, so every collection has several shards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from majortom_assets import synthetic
from majortom_assets.standard import CORE_IMAGE_SIZE

SYNTHETIC_SEED = 7
SYNTHETIC_SIZE = CORE_IMAGE_SIZE
SAMPLES_PER_SHARD = 4
COLLECTION_TIMESTAMPS = {"S2L1C": 1, "S2L2A": 2, "S1RTC": 1}


@pytest.fixture(scope="session")
def synthetic_cells() -> list[str]:
    return synthetic.default_cells()


@pytest.fixture(scope="session")
def _synthetic_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("majortom_root")


def _collection(base: Path, source: str) -> Path:
    path = base / "collections" / f"Core-{source}"
    if not (path / "metadata.parquet").exists():
        synthetic.generate_collection(path, source, cells=synthetic.default_cells(),
                                      timestamps=COLLECTION_TIMESTAMPS[source], size=SYNTHETIC_SIZE,
                                      seed=SYNTHETIC_SEED, samples_per_shard=SAMPLES_PER_SHARD)
    return path


@pytest.fixture(scope="session")
def s2l1c_collection(_synthetic_base) -> Path:
    return _collection(_synthetic_base, "S2L1C")


@pytest.fixture(scope="session")
def s2l2a_collection(_synthetic_base) -> Path:
    return _collection(_synthetic_base, "S2L2A")


@pytest.fixture(scope="session")
def s1rtc_collection(_synthetic_base) -> Path:
    return _collection(_synthetic_base, "S1RTC")


@pytest.fixture(scope="session")
def synthetic_root(_synthetic_base, s2l1c_collection, s2l2a_collection, s1rtc_collection) -> Path:
    """A storage root holding all three synthetic collections under collections/."""
    return _synthetic_base

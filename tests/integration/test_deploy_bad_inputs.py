"""Bad samples cost only themselves; a bad source fails only its own run, with a clear message.

One grid row mixes good S2L2A and S1RTC samples with every kind of bad one: corrupt band bytes, a
band column missing from its shard, an all-nodata sample, a sample smaller than a fragment, NaN
and negative backscatter. The row's runs must succeed, list each bad sample with its reason (in
the materialisation metadata and the failures table) and embed every good fragment.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deploy_support import (
    IMAGE_SIZE,
    materialize,
    project_env,
    step_failure_messages,
)
from rasterio.io import MemoryFile

from majortom_assets import geoparquet, synthetic
from majortom_assets.fragment import fragment_layout
from majortom_assets.standard import S2L2A_BANDS

pytestmark = pytest.mark.slow

ROW = "9U"
MODELS = "dinov2-rgb,ssl4eo-s1"
PER_SAMPLE = fragment_layout(IMAGE_SIZE, IMAGE_SIZE, 224, 0.1).count


def _geotiff(raw: bytes, change) -> bytes:
    """Re-encode a single-band GeoTIFF with `change(array, profile) -> (array, profile)` applied."""
    with MemoryFile(bytes(raw)) as src_file, src_file.open() as src:
        array, profile = change(src.read(1), dict(src.profile))
    with MemoryFile() as out_file:
        with out_file.open(**profile) as dst:
            dst.write(array, 1)
        return out_file.read()


def _zeros(array, profile):
    return np.zeros_like(array), profile


def _shrink(array, profile):
    """A quarter of the side (96 px at 10 m): smaller than a 224 px fragment."""
    small = array[::4, ::4].copy()
    transform = profile["transform"]
    profile.update(height=small.shape[0], width=small.shape[1],
                   transform=transform * transform.scale(4, 4))
    return small, profile


def _set_pixels(value):
    def change(array, profile):
        array = array.astype(np.float32).copy()
        array[:8, :8] = value
        return array, profile
    return change


def _rewrite(collection, edits: dict[int, object], drop_column: dict[int, str]) -> dict[int, str]:
    """Apply per-sample edits (by metadata order); samples in `drop_column` move to a shard without it."""
    meta = pd.read_parquet(collection / "metadata.parquet")
    samples = []
    for url, row in zip(meta["parquet_url"], meta["parquet_row"], strict=True):
        samples.append(pq.ParquetFile(collection / url).read_row_group(int(row)).to_pylist()[0])
    for index, edit in edits.items():
        samples[index] = edit(samples[index])
    schema = pq.read_schema(collection / meta["parquet_url"].iloc[0])
    kept = [i for i in range(len(samples)) if i not in drop_column]
    with pq.ParquetWriter(collection / "images" / "part_00000.parquet", schema) as writer:
        for position, i in enumerate(kept):
            writer.write_table(pa.Table.from_pylist([samples[i]], schema=schema))
            meta.loc[i, ["parquet_url", "parquet_row"]] = ["images/part_00000.parquet", position]
    for n, (i, column) in enumerate(sorted(drop_column.items()), start=1):
        narrow = schema.remove(schema.get_field_index(column))
        name = f"images/part_{90000 + n:05d}.parquet"
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in samples[i].items() if k != column}], schema=narrow),
                       collection / name)
        meta.loc[i, ["parquet_url", "parquet_row"]] = [name, 0]
    for stale in (collection / "images").glob("part_0000[1-9].parquet"):
        stale.unlink()
    meta.to_parquet(collection / "metadata.parquet", index=False)
    return dict(zip(range(len(meta)), meta["product_id"], strict=True))


def _all_bands(change, bands):
    def edit(sample):
        return {**sample, **{band: _geotiff(sample[band], change) for band in bands}}
    return edit


@pytest.fixture(scope="module")
def bad_row(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    home, dagster_home = root / "home", root / "dagster_home"
    dagster_home.mkdir()
    s2 = synthetic.generate_collection(home / "collections" / "Core-S2L2A", "S2L2A", rows=[ROW], cells_per_row=6,
                                       size=IMAGE_SIZE, seed=31, samples_per_shard=4)
    s1 = synthetic.generate_collection(home / "collections" / "Core-S1RTC", "S1RTC", rows=[ROW], cells_per_row=3,
                                       size=IMAGE_SIZE, seed=31, samples_per_shard=4)
    s2_bands = list(S2L2A_BANDS)
    s2_ids = _rewrite(s2, {
        0: lambda s: {**s, "B04": b"II*\x00 this is not a GeoTIFF"},
        1: _all_bands(_zeros, s2_bands),
        2: _all_bands(_shrink, s2_bands),
    }, drop_column={3: "B03"})
    s1_ids = _rewrite(s1, {0: _all_bands(_set_pixels(np.nan), ["vv"]), 1: _all_bands(_set_pixels(-0.5), ["vh"])}, {})
    env = project_env(home, dagster_home, models=MODELS)
    chain = ["core/s2l2a/shards", "core/s1rtc/shards", "fragments/grid_224px",
             "embeddings/dinov2_rgb", "embeddings/ssl4eo_s1"]
    results, output = materialize(env, ["core/s2l2a/metadata", "core/s1rtc/metadata"], then=[(chain, [ROW])])
    return home, dagster_home, env, results, output, s2_ids, s1_ids


def _materialisations(dagster_home, run_id):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return {
            r.dagster_event.asset_key.to_user_string(): r.dagster_event.event_specific_data.materialization.metadata
            for r in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        }


def test_bad_samples_are_skipped_with_reasons_and_good_ones_kept(bad_row):
    home, dagster_home, _, results, output, s2_ids, s1_ids = bad_row
    assert [r["success"] for r in results] == [True, True], output[-6000:]
    found = _materialisations(dagster_home, results[1]["run_id"])

    expected_reasons = {  # S2L2A sample index -> words its reason must contain
        0: ("B04",), 1: ("nodata",), 2: ("smaller than the fragment",),
        # skipped while copying the shard (the column is absent): in the same failures table, band named
        3: ("column missing", "B03"),
    }
    skipped_anywhere = "\n".join(
        str(md["skipped samples"].value) for md in found.values() if "skipped samples" in md
    )
    failures = pq.read_table(home / "failures" / "dinov2-rgb" / f"row={ROW}" / "failures.parquet").to_pandas()
    s1_failures = pq.read_table(home / "failures" / "ssl4eo-s1" / f"row={ROW}" / "failures.parquet").to_pandas()
    for index, words in expected_reasons.items():
        product = s2_ids[index]
        assert product in skipped_anywhere, (index, skipped_anywhere)
        reasons = " ".join(failures.loc[failures["product_id"] == product, "reason"]) or skipped_anywhere
        line = next((ln for ln in reasons.splitlines() if product in ln), reasons)
        for word in words:
            assert word.lower() in line.lower(), (index, word, line)

    # the S1 values: NaN and negative backscatter, named as such in the failures table
    reasons = dict(zip(s1_failures["product_id"], s1_failures["reason"], strict=True))
    assert set(reasons) == {s1_ids[0], s1_ids[1]}
    assert "non-finite" in reasons[s1_ids[0]] and "vv" in reasons[s1_ids[0]]
    assert "negative" in reasons[s1_ids[1]] and "vh" in reasons[s1_ids[1]]

    # nothing else lost: every good sample is embedded, all of its fragments
    for model, good in (("dinov2-rgb", {s2_ids[4], s2_ids[5]}), ("ssl4eo-s1", {s1_ids[2]})):
        path = home / "embeddings" / model / f"row={ROW}" / "embeddings.parquet"
        assert geoparquet.verify_file(path).ok
        embedded = pq.read_table(path, columns=["product_id"]).column("product_id").to_pylist()
        for product in good:
            assert embedded.count(product) == PER_SAMPLE, (model, product)
        assert not {s2_ids[0], s2_ids[1], s2_ids[3], s1_ids[0], s1_ids[1]} & set(embedded)
    emb_md = found["embeddings/dinov2_rgb"]
    assert emb_md["samples skipped"].value == len(failures)
    # every selected sample is embedded or listed, whichever stage skipped it (the shard copy kept 5 of 6)
    assert emb_md["samples"].value + len(failures) == 6
    stages = dict(zip(failures["product_id"], failures["stage"], strict=True))
    assert stages[s2_ids[3]] == "shard copy" and stages[s2_ids[2]] == "decode"
    assert s2_ids[3] in emb_md["skipped samples"].value and "band=B03" in emb_md["skipped samples"].value


def test_a_sample_smaller_than_a_fragment_is_not_embedded(bad_row):
    home, *_, s2_ids, _ = bad_row
    path = home / "embeddings" / "dinov2-rgb" / f"row={ROW}" / "embeddings.parquet"
    embedded = set(pq.read_table(path, columns=["product_id"]).column("product_id").to_pylist())
    assert s2_ids[2] not in embedded


def test_unreadable_sources_fail_their_run_clearly_and_the_code_location_still_loads(tmp_path):
    home, dagster_home = tmp_path / "home", tmp_path / "dagster_home"
    dagster_home.mkdir()
    malformed = home / "collections" / "broken"
    (malformed / "images").mkdir(parents=True)
    (malformed / "metadata.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    missing = home / "collections" / "nowhere"
    env = project_env(home, dagster_home, models=MODELS, MAJORTOM_COLLECTION_S2L2A=str(malformed),
                      MAJORTOM_COLLECTION_S1RTC=str(missing))
    results, output = materialize(env, ["core/s2l2a/metadata"], then=[(["core/s1rtc/metadata"], None)])
    # the code location loaded (the driver ran both jobs) and each run failed on its own
    assert [r["success"] for r in results] == [False, False], output[-4000:]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        broken = "\n".join(step_failure_messages(instance, results[0]["run_id"]))
        absent = "\n".join(step_failure_messages(instance, results[1]["run_id"]))
    assert "Core-S2L2A" in broken and str(malformed) in broken
    assert "Core-S1RTC" in absent and str(missing) in absent

"""Time windows: aggregates per cell/fragment, change between windows, the SQL macros, the asset config.

Ground truth comes from `testdata.write_synthetic`: six monthly dates per cell, a few cells jump by
a random vector at a known date (`changed_cells`), every other difference is date noise. The
aggregates are checked against a plain numpy computation from the written files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
from majortom_assets.vectors import sql, testdata, windows
from majortom_assets.vectors.windows import TimeWindow

A = "2021-01-01/2021-02-15"      # dates 0, 1 (Jan 1, Jan 31)
B = "2021-04-01/2021-06-30"      # dates 3, 4, 5 (Apr 1, May 1, May 31)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return testdata.write_synthetic(tmp_path_factory.mktemp("win"), "win-model",
                                    cells=testdata.cells_in_rows([3, 4, -7], 6), dim=24, timestamps=6,
                                    changed_fraction=0.35, seed=11)


def _numpy_cells(paths, window: TimeWindow) -> dict[str, np.ndarray]:
    """cell -> (n, dim) acquisition unit vectors, computed the slow, obvious way."""
    lo, hi = pd.Timestamp(window.start, tz="UTC"), pd.Timestamp(window.end, tz="UTC") + pd.Timedelta(days=1)
    out: dict[str, dict[str, list]] = {}
    for p in paths:
        t = pq.read_table(p)
        x = geoparquet.embedding_matrix(t).astype(np.float64)
        for i, (cell, prod, ts) in enumerate(zip(t.column("grid_cell").to_pylist(),
                                                 t.column("product_id").to_pylist(),
                                                 t.column("timestamp").to_pylist())):
            if lo <= pd.Timestamp(ts) < hi:
                out.setdefault(cell, {}).setdefault(prod, []).append(x[i] / np.linalg.norm(x[i]))
    result = {}
    for cell, prods in out.items():
        acq = [np.mean(v, axis=0) for _, v in sorted(prods.items())]
        result[cell] = np.array([a / np.linalg.norm(a) for a in acq])
    return result


def test_window_parse_and_validation():
    w = TimeWindow.parse(" 2021-06-01/2021-08-31 ")
    assert w.label == "2021-06-01/2021-08-31"
    assert w.bounds_ns[1] == np.datetime64("2021-09-01", "ns")   # the end day is included
    for bad, words in [("2021-06-01", "START/END"), ("2021-08-31/2021-06-01", "before it starts"),
                       ("2021-02-30/2021-03-01", "day is out of range")]:
        with pytest.raises(ValueError, match=words):
            TimeWindow.parse(bad)


def test_window_stats_match_numpy(data):
    got = windows.window_stats(data.paths, A).set_index("grid_cell")
    expected = _numpy_cells(data.paths, TimeWindow.parse(A))
    assert set(got.index) == set(expected) == set(data.labels.grid_cell)
    for cell, u in expected.items():
        m = u.mean(axis=0)
        spread = np.sqrt(((u - m) ** 2).sum() / (len(u) - 1))
        assert got.loc[cell, "acquisitions"] == len(u) == 2
        assert got.loc[cell, "spread"] == pytest.approx(spread, rel=1e-4)
        np.testing.assert_allclose(got.loc[cell, "embedding"], m / np.linalg.norm(m), atol=1e-5)
    med = windows.window_stats(data.paths, B, statistic="median").set_index("grid_cell")
    u = _numpy_cells(data.paths, TimeWindow.parse(B))[data.labels.grid_cell[0]]
    c = np.median(u, axis=0)
    np.testing.assert_allclose(med.loc[data.labels.grid_cell[0], "embedding"], c / np.linalg.norm(c), atol=1e-5)


def test_fragment_level_has_one_row_per_pixel_box(data):
    got = windows.window_stats(data.paths, B, level="fragment", with_vectors=False)
    assert len(got) == 25 * len(data.labels) and set(got["acquisitions"]) == {3}
    assert got.groupby("grid_cell")["pixel_bbox"].apply(lambda s: len({tuple(b) for b in s})).eq(25).all()


def test_compare_tells_change_from_noise(data):
    changed_between = {c for c, k in data.changed_cells.items() if k == 2 or k == 3}  # A before, B after
    changed_inside = {c for c, k in data.changed_cells.items() if k not in (2, 3)}  # jump inside a window
    assert changed_between, "fixture must have a cell that changed between the windows"
    res = windows.compare_windows(data.paths, A, B).set_index("grid_cell")
    quiet = res.drop(index=list(data.changed_cells))
    assert quiet["change_score"].median() < 3 and not quiet["changed"].any()
    for cell in changed_between:
        # k == 3 moves B's first date too: still far beyond noise
        assert res.loc[cell, "changed"] and res.loc[cell, "change_score"] > 100 * quiet["change_score"].max()
    for cell in changed_inside:       # a jump inside window A or B shows up as that window's spread
        side = "spread_a" if data.changed_cells[cell] == 1 else "spread_b"
        assert res.loc[cell, side] > 10 * quiet[side].median()
    # the cosine distance alone would flag a noisy cell as much as a changed one; the score does not
    assert list(res.index[: len(changed_between)]) == sorted(changed_between, key=lambda c: -res.loc[c, "change_score"])


def test_single_acquisition_windows_borrow_the_pooled_spread(data):
    one = "2021-01-01/2021-01-01"
    res = windows.compare_windows(data.paths, one, B)
    assert res["spread_pooled"].all() and (res["acquisitions_a"] == 1).all()
    assert res["change_score"].notna().all()
    both_single = windows.compare_windows(data.paths, one, "2021-05-31/2021-05-31")
    assert both_single["change_score"].isna().all() and not both_single["changed"].any()
    assert windows.compare_windows(data.paths, "2019-01-01/2019-12-31", B).empty


def test_sql_macros_agree_with_python(data):
    con = sql.connect(data.root)
    try:
        view = sql.view_name(data.model)
        q = con.sql(f"SELECT * FROM {view}_window_change('2021-01-01', '2021-02-15', '2021-04-01', '2021-06-30')").df()
        w = con.sql(f"SELECT * FROM {view}_window('2021-01-01', '2021-02-15')").df().set_index("grid_cell")
        one = con.sql(f"SELECT * FROM {view}_window_change('2021-01-01', '2021-01-01', '2021-04-01', "
                      f"'2021-06-30')").df()
    finally:
        con.close()
    py = windows.compare_windows(data.paths, A, B).set_index("grid_cell")
    q = q.set_index("grid_cell").loc[py.index]
    np.testing.assert_allclose(q["change_score"], py["change_score"], rtol=1e-3)
    np.testing.assert_allclose(q["cosine_distance"], py["cosine_distance"], atol=1e-6)
    np.testing.assert_allclose(q["spread_b"], py["spread_b"], rtol=1e-4)
    stats = windows.window_stats(data.paths, A).set_index("grid_cell")
    np.testing.assert_allclose(w.loc[stats.index, "spread"], stats["spread"], rtol=1e-4)
    assert (w["acquisitions"] == 2).all()
    assert one["change_score"].isna().all()     # SQL does not pool: NULL for a one-date window


def test_asset_config_is_validated_at_the_edge():
    from pydantic import ValidationError

    from majortom_assets.defs.windows import WindowChangeConfig

    cfg = WindowChangeConfig(window_a="2021-06-01/2021-08-31", window_b=" 2022-06-01/2022-08-31")
    assert cfg.window_b == "2022-06-01/2022-08-31"
    with pytest.raises(ValidationError, match="before it starts"):
        WindowChangeConfig(window_a="2021-08-31/2021-06-01", window_b="2022-06-01/2022-08-31")
    with pytest.raises(ValidationError, match="both window_a and window_b"):
        WindowChangeConfig(window_a="2021-06-01/2021-08-31")
    with pytest.raises(ValidationError):
        WindowChangeConfig(level="pixel")


def test_asset_defaults_to_the_data_halves_and_survives_a_single_day(tmp_path):
    import dagster as dg
    from dagster_helpers import local_resources

    from majortom_assets.defs.windows import build_window_change_asset

    asset = build_window_change_asset("dinov2-rgb")
    data = testdata.write_synthetic(tmp_path / "many", "dinov2-rgb", dim=8, timestamps=4, seed=1,
                                    cells=testdata.cells_in_rows([2], 3))
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], instance=instance, resources=local_resources(data.root, "dinov2-rgb", 1068))
    md = result.asset_materializations_for_node(asset.op.name)[0].metadata
    # dates Jan 1, Jan 31, Mar 2, Apr 1: halves Jan 1-Feb 15 and Feb 16-Apr 1
    assert md["window a"].value == "2021-01-01/2021-02-15" and md["window b"].value == "2021-02-16/2021-04-01"
    written = pd.read_parquet(data.root / "reports" / "dinov2-rgb" / "window_change.parquet")
    assert len(written) == 3 and (written["acquisitions_a"] == 2).all()
    one = testdata.write_synthetic(tmp_path / "one", "dinov2-rgb", dim=8, timestamps=1, seed=1,
                                   cells=testdata.cells_in_rows([2], 3))
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], instance=instance, resources=local_resources(one.root, "dinov2-rgb", 1068))
    md = result.asset_materializations_for_node(asset.op.name)[0].metadata
    assert md["compared"].value == 0 and "single day" in md["most changed"].value

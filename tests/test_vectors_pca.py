"""Streaming PCA against an in-memory SVD, and the RGB world map."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from majortom_assets import geoparquet
from majortom_assets.fragment import fragment_layout
from majortom_assets.vectors import files, pca, testdata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cells = testdata.cells_in_rows([-30, 0, 1, 700], 6)
    return testdata.write_synthetic(tmp_path_factory.mktemp("pca"), cells=cells, dim=24, timestamps=2, seed=3)


def _all(paths):
    tables = [pq.read_table(p) for p in paths]
    return np.concatenate([geoparquet.embedding_matrix(t) for t in tables]), tables


def _svd_pca(x, k):
    c = x.astype(np.float64) - x.mean(axis=0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    var = s**2 / (len(x) - 1)
    return vt[:k], var[:k], var[:k] / var.sum()


def _assert_same_pca(model, x, k):
    comps, var, ratio = _svd_pca(x, k)
    dots = np.abs(np.sum(model.components_ * comps, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-8)
    np.testing.assert_allclose(model.explained_variance_, var, rtol=1e-8)
    np.testing.assert_allclose(model.explained_variance_ratio_, ratio, rtol=1e-8)
    np.testing.assert_allclose(model.mean_, x.mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-9)


def test_fit_all_fragments_matches_svd(data):
    x, _ = _all(data.paths)
    model = pca.StreamingPCA(5).fit_files(data.paths, central_only=False, batch_rows=97)
    assert model.n_samples_ == len(x)
    _assert_same_pca(model, x, 5)
    np.testing.assert_allclose(model.transform(x[:10]),
                               (x[:10] - x.mean(axis=0, dtype=np.float64)) @ model.components_.T, atol=1e-9)


def test_fit_central_fragments_matches_svd(data):
    layout = fragment_layout(1068, 1068, 224)
    centre_box = layout.boxes[layout.central]
    x, tables = _all(data.paths)
    boxes = np.concatenate([np.asarray(t.column("pixel_bbox").to_pylist()) for t in tables])
    central = (boxes == centre_box).all(axis=1)
    assert central.sum() == len(data.labels) * 2  # one per cell and date
    model = pca.StreamingPCA(3).fit_files(data.paths, central_only=True)
    assert model.n_samples_ == central.sum()
    _assert_same_pca(model, x[central], 3)


def test_partitions_fitted_independently_merge_exactly(data):
    whole = pca.StreamingPCA(4).fit_files(data.paths, central_only=False)
    parts = [pca.file_moments(p, central_only=False) for p in reversed(data.paths)]
    merged = pca.StreamingPCA(4).fit_moments(pca.merge_all(parts))
    np.testing.assert_allclose(merged.components_, whole.components_, atol=1e-10)
    x, _ = _all(data.paths)
    m = pca.merge_all(parts)
    np.testing.assert_allclose(m.sum_, x.sum(axis=0, dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(m.outer_sum_, x.astype(np.float64).T @ x.astype(np.float64), rtol=1e-9)


def test_large_offset_is_numerically_stable():
    rng = np.random.default_rng(0)
    x = 1e4 + rng.standard_normal((5000, 6)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    model = pca.StreamingPCA(6)
    for chunk in np.array_split(x, 7):
        model.partial_fit(chunk)
    _assert_same_pca(model, x, 6)


def test_save_load_and_errors(data, tmp_path):
    model = pca.StreamingPCA(3).fit_files(data.paths)
    back = pca.StreamingPCA.load(model.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(back.components_, model.components_)
    moments = pca.file_moments(data.paths[0])
    np.testing.assert_array_equal(pca.PCAMoments.load(moments.save(tmp_path / "mo.npz")).scatter, moments.scatter)
    with pytest.raises(ValueError, match="exceeds the embedding dimension"):
        pca.StreamingPCA(30).fit_files(data.paths)
    with pytest.raises(ValueError, match="dimension"):
        model.transform(np.zeros((2, 5)))


def test_scores_to_rgb_scaling():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((1000, 3)) * [1.0, 5.0, 0.1] + [0, 10, -3]
    s[0] = [1e6, -1e6, 1e6]  # an outlier must not wash out the others
    rgb = pca.scores_to_rgb(s).astype(float)
    assert rgb.std(axis=0).min() > 30
    means = rgb.mean(axis=0)
    assert means.max() - means.min() < 3  # equalised mean intensity


def test_pca_rgb_map_outputs(data, tmp_path):
    import geopandas as gpd
    import rasterio
    from PIL import Image

    model = pca.StreamingPCA(3).fit_files(data.paths)
    meta = pca.pca_rgb_map(data.paths, model, tmp_path / "pca.png", tmp_path / "pca.parquet",
                           tmp_path / "pca.tif", marker_px=1)
    assert meta["cells"] == len(data.labels)
    img = np.asarray(Image.open(tmp_path / "pca.png"))
    assert img.shape == (1024, 2048, 3)
    gdf = gpd.read_parquet(tmp_path / "pca.parquet")
    assert set(gdf.grid_cell) == set(data.labels.grid_cell)
    # independent recomputation: mean over dates of the central fragment's scores per cell
    layout = fragment_layout(1068, 1068, 224)
    x, tables = _all(data.paths)
    boxes = np.concatenate([np.asarray(t.column("pixel_bbox").to_pylist()) for t in tables])
    cells = np.concatenate([t.column("grid_cell").to_numpy(zero_copy_only=False) for t in tables])
    central = (boxes == layout.boxes[layout.central]).all(axis=1)
    scores = (x[central] - model.mean_) @ model.components_.T
    expect = {c: scores[cells[central] == c].mean(axis=0) for c in gdf.grid_cell}
    np.testing.assert_allclose(gdf[["pc1", "pc2", "pc3"]].to_numpy(),
                               np.stack([expect[c] for c in gdf.grid_cell]), atol=1e-6)
    rgb = pca.scores_to_rgb(gdf[["pc1", "pc2", "pc3"]].to_numpy())
    np.testing.assert_array_equal(gdf[["r", "g", "b"]].to_numpy(), rgb)
    # a cell painted alone (marker 1 px) shows its colour at its equirectangular pixel
    from majortom_assets.vectors.pca_map import lonlat_to_pixel

    xs, ys = lonlat_to_pixel(gdf.centre_lon.to_numpy(), gdf.centre_lat.to_numpy(), 2048, 1024)
    pix = xs * 10_000 + ys
    lonely = [i for i in range(len(gdf)) if (pix == pix[i]).sum() == 1]
    assert lonely
    for i in lonely:
        np.testing.assert_array_equal(img[ys[i], xs[i]], rgb[i])
    with rasterio.open(tmp_path / "pca.tif") as src:
        assert src.crs.to_epsg() == 4326 and src.count == 4
        assert src.bounds.left == -180 and src.bounds.top == 90
    assert gdf.crs is not None and gdf.geometry.geom_type.eq("Point").all()
    assert files.known_models(data.root) == [data.model]

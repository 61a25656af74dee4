"""Released Major TOM sets as inputs: the reference shape, the quirks report, the normalised view.

Files are written in exactly the shape ../shared/RELEASED_FORMAT.md gives (released_fixtures), and
the normalised footprints are checked against our own footprint code run on the cell's true image
placement, so "transposed" is detected and undone, not assumed.
"""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from majortom_assets import geoparquet, released, synthetic
from majortom_assets import released_fixtures as rf
from majortom_assets.fragment import fragment_layout
from majortom_assets.vectors import files

ROWS = ["136U", "12D"]


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    base = tmp_path_factory.mktemp("rel") / "Core-S2RGB-DINOv2"
    return rf.write_reference_set(base, ROWS, 3, 768, timestamps=2, files=2)


def _checks(report):
    return {c.name: c.status for c in report.checks}


def test_fixture_has_the_released_shape(dino):
    path = min(dino.rglob("*.parquet"))
    schema = pq.read_schema(path)
    assert schema.field("embedding").type == pa.list_(pa.float32())
    assert schema.field("unique_id").type == pa.large_string()
    assert schema.field("grid_row_u").type == pa.int16()
    assert schema.field("centre_lat").type == pa.float32()
    assert schema.field("pixel_bbox").type == pa.list_(pa.int64())
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["columns"]["geometry"]["crs"] is None and geo["version"] == "1.1.0"
    assert b"majortom" not in schema.metadata


def test_quirks_report_names_each_failed_check(dino):
    source = released.open_source(dino)
    assert source.dataset == "Core-S2RGB-DINOv2" and source.model == "dinov2-rgb" and len(source.files) == 2
    report = released.check_source(source)
    status = _checks(report)
    for name in ("embedding_fixed_size", "geo_crs_declared", "utm_footprint_follows_pixels",
                 "unique_id_verifiable", "geometry_antimeridian_valid", "timestamp_utc",
                 "provenance_metadata", "preprocessing_as_standard"):
        assert status[name] == "fail", name
    for name in ("embedding_lengths_equal", "utm_footprint_axis_order", "grid_ints_match_cell",
                 "unique_id_sha256_hex", "required_columns"):
        assert status[name] == "pass", name
    detail = {c.name: c.detail for c in report.checks}
    assert "truncated print" in detail["unique_id_verifiable"]
    assert "1/255 twice" in detail["preprocessing_as_standard"]
    assert report.rows == report.checked_rows == 2 * 3 * 2 * 2 * 25 // 2
    assert "| utm_footprint_follows_pixels | fail |" in report.to_markdown()


def test_untransposed_file_passes_and_axis_swap_is_detected(tmp_path):
    good = rf.write_reference_file(tmp_path / "Core-S2RGB-SigLIP" / "a.parquet", ["136U_10R"], 1152,
                                   fragment_size=384, transposed=False)
    status = _checks(released.check_source(released.open_source(good)))
    assert status["utm_footprint_follows_pixels"] == "pass"
    # A writer that put northing before easting in the WKT:
    table = pq.read_table(good)
    swapped = shapely.transform(shapely.from_wkt(table.column("utm_footprint").to_numpy(zero_copy_only=False)),
                                lambda xy: xy[:, ::-1])
    table = table.set_column(table.schema.get_field_index("utm_footprint"), "utm_footprint",
                             pa.array(shapely.to_wkt(swapped), pa.large_string()))
    bad = tmp_path / "Core-S2RGB-SigLIP" / "b.parquet"
    pq.write_table(table, bad)
    fix = released.file_fix(released.open_source(bad), str(bad))
    assert fix.axis_swapped is True and fix.transposed is False
    a = next(released.iter_normalised(released.open_source(good), str(good)))
    b = next(released.iter_normalised(released.open_source(bad), str(bad)))
    assert a.column("utm_footprint").equals(b.column("utm_footprint"))


def test_view_footprints_equal_our_own_and_ids_are_kept(dino, tmp_path):
    view = released.open_view(dino, root=tmp_path / "view")
    assert files.known_models(view) == ["dinov2-rgb"]
    paths = files.model_paths(view, "dinov2-rgb")
    assert [files.partition_row(p) for p in paths] == ["12D", "136U"]
    source_ids = set()
    for p in sorted(dino.rglob("*.parquet")):
        source_ids |= set(pq.read_table(p, columns=["unique_id"]).column(0).to_pylist())
    layout = fragment_layout(rf.IMAGE_SIDE, rf.IMAGE_SIDE, 224)
    seen = set()
    for path in paths:
        table = geoparquet.read_table(path)
        assert table.schema.equals(geoparquet.embedding_schema(768), check_metadata=False)
        geo = geoparquet.read_geo_metadata(path)["columns"]["geometry"]
        assert geo["crs"]["id"]["code"] == "CRS84"
        info = geoparquet.read_info(path)
        assert info.weights == "released:Core-S2RGB-DINOv2" and "unverifiable" in info.extra["released"]["unique_id"]
        seen |= set(table.column("unique_id").to_pylist())
        # unique_ids are the published ones, so our verifier flags every row instead of trusting them
        assert len(geoparquet.verify_file(path).bad_ids) == table.num_rows
        for cell in set(table.column("grid_cell").to_pylist()):
            place = synthetic.place_cell(cell, rf.IMAGE_SIDE)
            ours = geoparquet.fragment_footprints(layout.boxes, place.transform, f"EPSG:{place.epsg}")
            sub = table.filter(pa.compute.equal(table.column("grid_cell"), cell))
            boxes = files.pixel_boxes(sub.column("pixel_bbox"))
            order = [layout.boxes.tolist().index(b) for b in boxes.tolist()]
            got = shapely.from_wkt(sub.column("utm_footprint").to_numpy(zero_copy_only=False))
            want = shapely.from_wkt(ours.utm_wkt[order])
            assert shapely.equals_exact(got, want, tolerance=1e-3).all()
            np.testing.assert_allclose(sub.column("centre_lon").to_numpy(), ours.centre_lon[order], atol=1e-9)
            geoms = shapely.from_wkb(sub.column("geometry").to_numpy(zero_copy_only=False))
            b = shapely.bounds(shapely.get_parts(geoms))
            assert ((b[:, 2] - b[:, 0]) < 1.0).all()          # no polygon spans the globe
    assert seen == source_ids


def test_view_embeddings_are_the_published_values(dino, tmp_path):
    view = released.open_view(dino, root=tmp_path / "v", rows=["136U"])
    assert [files.partition_row(p) for p in files.model_paths(view, "dinov2-rgb")] == ["136U"]
    table = geoparquet.read_table(files.model_paths(view, "dinov2-rgb", ["136U"])[0])
    ids = table.column("unique_id").to_pylist()
    published = {}
    for p in sorted(dino.rglob("*.parquet")):
        t = pq.read_table(p, columns=["unique_id", "embedding"])
        published.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))
    x = geoparquet.embedding_matrix(table)
    np.testing.assert_array_equal(x, np.asarray([published[i] for i in ids], np.float32))


def test_view_is_reused_until_the_source_changes(dino, tmp_path):
    root = tmp_path / "v"
    source = released.open_source(dino)
    view = released.ReleasedView(source, root)
    assert sorted(view.refresh()) == ["12D", "136U"]
    assert view.refresh() == []
    first = min(dino.rglob("*.parquet"))
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert sorted(released.ReleasedView(released.open_source(dino), root).refresh()) == ["12D", "136U"]


def test_variable_length_violation_names_file_and_row(tmp_path):
    path = rf.write_reference_file(tmp_path / "Core-S1RTC-SSL4EO" / "x.parquet", ["136U_10R"], 2048)
    table = pq.read_table(path)
    emb = table.column("embedding").to_pylist()
    emb[7] = emb[7][:-3]
    table = table.set_column(1, "embedding", pa.array(emb, pa.list_(pa.float32())))
    pq.write_table(table, path)
    source = released.open_source(path)
    assert _checks(released.check_source(source))["embedding_lengths_equal"] == "fail"
    with pytest.raises(released.ReleasedFormatError, match=r"x\.parquet: row 7: embedding has 2045 values"):
        list(released.iter_normalised(source, str(path)))


def test_model_is_checked_and_required(tmp_path):
    path = rf.write_reference_file(tmp_path / "Core-S2L1C-SSL4EO" / "x.parquet", ["136U_10R"], 16)
    with pytest.raises(ValueError, match="holds ssl4eo-s2 embeddings, not 'dinov2-rgb'"):
        released.open_source(path, model="dinov2-rgb")
    other = rf.write_reference_file(tmp_path / "mine" / "x.parquet", ["136U_10R"], 16)
    with pytest.raises(ValueError, match="pass the model name"):
        released.open_source(other)
    assert released.open_source(other, model="custom").model == "custom"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        released.open_source(tmp_path / "nope")


def test_fsspec_source_reads_through_the_filesystem(tmp_path):
    local = rf.write_reference_file(tmp_path / "x.parquet", ["12D_3L"], 1152, fragment_size=384)
    mem = fsspec.filesystem("memory")
    mem.pipe("/Core-S2RGB-SigLIP/embeddings/part_00000.parquet", local.read_bytes())
    source = released.open_source("memory://Core-S2RGB-SigLIP")
    assert source.model == "siglip-rgb" and len(source.files) == 1
    assert next(iter(source.versions().values())).startswith("size:")
    view = released.ReleasedView(source, tmp_path / "view")
    assert view.refresh() == ["12D"]
    assert files.row_count(files.model_paths(view, "siglip-rgb")) == 9


def test_hf_urls_use_the_hub_filesystem():
    from huggingface_hub import HfFileSystem

    fs, path = released._open_fs(released.HF_ORG + "Core-S2RGB-DINOv2")
    assert isinstance(fs, HfFileSystem) and path == "datasets/Major-TOM/Core-S2RGB-DINOv2"
    with pytest.raises(ValueError, match="hf://datasets/<owner>/<name>"):
        released._open_fs("hf://Major-TOM")
    assert released.dataset_of("hf://datasets/Major-TOM/Core-S1RTC-SSL4EO/embeddings/part_1.parquet") \
        == "Core-S1RTC-SSL4EO"


def test_products_take_a_view_as_a_root(dino, tmp_path):
    from majortom_assets.vectors import sql
    from majortom_assets.vectors.pca import StreamingPCA

    view = released.open_view(dino, root=tmp_path / "v")
    pca = StreamingPCA(3).fit_files(files.model_paths(view, "dinov2-rgb"))
    assert pca.components_.shape == (3, 768) and pca.n_samples_ == 12   # central fragments
    con = sql.connect(view)
    try:
        n, dim = con.execute('SELECT count(*), max(len(embedding)) FROM "dinov2_rgb"').fetchone()
    finally:
        con.close()
    assert (n, dim) == (300, 768)


def test_filtered_read_names_the_file_row(tmp_path):
    """Reading one grid row of a mixed file still names the bad row by its position in the file."""
    path = rf.write_reference_file(tmp_path / "Core-S2RGB-SigLIP" / "x.parquet", ["12D_3L", "136U_10R"], 1152,
                                   fragment_size=384)
    table = pq.read_table(path)
    emb = table.column("embedding").to_pylist()
    emb[11] = emb[11][:5]               # second cell (136U), its third fragment
    pq.write_table(table.set_column(1, "embedding", pa.array(emb, pa.list_(pa.float32()))), path)
    source = released.open_source(path)
    assert sum(t.num_rows for t in released.iter_normalised(source, str(path), rows=[-12])) == 9
    with pytest.raises(released.ReleasedFormatError, match=r"row 11: embedding has 5 values"):
        list(released.iter_normalised(source, str(path), rows=[136]))


def test_row_checks_sample_files_but_footers_cover_all(tmp_path):
    folder = rf.write_reference_set(tmp_path / "Core-S2RGB-DINOv2", ["136U"], 4, 768, files=4)
    source = released.open_source(folder)
    report = released.check_source(source, sample_rows=10, max_files=2)
    assert report.files == 4 and report.rows == 100 and report.checked_rows == 20
    crs = next(c for c in report.checks if c.name == "geo_crs_declared")
    assert crs.status == "fail" and len(crs.files) == 4

"""What a user sees in the Dagster UI, checked in a real (headless) Chromium.

A small graph is materialised into a temporary DAGSTER_HOME (Core-S2L2A, one grid row, three
384 px cells, tiny random-weights DINOv2): core metadata -> shards -> fragments -> embeddings (with
its checks) -> PCA map. `dagster-webserver` serves it with the project's workspace.yaml and the
pages are rendered by /usr/bin/chromium; every expected value comes from the files on disk, not
from the UI or the materialisation events. Screenshots go to the pytest tmp dir
(`<tmp>/ui_screenshots*/`).
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ui_helpers as ui
from PIL import Image

from majortom_assets import geoparquet
from majortom_assets.defs.checks import CHECK_NAMES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def chromium_installed() -> None:
    """A missing browser is a broken setup, not a reason to pass quietly: fail, saying how to fix it."""
    if not ui.chromium_available():
        pytest.fail(f"{ui.CHROMIUM} is not installed: run `make setup` (it installs the Debian package "
                    "`chromium`), or `apt-get install chromium`", pytrace=False)

SLUG = "dinov2_rgb"
METADATA = f"core / {ui.SOURCE.lower()} / metadata"
SHARDS = f"core / {ui.SOURCE.lower()} / shards"
FRAGMENTS = "fragments / grid_224px"
EMBEDDINGS = f"embeddings / {SLUG}"
PCA = f"maps / {SLUG} / pca"
# an asset key as the UI writes it ("core / s2l2a / shards"), not a truncated one ("maps / di…rgb")
KEY_PATTERN = re.compile(r"(?<![\w…])[a-z0-9_]+(?: / [a-z0-9_]+)+(?![\w…])")


@dataclass(frozen=True)
class Served:
    server: ui.Webserver
    browser: ui.Browser
    home: Path
    shots: Path

    def open(self, path: str, *ready_texts: str, shot: str | None = None) -> ui.Page:
        page = self.browser.goto(self.server.base_url + path, *ready_texts)
        if shot:
            assert_rendered(self.browser.screenshot(self.shots / f"{shot}.png"))
        return page

    @property
    def embeddings_file(self) -> Path:
        return self.home / "embeddings" / ui.MODEL / f"row={ui.ROW}" / "embeddings.parquet"


def assert_rendered(png: Path) -> None:
    """A screenshot of a drawn page: full window size and real content, not a blank canvas."""
    with Image.open(png) as image:
        assert image.width == 1600 and image.height > 600, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, f"{png} looks blank ({len(colours)} colours)"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """One materialised instance, webserver and browser for every page test (startup dominates)."""
    root = tmp_path_factory.mktemp("ui")
    home, dagster_home = ui.materialise_small_graph(root)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ui.dagster_webserver(ui.runtime_env(home, dagster_home), root))
        browser = stack.enter_context(ui.Browser())
        yield Served(server, browser, home, tmp_path_factory.mktemp("ui_screenshots"))


def keys_in(text: str) -> set[str]:
    return set(KEY_PATTERN.findall(text))


def catalog_statuses(text: str) -> dict[str, str]:
    """Catalog text per asset: from its (repeated) key up to the next asset's key."""
    found = list(KEY_PATTERN.finditer(text))
    entries: dict[str, str] = {}
    for i, match in enumerate(found):
        after = found[i + 1].start() if i + 1 < len(found) else len(text)
        if i + 1 < len(found) and found[i + 1].group() == match.group():
            continue  # the key is printed twice (link and tooltip); describe from the last copy
        entries[match.group()] = text[match.end() : after]
    return entries


def test_catalog_lists_the_lineage_with_its_materialisation_status(served):
    served.open("/assets", PCA, "Materialized •", "1,893 partitions", "Never materialized")
    served.browser.wait_for("!document.body.innerText.includes('Loading')", "catalog statuses")
    page = served.browser.page()
    assert_rendered(served.browser.screenshot(served.shots / "catalog.png"))
    entries = catalog_statuses(page.text)
    assert {METADATA, SHARDS, FRAGMENTS, EMBEDDINGS, PCA} <= set(entries), entries
    for key in (METADATA, PCA):
        assert "Materialized •" in entries[key], (key, entries[key])
    for key in (SHARDS, FRAGMENTS, EMBEDDINGS):  # every grid row is a partition; one row is done
        assert "1,893 partitions" in entries[key] and "1,892" in entries[key], (key, entries[key])
    vectors = [k for k in entries if k.startswith(f"vectors / {SLUG} / ")]
    assert vectors and all("Never materialized" in entries[k] for k in vectors), vectors  # not run here
    # MAJORTOM_MODELS=dinov2-rgb: no other model's embeddings or maps in the catalog
    others = {k for k in entries if k.startswith(("embeddings / ", "maps / ")) and SLUG not in k}
    assert not others, others


def test_lineage_runs_shards_fragments_embeddings_maps(served):
    graph = served.open(f"/assets/embeddings/{SLUG}?view=lineage", "grid_224px", shot="lineage")
    for node in ("core", "shards", "fragments", "grid_224px", "embeddings", SLUG, "maps", "pca"):
        assert re.search(rf"\b{node}\b", graph.text), f"lineage graph lacks node/group {node!r}"

    # each asset page names its direct neighbours: the edges of the graph, with direction
    expected = {
        SHARDS: ({METADATA}, {FRAGMENTS, EMBEDDINGS}),
        FRAGMENTS: ({SHARDS}, {EMBEDDINGS}),
        EMBEDDINGS: ({SHARDS, FRAGMENTS}, {PCA}),
        PCA: ({EMBEDDINGS}, set()),
    }
    for key, (upstream, downstream) in expected.items():
        # the lineage section fills in after the page: wait for the neighbours, then compare exactly
        page = served.open(
            "/assets/" + key.replace(" / ", "/"),
            "Upstream assets",
            "Downstream assets",
            *upstream,
            *downstream,
        )
        assert keys_in(page.section("Upstream assets", "Downstream assets")) == upstream, key
        shown_downstream = keys_in(page.section("Downstream assets", "Definition"))
        assert downstream <= shown_downstream, (key, shown_downstream)
        if key != EMBEDDINGS:  # the map is built from embeddings only
            assert PCA not in shown_downstream, (key, shown_downstream)


def test_embeddings_page_shows_the_metadata_a_user_relies_on(served):
    page = served.open(
        f"/assets/embeddings/{SLUG}",
        "weights sha256",
        "Latest check results",
        "Downstream assets",
        shot="embeddings",
    )
    table = page.table()
    info = geoparquet.read_info(served.embeddings_file)
    written = pq.read_table(served.embeddings_file, columns=["unique_id", "product_id", "grid_cell"])
    collection = pq.read_table(served.home / "collections" / f"Core-{ui.SOURCE}" / "metadata.parquet")

    assert table["row"] == ui.ROW
    assert table["model"] == info.model == ui.MODEL
    assert table["weights sha256"] == info.weights_sha256 and len(info.weights_sha256) == 64
    assert table["random weights"] == "true" and info.random_weights
    assert "RANDOMLY INITIALISED" in table["WARNING"]
    assert int(table["samples"]) == collection.num_rows == len(pc.unique(written["product_id"]))
    assert int(table["fragments"]) == written.num_rows
    assert int(table["samples skipped"]) == 0
    assert int(table["embedding dim"]) == info.embedding_dim
    assert table["path"] == str(served.embeddings_file.resolve())
    assert "Latest check results" in page.text and "Latest materialization" in page.text

    # the markdown preview opens in a dialog: the file's first rows, in file order
    preview = ui.show_markdown(served.browser, "preview")
    served.browser.screenshot(served.shots / "embeddings_preview.png")
    header, first = preview.rows[0], preview.rows[1]
    assert header[:2] == ["unique_id", "grid_cell"], header
    shown_id = first[0].removesuffix("…")  # the preview abbreviates long values
    assert len(shown_id) >= 32 and written["unique_id"][0].as_py().startswith(shown_id), first
    assert first[1] == written["grid_cell"][0].as_py()


def test_partition_and_checks_tabs(served):
    partitions = served.open(
        f"/assets/embeddings/{SLUG}?view=partitions&partition={ui.ROW}",
        "Materialized (1)",
        "weights sha256",
        shot="partitions",
    )
    assert "Failed (0)" in partitions.text and "Missing (1892)" in partitions.text  # 1,893 grid rows
    sha = geoparquet.read_info(served.embeddings_file).weights_sha256
    assert f"weights sha256 {sha}" in partitions.text  # the selected row's own materialisation

    checks = served.open(f"/assets/embeddings/{SLUG}?view=checks", *CHECK_NAMES, "Succeeded", shot="checks")
    assert f"Checks ({len(CHECK_NAMES)})" in checks.text
    for name in CHECK_NAMES:
        assert re.search(rf"{name} (?:{name} )?Succeeded", checks.text), f"check {name} not shown as passed"


def test_pca_map_page_renders_the_map_image(served):
    page = served.open(f"/assets/maps/{SLUG}/pca", "explained variance ratio", "Upstream assets")
    table = page.table()
    cells = pq.read_table(served.embeddings_file, columns=["grid_cell"])["grid_cell"]
    png = served.home / "maps" / ui.MODEL / "pca.png"
    preview = served.home / "maps" / ui.MODEL / "pca_preview.png"
    assert int(table["cells"]) == len(pc.unique(cells)) == len(ui.CELLS)
    assert table["png"] == str(png.resolve())

    dialog = ui.show_markdown(served.browser, "map")
    assert_rendered(served.browser.screenshot(served.shots / "pca_map.png"))
    maps = [img for img in dialog.images if img.get("src", "").startswith("data:image/png;base64,")]
    assert len(maps) == 1, dialog.images
    shown = base64.b64decode(maps[0]["src"].split(",", 1)[1])
    assert shown == preview.read_bytes()  # the UI shows exactly the preview file (full map: `png`)
    # and the browser decoded it at the file's size (a broken image has naturalWidth 0)
    decoded = served.browser.evaluate(
        "Array.from(document.querySelector('[role=dialog]').querySelectorAll('img'))"
        ".map(i => [i.naturalWidth, i.naturalHeight])"
    )
    with Image.open(preview) as image:
        assert decoded == [[image.width, image.height]] == [[960, 480]]

"""The published Major TOM embedding sets as external sources in the graph (group ``released``).

Off unless configured: ``MAJORTOM_RELEASED_<NAME>=PATH_OR_URL`` with NAME one of
``S2L1C_SSL4EO``, ``S1RTC_SSL4EO``, ``S2RGB_SIGLIP``, ``S2RGB_DINOV2`` (e.g.
``MAJORTOM_RELEASED_S2RGB_DINOV2=hf://datasets/Major-TOM/Core-S2RGB-DINOv2``; the demo's
``--external`` writes small local stand-ins). For each configured set:

* ``released/<name>``: an observable source asset; observing it records a data version built from
  the files' versions (LFS sha256 / ETag / size+mtime), so a change upstream is visible;
* ``released/<name>/view``: the set's normalised Table 2 view, by grid row, under
  ``$MAJORTOM_HOME/released/<set>-<hash of the URL>/`` (`released.ReleasedView`), the same root
  ``majortom ... --released URL`` uses, ready for every product;
* one asset check per standard check, on the view: a quirk of the published files is a WARN,
  never a failed run.
"""


import hashlib
import json
import os

import dagster as dg

from majortom_assets import released
from majortom_assets.defs import presentation
from majortom_assets.defs.partitions import GRID_ROWS
from majortom_assets.defs.resources import StorageResource
from majortom_assets.remote import redact_url

ENV_PREFIX = "MAJORTOM_RELEASED_"
GROUP = "released"
#: Every check `released.check_source` can report, so the graph shows them before the first run.
QUIRK_CHECKS = (
    "required_columns", "embedding_fixed_size", "embedding_float32", "embedding_lengths_equal",
    "geo_crs_declared", "provenance_metadata", "utm_footprint_follows_pixels", "utm_footprint_axis_order",
    "geometry_antimeridian_valid", "geometry_follows_pixels", "unique_id_verifiable", "unique_id_unique",
    "unique_id_sha256_hex", "timestamp_utc", "grid_ints_match_cell", "normalisable", "preprocessing_as_standard",
)


def env_name(dataset: str) -> str:
    """``Core-S2RGB-DINOv2`` -> ``S2RGB_DINOV2`` (the suffix of its environment variable)."""
    return dataset.removeprefix("Core-").replace("-", "_").upper()


def slug(dataset: str) -> str:
    return dataset.removeprefix("Core-").replace("-", "_").lower()


def configured() -> dict[str, str]:
    """Published set -> configured path/URL, for the sets whose variable is set."""
    out = {}
    for dataset in released.DATASETS:
        url = os.environ.get(ENV_PREFIX + env_name(dataset), "").strip()
        if url:
            out[dataset] = url
    return out


def source_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(["released", slug(dataset)])


def view_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(["released", slug(dataset), "view"])


def _open(dataset: str) -> released.ReleasedSource:
    # The URL is read from the environment when used, so credentials never enter asset config.
    url = os.environ.get(ENV_PREFIX + env_name(dataset), "").strip()
    if not url:
        raise dg.Failure(f"{ENV_PREFIX}{env_name(dataset)} is not set", allow_retries=False)
    return released.open_source(url)


def build_source_asset(dataset: str):
    var = ENV_PREFIX + env_name(dataset)

    @dg.observable_source_asset(
        key=source_key(dataset), group_name=GROUP, kinds={"parquet"},
        description=f"Published {dataset} embeddings (read-only; configured by {var}). "
                    f"{released.DATASETS[dataset].get('known') or ''}".strip(),
        metadata={"model": released.DATASETS[dataset]["model"], "configured by": var},
    )
    def _observe(context) -> dg.ObserveResult:
        source = _open(dataset)
        versions = source.versions()
        digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
        return dg.ObserveResult(
            data_version=dg.DataVersion(digest),
            metadata={"source": redact_url(source.url), "files": len(versions), "model": source.model,
                      "file versions": dg.MetadataValue.md(presentation.markdown_table(
                          _versions_frame(source, versions), limit=20))},
        )

    return _observe


def _versions_frame(source, versions):
    import pandas as pd

    return pd.DataFrame({"file": [source.display(p) for p in versions], "version": list(versions.values())})


def build_view_asset(dataset: str) -> dg.AssetsDefinition:
    check_specs = [dg.AssetCheckSpec(name, asset=view_key(dataset), description=f"released set: {name}")
                   for name in QUIRK_CHECKS]

    @dg.asset(
        key=view_key(dataset), group_name=GROUP, kinds={"geoparquet"}, deps=[source_key(dataset)],
        partitions_def=GRID_ROWS, check_specs=check_specs,
        description=f"{dataset} normalised on read into Table 2 partitions (fixed-size float32 vectors, "
                    "CRS84 geometry from corrected UTM footprints, published ids kept and flagged).",
    )
    def _view(context: dg.AssetExecutionContext, storage: StorageResource):
        source = _open(dataset)
        # the same place `--released URL` uses, so the CLI reuses what the graph built (and back)
        url = os.environ[ENV_PREFIX + env_name(dataset)].strip()
        view = released.ReleasedView(source, released.default_view_root(url, home=storage.layout.root))
        available = released.source_rows(source)
        rows = [r for r in context.partition_keys if r in available]
        written = view.refresh(rows) if rows else []
        report = view.quirks() or released.check_source(source)
        status = {c.name: c for c in report.checks}
        yield dg.MaterializeResult(metadata={
            "rows requested": len(context.partition_keys), "rows in the set": len(rows),
            "row partitions written": len(written),
            "fragments": sum(available.get(r, 0) for r in rows),
            "view root": dg.MetadataValue.path(str(view.root)),
            "checks failed": ", ".join(c.name for c in report.failed) or "none",
        })
        for name in QUIRK_CHECKS:
            check = status.get(name)
            yield dg.AssetCheckResult(
                check_name=name, asset_key=view_key(dataset), severity=dg.AssetCheckSeverity.WARN,
                passed=check is None or check.status != "fail",
                metadata={"status": check.status if check else "not applicable",
                          "detail": (check.detail if check else "") or "-",
                          "files": len(check.files) if check else 0},
            )

    return _view


_CONFIGURED = configured()
released_source_assets = [build_source_asset(d) for d in _CONFIGURED]
released_view_assets = [build_view_asset(d) for d in _CONFIGURED]

"""Asset checks on each model's embedding files (one multi-check per model, built by a factory).

The checks themselves are library code (`majortom_assets.file_check.check_file`, also run by
`majortom embed` on every row file it writes); this module only picks the files and maps each
file's results to Dagster check results with per-row numbers in their metadata.

A check run inside a materialisation checks the rows that run wrote; run on its own it checks
every row file of the model. No file checked is not a pass.
"""

from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.file_check import CHECK_NAMES, DESCRIPTIONS, check_file
from majortom_assets.layout import StoragePathError
from majortom_assets.models.spec import MODEL_SPECS

__all__ = ["CHECK_NAMES", "build_embedding_checks", "embedding_checks", "files_to_check"]


def files_to_check(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, model: str
) -> dict[str, Path]:
    layout = storage.layout
    if context.has_partition_key or context.has_partition_key_range:
        return {row: layout.embeddings_file(model, row) for row in context.partition_keys}
    return {p.parent.name.removeprefix("row="): p for p in layout.embedding_files(model)}


def build_embedding_checks(model: str) -> dg.AssetChecksDefinition:
    spec = MODEL_SPECS[model]
    asset_key = keys.embeddings_key(model)

    @dg.multi_asset_check(
        name=f"{keys.model_slug(model)}_embedding_checks",
        specs=[dg.AssetCheckSpec(name, asset=asset_key, description=DESCRIPTIONS[name]) for name in CHECK_NAMES],
    )
    def _checks(context: dg.AssetCheckExecutionContext, storage: StorageResource):
        try:
            files = files_to_check(context, storage, model)
        except StoragePathError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        missing = sorted(row for row, path in files.items() if not path.exists())
        per_check: dict[str, list[dict]] = {name: [] for name in CHECK_NAMES}
        failing: dict[str, list[str]] = {name: [] for name in CHECK_NAMES}
        for row, path in sorted((r, p) for r, p in files.items() if p.exists()):
            for result in check_file(path, spec.fragment_size, spec.target_overlap):
                per_check[result.name].append({"row": row, "fragments": pq.ParquetFile(path).metadata.num_rows,
                                               **result.metadata,
                                               "problems": "; ".join(result.problems) or "none"})
                if not result.passed:
                    failing[result.name].append(row)
        for name in CHECK_NAMES:
            yield dg.AssetCheckResult(
                check_name=name,
                asset_key=asset_key,
                passed=bool(per_check[name]) and not failing[name] and not missing,
                metadata={
                    "rows checked": len(per_check[name]),
                    "failing rows": ", ".join(failing[name]) or "none",
                    "missing files": ", ".join(missing) or "none",
                    "per row": dg.MetadataValue.md(presentation.markdown_table(per_check[name], limit=50)),
                },
            )

    return _checks


embedding_checks = [build_embedding_checks(model) for model in load_settings().models]

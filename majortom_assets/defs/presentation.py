"""How materialisations look in the UI: markdown tables, file sizes, embedded images."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from majortom_assets.core import SampleFailure, shorten_reason

_MAX_CELL_CHARS = 60


def _cell(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif hasattr(value, "__len__") and not isinstance(value, str) and len(value) > 4:
        text = f"[{', '.join(_cell(v) for v in list(value)[:3])}, … ({len(value)})]"
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= _MAX_CELL_CHARS else text[: _MAX_CELL_CHARS - 1] + "…"


def markdown_table(frame: pd.DataFrame | Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """The first `limit` rows as a markdown table (binary and long values abbreviated)."""
    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(list(frame))
    if frame.empty:
        return "_(no rows)_"
    head = frame.head(limit)
    lines = ["| " + " | ".join(map(str, head.columns)) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in head.itertuples(index=False)]
    if len(frame) > limit:
        lines.append(f"\n_{len(frame) - limit} more rows_")
    return "\n".join(lines)


def failures_markdown(failures: Sequence[SampleFailure], limit: int = 50) -> str:
    """Skipped samples (`core.SampleFailure`) with their stage and reason.

    Reasons are shortened only in the middle (`core.shorten_reason`), so the band, file and
    sample named by a SampleError always show; an explicit 'none' keeps an empty table clear.
    """
    if not failures:
        return "_none: every sample was processed_"

    def field(failure: SampleFailure, name: str) -> str:
        return str(getattr(failure, name)).replace("|", "\\|").replace("\n", " ")

    lines = ["| product_id | grid_cell | stage | reason |", "|---|---|---|---|"]
    lines += [f"| {field(f, 'product_id')} | {field(f, 'grid_cell')} | {field(f, 'stage')} | "
              f"{shorten_reason(field(f, 'reason'))} |" for f in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"\n_{len(failures) - limit} more in the failures table_")
    return "\n".join(lines)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def file_metadata(path: Path, label: str = "path") -> dict[str, Any]:
    size = _size(path)
    return {label: dg.MetadataValue.path(str(path)), f"{label} size (MB)": round(size / 1e6, 3)}


def png_markdown(png_path: Path, title: str, caption: str | None = None) -> dg.MetadataValue:
    """The PNG itself inline (base64 data URI) so the UI shows the map without file access.

    Pass a preview sized for the UI's dialog (about 1200 px wide): Dagster shows the image at its
    natural size, so a wider one is cut off. `caption` (plain text) goes under the image.
    """
    data = base64.b64encode(png_path.read_bytes()).decode("ascii")
    text = f"![{title}](data:image/png;base64,{data})"
    if caption:
        text += "\n\n" + caption.replace("\n", " ")
    return dg.MetadataValue.md(text)

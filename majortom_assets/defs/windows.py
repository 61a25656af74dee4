"""`timeseries/<model>/window_change`: change of every cell between two time windows of any length.

The windows are run configuration (`WindowChangeConfig`), checked before any file is read: two
``START/END`` day ranges, the unit (cell or fragment), the centre statistic and the threshold.
Left empty, the windows are the first and second half of the days the model's embeddings cover.
Library: `majortom_assets.vectors.windows` (definitions of spread and change score). No
``from __future__ import annotations`` here: Dagster reads the Config annotation at definition time.
"""

from typing import Literal

import dagster as dg
from pydantic import Field, field_validator, model_validator

from majortom_assets.defs import keys, presentation
from majortom_assets.defs.resources import StorageResource, load_settings
from majortom_assets.defs.vectors import any_random_weights, embedding_files, embeddings_product

TOP_CHANGED = 10


class WindowChangeConfig(dg.Config):
    """Two windows to compare; e.g. window_a='2021-06-01/2021-08-31', window_b='2022-06-01/2022-08-31'."""

    window_a: str | None = Field(default=None, description="first window START/END (days, both included); "
                                 "empty: the first half of the data's days")
    window_b: str | None = Field(default=None, description="second window START/END; empty: the second half")
    level: Literal["cell", "fragment"] = Field(default="cell", description="unit compared")
    statistic: Literal["mean", "median"] = Field(default="mean", description="window centre")
    threshold: float = Field(default=4.0, gt=0, description="change_score above which a unit counts as changed")

    @field_validator("window_a", "window_b")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        from majortom_assets.vectors.windows import TimeWindow

        return None if value in (None, "") else TimeWindow.parse(value).label

    @model_validator(mode="after")
    def _both_or_neither(self) -> "WindowChangeConfig":
        if (self.window_a is None) != (self.window_b is None):
            raise ValueError("give both window_a and window_b, or neither (then the data's two halves)")
        return self


def _halves(files):
    """The first and second half of the days between the earliest and latest acquisition."""
    import pyarrow.parquet as pq

    from majortom_assets.vectors import files as vfiles
    from majortom_assets.vectors.windows import TimeWindow

    lo, hi = None, None
    for path in files:
        t = vfiles.timestamps_ns(pq.read_table(path, columns=["timestamp"]).column("timestamp"))
        if len(t):
            lo = t.min() if lo is None else min(lo, t.min())
            hi = t.max() if hi is None else max(hi, t.max())
    if lo is None or lo.astype("datetime64[D]") == hi.astype("datetime64[D]"):
        return None     # a single day: nothing to compare until a second acquisition arrives
    days = lo.astype("datetime64[D]"), hi.astype("datetime64[D]")
    mid = days[0] + (days[1] - days[0]) // 2
    return (TimeWindow.parse(f"{days[0]}/{mid}"), TimeWindow.parse(f"{mid + 1}/{days[1]}"))


def build_window_change_asset(model: str) -> dg.AssetsDefinition:
    @embeddings_product(
        model, keys.window_change_key(model), group="timeseries", kinds={"parquet"},
        description=f"Change of each {model} cell between two time windows set in the run config "
        "(window mean or median, acquisitions, spread, change score relative to the windows' own spread).",
    )
    def _window_change(context: dg.AssetExecutionContext, config: WindowChangeConfig,
                       storage: StorageResource) -> dg.MaterializeResult:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING, atomic_output
        from majortom_assets.vectors import windows

        files = embedding_files(storage, model)
        if config.window_a is None:
            halves = _halves(files)
        else:
            halves = windows.TimeWindow.parse(config.window_a), windows.TimeWindow.parse(config.window_b)
        if halves is None:
            day = windows.TimeWindow.parse("1970-01-01/1970-01-01")   # nothing matches: an empty result
            a = b = day
            frame = windows.compare_windows(files, day, day)
            note = "_the embeddings cover a single day: nothing to compare yet (set window_a/window_b)_"
        else:
            a, b = halves
            frame = windows.compare_windows(files, a, b, level=config.level, statistic=config.statistic,
                                            threshold=config.threshold)
            note = None
        path = storage.layout.window_change_file(model)
        table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata({
            b"majortom:windows": f"{a.label} vs {b.label}; level={config.level}; "
                                 f"statistic={config.statistic}".encode()})
        with atomic_output(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        top = frame.head(TOP_CHANGED).drop(columns=["window_a", "window_b"])
        md = presentation.markdown_table(top.round(4), limit=TOP_CHANGED) if len(frame) else \
            (note or f"_no {config.level} has acquisitions in both {a.label} and {b.label}_")
        random_weights = any_random_weights(files)
        if random_weights:
            md = f"**{RANDOM_WEIGHTS_WARNING}**\n\n{md}"
        context.log.info(f"{model}: {a.label} vs {b.label}: {len(frame)} {config.level}s compared")
        return dg.MaterializeResult(metadata={
            "window a": a.label if note is None else "none",
            "window b": b.label if note is None else "none",
            "level": config.level,
            "statistic": config.statistic,
            "compared": len(frame),
            "changed": int(frame["changed"].sum()) if len(frame) else 0,
            "threshold": config.threshold,
            "most changed": dg.MetadataValue.md(md),
            "random weights": random_weights,
            **presentation.file_metadata(path),
        })

    return _window_change


window_assets = [build_window_change_asset(model) for model in load_settings().models]

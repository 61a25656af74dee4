"""Batched inference: Core samples -> fragments -> embeddings -> Table 2 rows.

Pipeline (one call of `embed_samples`):

1. a thread pool reads, decodes and checks samples ahead of the model (`prefetch_samples` in
   flight) and copies each sample's fragments into one reusable host buffer: raw uint16/float32
   in pinned memory for CUDA, already converted and normalised in place for CPU;
2. the main thread fills model batches from those buffers regardless of cell boundaries, copies
   them to the device (non-blocking; CUDA normalises there) and runs the model under
   `torch.inference_mode` (+ autocast on CUDA, channels-last for CNNs), halving the batch on
   CUDA out-of-memory;
3. once all fragments of a sample are embedded, a finisher thread builds its Table 2 rows
   (footprints, unique ids) while the device works on the next batch.

Results come out in metadata order. A sample that cannot be read, has invalid values or cannot
be fragmented becomes a `SampleFailure`; the others go on.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from majortom_assets import geoparquet
from majortom_assets.compute import MAX_BATCH_SIZE, EngineConfig, Precision  # noqa: F401 (re-exported)
from majortom_assets.core import (
    REQUIRED_METADATA_COLUMNS,
    BandSizeError,
    CoreCollection,
    CoreSample,
    SampleError,
    SampleFailure,
    failures_from_table,
    failures_table,
)
from majortom_assets.fragment import FragmentLayout, fragment_layout, gather_fragments
from majortom_assets.models import Embedder, ModelSpec, find_invalid_values
from majortom_assets.standard import CORE_IMAGE_SIZE

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_DTYPES = {np.dtype(np.uint16): torch.uint16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16}


# Embedding files: rows sorted by grid row, column and time, in row groups this small, so a point
# or area look-up (vectors/extract.py) reads only the row groups its cells' statistics select.
EMBEDDING_ROW_GROUP_ROWS = 1024
_LOCALITY_ORDER = ["grid_row_u", "grid_col_r", "timestamp"]


@dataclass
class EmbedStats:
    samples: int = 0           # samples embedded
    fragments: int = 0         # rows written
    failures: list[SampleFailure] = field(default_factory=list)
    seconds: float = 0.0
    cells_per_s: float = 0.0
    device: str = "cpu"
    batch_size: int = 0        # final batch size (smaller than configured after OOM halving)
    precision: str = "fp32"
    kept_existing: bool = False  # every sample failed and an existing file was left as it was

    def add(self, item: pa.Table | SampleFailure) -> None:
        if isinstance(item, SampleFailure):
            self.failures.append(item)
        else:
            self.samples += 1
            self.fragments += item.num_rows

    def finish(self, started: float) -> EmbedStats:
        self.seconds = time.perf_counter() - started
        self.cells_per_s = self.samples / self.seconds if self.seconds > 0 else 0.0
        return self


@dataclass
class _Prepared:
    """A decoded sample's fragments, waiting in a host buffer for the model."""

    row: Mapping[str, Any]
    crs: str
    transform: tuple[float, ...]
    timestamp: Any
    boxes: np.ndarray
    buffer: torch.Tensor           # (N, C, s, s): CUDA raw values in pinned memory, CPU model input
    embeddings: np.ndarray         # (N, dim) float32, filled batch by batch
    result: Future | None = None   # the finisher's Table 2 rows, once every fragment is embedded


class _BufferPool:
    """Reuses fragment buffers of the common shape: pinning host memory costs milliseconds per MB."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        stack = self._free.get((shape, dtype))
        if stack:
            try:
                return stack.pop()
            except IndexError:  # another thread took the last one
                pass
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        self._free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)


def _row_value(row: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = row.get(name, default)
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _size_reason(exc: BandSizeError, fragment: int) -> str:
    """'too small' when the band covers less than one fragment, else 'wrong size'."""
    if exc.side_10m < fragment:
        return (f"too small: sample is {exc.side_10m} px at 10 m, smaller than the fragment "
                f"({fragment} px): {exc}")
    return f"wrong size: {exc}"


def read_for_fragments(collection: CoreCollection, spec: ModelSpec, image_size: int, row: Mapping[str, Any]
                       ) -> tuple[CoreSample, FragmentLayout] | SampleFailure:
    """Read, decode and check one sample for `spec`; its fragment layout, or why it is skipped.

    The one place that turns read/decode/value/size problems into failures, for decode threads
    and decode processes alike.
    """
    product_id, grid_cell = str(row.get("product_id")), str(row.get("grid_cell"))
    try:
        sample = collection.read_sample(row, spec.bands, size=image_size, max_workers=1)
    except BandSizeError as exc:
        return SampleFailure(product_id, grid_cell, _size_reason(exc, spec.fragment_size), "decode")
    except SampleError as exc:
        return SampleFailure(product_id, grid_cell, f"read failed: {exc}", "decode")
    except Exception as exc:  # noqa: BLE001 -- an unreadable sample must not stop the others
        return SampleFailure(product_id, grid_cell, f"read failed: {type(exc).__name__}: {exc}", "decode")
    pixels = sample.pixels
    invalid = find_invalid_values(pixels, spec.normalisation, spec.bands)
    if invalid:
        return SampleFailure(product_id, grid_cell, f"invalid values: {invalid}", "invalid values")
    try:
        layout: FragmentLayout = fragment_layout(
            pixels.shape[-2], pixels.shape[-1], spec.fragment_size, spec.target_overlap
        )
    except ValueError as exc:
        return SampleFailure(product_id, grid_cell, f"cannot fragment: {exc}", "fragment")
    return sample, layout


class _Run:
    """State of one `embed_samples` call."""

    def __init__(self, collection: CoreCollection, embedder: Embedder, config: EngineConfig) -> None:
        self.collection = collection
        self.embedder = embedder
        self.config = config
        self.spec = embedder.spec
        self.device = config.resolve_device()
        self.precision = config.resolve_precision(self.device)
        self.batch_size = config.batch_size
        self.cuda = self.device.type == "cuda"
        self.decoders: ThreadPoolExecutor | None = None
        self.processes = None
        if config.decode_processes:
            from majortom_assets.decode_processes import ProcessPreparer

            self.processes = ProcessPreparer(self, config.decode_processes)
            self.pool = self.processes.slots
        else:
            self.pool = _BufferPool(pin=self.cuda)
        self._staging: torch.Tensor | None = None
        self.channels_last = config.channels_last and embedder.prefers_channels_last
        embedder.to(self.device)
        if self.channels_last:
            embedder.to(memory_format=torch.channels_last)
        embedder.eval()

    # ---- stage 1: background threads (or worker processes: decode_processes.py)
    def submit(self, row: Mapping[str, Any]) -> Future:
        """Start preparing a sample; the future's result is a `_Prepared` or a `SampleFailure`."""
        if self.processes is not None:
            return self.processes.submit(row)
        return self.decoders.submit(self.prepare, row)

    def prepare(self, row: Mapping[str, Any]) -> _Prepared | SampleFailure:
        read = read_for_fragments(self.collection, self.spec, self.config.image_size, row)
        if isinstance(read, SampleFailure):
            return read
        sample, layout = read
        pixels = sample.pixels
        shape = (layout.count, pixels.shape[0], layout.fragment_size, layout.fragment_size)
        # CPU: convert to float32 here, in parallel, so the model thread only normalises in place;
        # CUDA: keep the raw dtype (uint16 is half the bytes to transfer) and widen on the device.
        dtype = _TORCH_DTYPES[pixels.dtype] if self.cuda else torch.float32
        buffer = self.pool.take(shape, dtype)
        if self.cuda:
            gather_fragments(pixels, layout, out=buffer.numpy())
        else:
            self._gather_normalised(pixels, layout, buffer)
        return self.prepared(row, sample.crs, sample.transform, sample.timestamp, layout.boxes, buffer)

    def prepared(self, row: Mapping[str, Any], crs: str, transform: tuple[float, ...], timestamp: Any,
                 boxes: np.ndarray, buffer: torch.Tensor) -> _Prepared:
        return _Prepared(
            row=row, crs=crs, transform=transform, timestamp=timestamp, boxes=boxes, buffer=buffer,
            embeddings=np.empty((buffer.shape[0], self.embedder.embedding_dim), dtype=np.float32),
        )

    def _gather_normalised(self, pixels: np.ndarray, layout: FragmentLayout, buffer: torch.Tensor) -> None:
        """CPU: copy (+ widen to float32) all fragments, then normalise the buffer in place.

        One whole-buffer normalise: normalising fragment by fragment while it is still in cache
        saved ~2.5 ms/cell single-threaded, but 50 small torch calls per cell cost far more when
        torch's intra-op threads compete for a loaded CPU (docs/benchmarks.md, "Embedding engine").
        """
        gather_fragments(pixels, layout, out=buffer.numpy())
        normalised = self.embedder.preprocess(buffer, inplace=True)
        if normalised.data_ptr() != buffer.data_ptr():
            buffer.copy_(normalised)

    def finish(self, prepared: _Prepared) -> pa.Table | SampleFailure:
        row = prepared.row
        product_id, grid_cell = str(row["product_id"]), str(row["grid_cell"])
        try:
            return geoparquet.sample_table(
                prepared.embeddings, grid_cell=grid_cell, product_id=product_id,
                timestamp=prepared.timestamp, crs=prepared.crs, transform=prepared.transform,
                boxes=prepared.boxes, grid_row_u=_row_value(row, "grid_row_u"),
                grid_col_r=_row_value(row, "grid_col_r"), expected_dim=self.embedder.embedding_dim,
            )
        except ValueError as exc:
            return SampleFailure(product_id, grid_cell, f"output rows: {exc}", "output rows")

    # ---- stage 2: the model
    def _device_input(self, parts: list[tuple[_Prepared, int, int]]) -> torch.Tensor:
        """The batch's fragments on the device (raw on CUDA, already normalised on CPU)."""
        first = parts[0][0].buffer
        if len(parts) == 1 and not self.cuda:
            _, lo, hi = parts[0]
            return first[lo:hi]
        n = sum(hi - lo for _, lo, hi in parts)
        shape = (self.config.batch_size, *first.shape[1:])
        if self._staging is None or self._staging.shape != shape or self._staging.dtype != first.dtype:
            # reused: a fresh 100+ MB tensor per batch costs more in page faults than the copy itself
            self._staging = torch.empty(shape, dtype=first.dtype, device=self.device)
        raw = self._staging[:n]
        offset = 0
        for p, lo, hi in parts:  # pinned source: asynchronous copies, finished before the output comes back
            raw[offset : offset + hi - lo].copy_(p.buffer[lo:hi], non_blocking=True)
            offset += hi - lo
        return raw

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs for x, split into chunks of the current batch size; halves it on CUDA OOM."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < x.shape[0]:
            chunk = x[start : start + self.batch_size]
            try:
                if self.precision == "fp32":
                    y = self.embedder(chunk)
                else:
                    with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision]):
                        y = self.embedder(chunk)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                continue
            outputs.append(y.float())
            start += chunk.shape[0]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @torch.inference_mode()
    def run_batch(self, parts: list[tuple[_Prepared, int, int]]) -> None:
        x = self._device_input(parts)
        if self.cuda:
            x = self.embedder.preprocess(x, inplace=True)  # the staging tensor is ours
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._forward(x).cpu().numpy()
        offset = 0
        for p, lo, hi in parts:
            p.embeddings[lo:hi] = out[offset : offset + hi - lo]
            offset += hi - lo


def _records(metadata: pd.DataFrame) -> Iterator[dict[str, Any]]:
    """Metadata rows as dicts, lazily (a whole-archive frame would not fit as a list of dicts)."""
    missing = [c for c in REQUIRED_METADATA_COLUMNS if c not in metadata.columns]
    if missing:
        raise ValueError(f"metadata lacks column(s) {missing}; pass rows of CoreCollection.metadata()")
    columns = list(metadata.columns)
    return (dict(zip(columns, values, strict=True)) for values in metadata.itertuples(index=False, name=None))


def embed_samples(
    collection: CoreCollection, metadata: pd.DataFrame, embedder: Embedder, config: EngineConfig | None = None
) -> Iterator[pa.Table | SampleFailure]:
    """One Table 2 table (or SampleFailure) per metadata row, in metadata order.

    The embedder is moved to the configured device. Consumers may stop early: background work
    is cancelled when the generator is closed.
    """
    config = config or EngineConfig()
    run = _Run(collection, embedder, config)
    yield from _pipeline(run, _records(metadata))


def _pipeline(run: _Run, rows: Iterator[dict[str, Any]]) -> Iterator[pa.Table | SampleFailure]:
    config = run.config
    if run.processes is None:
        run.decoders = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="majortom-prepare")
    finisher = ThreadPoolExecutor(1, thread_name_prefix="majortom-finish")
    upcoming: deque[Future] = deque()
    outbox: deque[_Prepared | SampleFailure] = deque()   # metadata order
    parts: list[tuple[_Prepared, int, int]] = []       # the batch being filled
    filled = 0

    def refill() -> None:
        while len(upcoming) < config.prefetch_samples:
            row = next(rows, None)
            if row is None:
                return
            upcoming.append(run.submit(row))

    def flush() -> None:
        nonlocal parts, filled
        if not parts:
            return
        run.run_batch(parts)
        for p, _, hi in parts:
            if hi == p.buffer.shape[0]:  # the sample's last fragments: its buffer is free again
                run.pool.give(p.buffer)
                p.result = finisher.submit(run.finish, p)
        parts, filled = [], 0

    def ready(wait: bool = False) -> Iterator[pa.Table | SampleFailure]:
        while outbox:
            head = outbox[0]
            if isinstance(head, _Prepared):
                if head.result is None or not (wait or head.result.done()):
                    return
                outbox.popleft()
                yield head.result.result()
            else:
                yield outbox.popleft()

    try:
        refill()
        while upcoming:
            prepared = upcoming.popleft().result()
            refill()
            if isinstance(prepared, SampleFailure):
                outbox.append(prepared)
            else:
                outbox.append(prepared)
                count, lo = prepared.buffer.shape[0], 0
                while lo < count:
                    take = min(count - lo, run.batch_size - filled)
                    parts.append((prepared, lo, lo + take))
                    filled += take
                    lo += take
                    if filled >= run.batch_size:
                        flush()
            yield from ready()
        flush()
        yield from ready(wait=True)
    finally:
        for future in upcoming:
            future.cancel()
        if run.decoders is not None:
            run.decoders.shutdown(wait=True, cancel_futures=True)
        finisher.shutdown(wait=True, cancel_futures=True)
        if run.processes is not None:
            run.processes.close()


def file_info(embedder: Embedder, source_collection: str, **extra: Any) -> geoparquet.EmbeddingFileInfo:
    """Provenance for an embedding file: model, weights identity and the random-weights flag."""
    weights = embedder.weights
    return geoparquet.EmbeddingFileInfo(
        model=embedder.spec.name,
        weights=weights.name,
        weights_sha256=weights.sha256,
        random_weights=weights.random,
        embedding_dim=embedder.embedding_dim,
        fragment_size=embedder.spec.fragment_size,
        target_overlap=embedder.spec.target_overlap,
        source_collection=source_collection,
        extra={
            "weights_source": weights.source,
            "tiny_model": embedder.tiny,
            "reference_compatible": embedder.reference_compatible,
            "normalisation": embedder.spec.normalisation,
            "bands": list(embedder.spec.bands),
            **extra,
        },
    )


class _KeepExisting(Exception):
    """Raised inside the write when every sample failed and a file already exists."""


def embed_to_file(
    collection: CoreCollection,
    metadata: pd.DataFrame,
    embedder: Embedder,
    config: EngineConfig | None,
    out_path: str | Path,
    source_collection: str | None = None,
    *,
    on_result: Callable[[pa.Table | SampleFailure], None] | None = None,
) -> EmbedStats:
    """Embed `metadata`'s samples into one GeoParquet file, written atomically.

    When every sample fails, an existing file at `out_path` (a good earlier run) is left
    untouched and ``stats.kept_existing`` is set: a rerun with an unreadable shard or a wrong image
    size must never replace good rows with nothing. Without an existing file an empty one is
    written, so a partition always has a result; the failures are in the returned stats.
    `on_result` sees every table / failure (progress).
    """
    config = config or EngineConfig()
    started = time.perf_counter()
    run = _Run(collection, embedder, config)
    stats = EmbedStats(device=str(run.device), precision=run.precision)
    info = file_info(
        embedder, source_collection or collection.url, device=str(run.device), precision=run.precision,
    )

    if all(c in metadata.columns for c in _LOCALITY_ORDER):
        metadata = metadata.sort_values(_LOCALITY_ORDER, kind="stable")

    def tables() -> Iterator[pa.Table]:
        for item in _pipeline(run, _records(metadata)):
            stats.add(item)
            if on_result is not None:
                on_result(item)
            if not isinstance(item, SampleFailure):
                yield item
        if stats.samples == 0 and stats.failures and Path(out_path).exists():
            raise _KeepExisting   # aborts the atomic write: the temp file goes, the old file stays

    try:
        geoparquet.write_embeddings(out_path, tables(), info, row_group_size=EMBEDDING_ROW_GROUP_ROWS)
    except _KeepExisting:
        stats.kept_existing = True
    stats.batch_size = run.batch_size
    return stats.finish(started)


def write_failures(path: str | Path, failures: list[SampleFailure]) -> Path:
    """Skipped samples as a small Parquet table (product_id, grid_cell, stage, reason), written atomically."""
    import pyarrow.parquet as pq

    with geoparquet.atomic_output(path) as tmp:
        pq.write_table(failures_table(failures), tmp)
    return Path(path)


def read_failures(path: str | Path) -> list[SampleFailure]:
    """A failures table written by `write_failures` (or `mirror.copy_samples`); [] if there is none."""
    path = Path(path)
    return failures_from_table(geoparquet.read_table(path)) if path.exists() else []


__all__ = [
    "CORE_IMAGE_SIZE",
    "EmbedStats",
    "EngineConfig",
    "SampleFailure",
    "embed_samples",
    "embed_to_file",
    "failures_table",
    "file_info",
    "read_failures",
    "write_failures",
]

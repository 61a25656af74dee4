"""The engine's prepare stage in worker processes, writing fragments straight into shared memory.

Why: reading a row group, inflating 13 GeoTIFF bands, upsampling and gathering fragments costs
~50-90 ms of CPU per S2 cell, and part of it holds the GIL (per-strip Python loops, numpy copies,
Arrow), so decode threads stop scaling at about two cores (docs/benchmarks.md, "Decode scaling").
A GPU that embeds 150+ cells/s needs ~8-14 cores of preparation: that takes processes.

How: the main process owns a pool of shared-memory slots, each one sample's fragment buffer
(``(N, C, s, s)``; raw dtype for CUDA -- page-locked with ``cudaHostRegister`` so the device copy
is asynchronous straight from it -- or normalised float32 for CPU). For each metadata row it takes
a slot and sends (row, slot name) to a worker; the worker reads and checks the sample with the
engine's own ``read_for_fragments`` and gathers the fragments into the slot; only the small
result (CRS, transform, timestamp, fragment boxes, or a ``SampleFailure``) is pickled back. The
slot returns to the pool once the model has embedded its last fragment, exactly like the
thread path's buffers.

Workers start from a fork server preloaded with this module (fast starts, no CUDA state
inherited); a worker that dies (a decoder crash) costs only the sample it was working on: the pool
is rebuilt and the other samples in flight are retried once.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from majortom_assets.core import SampleFailure, output_dtype
from majortom_assets.fragment import fragment_layout, gather_fragments

if TYPE_CHECKING:  # pragma: no cover
    from majortom_assets.engine import _Run

_SHM_DIR = "/dev/shm"


class SharedSlots:
    """Fragment buffers in named shared memory, reused like the engine's ``_BufferPool``.

    ``take``/``give`` have the pool's signature; ``name_of`` tells a worker which segment to
    open. Slots are page-locked for CUDA when the driver allows it (asynchronous copies); a
    failed registration only makes the copies synchronous.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._segments: dict[int, tuple[shared_memory.SharedMemory, bool]] = {}   # data_ptr -> (segment, pinned)
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            stack = self._free.get((tuple(shape), dtype))
            if stack:
                return stack.pop()
        return self._create(tuple(shape), dtype)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)

    def name_of(self, buffer: torch.Tensor) -> str:
        return self._names[buffer.data_ptr()]

    def _create(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        _check_room(nbytes)
        segment = shared_memory.SharedMemory(create=True, size=nbytes)
        array = np.ndarray(shape, dtype=_NUMPY_DTYPES[dtype], buffer=segment.buf)
        tensor = torch.from_numpy(array)
        pinned = False
        if self.pin:
            try:
                pinned = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)) == 0
            except Exception:  # noqa: BLE001 -- no registration: copies are synchronous, still correct
                pinned = False
        with self._lock:
            self._segments[tensor.data_ptr()] = (segment, pinned)
            self._names[tensor.data_ptr()] = segment.name
        return tensor

    @property
    def pinned(self) -> bool:
        return any(p for _, p in self._segments.values())

    def close(self) -> None:
        """Unregister, close and unlink every segment (the workers have closed theirs)."""
        with self._lock:
            segments, self._segments, self._free, self._names = self._segments, {}, {}, {}
        for ptr, (segment, pinned) in segments.items():
            if pinned:
                try:
                    torch.cuda.cudart().cudaHostUnregister(ptr)
                except Exception:  # noqa: BLE001,S110 -- the segment goes anyway
                    pass
            try:
                segment.close()
            except BufferError:   # a tensor still views it: the mapping goes when that tensor does
                pass
            segment.unlink()


_NUMPY_DTYPES = {torch.uint16: np.uint16, torch.float32: np.float32, torch.uint8: np.uint8,
                 torch.int16: np.int16}


def _check_room(nbytes: int) -> None:
    """Shared memory beyond /dev/shm's size is a SIGBUS on first write: refuse it up front."""
    try:
        stat = os.statvfs(_SHM_DIR)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if free < nbytes * 2:
        raise MemoryError(f"decode processes need {nbytes / 2**20:.0f} MiB more shared memory for a fragment "
                          f"buffer but {_SHM_DIR} has {free / 2**20:.0f} MiB free; enlarge it (docker "
                          f"--shm-size) or use decode_processes=0 (threads)")


# ---- worker side ----------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(collection, spec_name: str, image_size: int, cuda: bool, reference_compatible: bool) -> None:
    from majortom_assets.models import get_normaliser, get_spec

    torch.set_num_threads(1)   # the workers are the parallelism; torch's own threads would oversubscribe
    spec = get_spec(spec_name)
    _WORKER.update(collection=collection, spec=spec, image_size=image_size, cuda=cuda, slots={},
                   normalise=None if cuda else get_normaliser(spec.normalisation,
                                                              reference_compatible=reference_compatible))


def _slot(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The main process's segment, mapped once per worker (plain mmap: no resource tracker)."""
    slots = _WORKER["slots"]
    array = slots.get(name)
    if array is None:
        with open(os.path.join(_SHM_DIR, name), "r+b") as handle:
            mapping = mmap.mmap(handle.fileno(), 0)
        array = slots[name] = np.ndarray(shape, dtype=dtype, buffer=mapping)
    return array


def _prepare_in_worker(row: dict[str, Any], name: str, shape: tuple[int, ...], dtype: str
                       ) -> SampleFailure | tuple[str, tuple[float, ...], Any, np.ndarray]:
    from majortom_assets.engine import read_for_fragments

    read = read_for_fragments(_WORKER["collection"], _WORKER["spec"], _WORKER["image_size"], row)
    if isinstance(read, SampleFailure):
        return read
    sample, layout = read
    out = _slot(name, shape, dtype)
    if out.shape[0] != layout.count:
        return SampleFailure(str(row.get("product_id")), str(row.get("grid_cell")),
                             f"cannot fragment: {layout.count} fragments, the engine expected {out.shape[0]}",
                             "fragment")
    gather_fragments(sample.pixels, layout, out=out)
    if not _WORKER["cuda"]:   # CPU runs take normalised float32, as the thread path produces
        tensor = torch.from_numpy(out)
        normalised = _WORKER["normalise"](tensor, True)
        if normalised.data_ptr() != tensor.data_ptr():
            tensor.copy_(normalised)
    return sample.crs, sample.transform, sample.timestamp, np.array(layout.boxes)


# ---- main side ------------------------------------------------------------------------------
def worker_context(start: bool = False):
    """The fork server the workers come from, preloaded with the engine (spawn where there is none).

    ``start=True`` launches the server now, so its imports overlap other work instead of delaying
    the first run's first samples.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "majortom_assets.engine"])
    if start:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return context


class _Pending:
    """A row being prepared by a worker; ``result()`` is the engine's ``_Prepared`` or a failure."""

    def __init__(self, owner: ProcessPreparer, row: dict[str, Any], buffer: torch.Tensor, attempt: int = 0) -> None:
        self.owner, self.row, self.buffer, self.attempt = owner, row, buffer, attempt
        self.future, self.executor = owner._send(row, buffer)

    def cancel(self) -> bool:
        cancelled = self.future.cancel()
        if cancelled:
            self.owner.slots.give(self.buffer)
        return cancelled

    def result(self):
        try:
            out = self.future.result()
        except BrokenProcessPool:
            # a worker died (a decoder crash): that sample fails, the others are retried once
            self.owner._restart(self.executor)
            if self.attempt == 0:
                self.future, self.executor = self.owner._send(self.row, self.buffer)
                self.attempt = 1
                return self.result()
            out = SampleFailure(str(self.row.get("product_id")), str(self.row.get("grid_cell")),
                                "decode worker process died while preparing this sample", "decode")
        except Exception as exc:  # noqa: BLE001 -- e.g. an unpicklable row: this sample only
            out = SampleFailure(str(self.row.get("product_id")), str(self.row.get("grid_cell")),
                                f"decode worker failed: {type(exc).__name__}: {exc}", "decode")
        if isinstance(out, SampleFailure):
            self.owner.slots.give(self.buffer)
            return out
        crs, transform, timestamp, boxes = out
        return self.owner.run.prepared(self.row, crs, transform, timestamp, boxes, self.buffer)


class ProcessPreparer:
    """`decode_processes` worker processes preparing samples for one engine run."""

    def __init__(self, run: _Run, processes: int) -> None:
        self.run = run
        self.processes = processes
        self.slots = SharedSlots(pin=run.cuda)
        spec, size = run.spec, run.config.image_size
        layout = fragment_layout(size, size, spec.fragment_size, spec.target_overlap)
        raw = np.dtype(output_dtype(spec.bands))
        self.dtype = raw if run.cuda else np.dtype(np.float32)
        self.shape = (layout.count, len(spec.bands), spec.fragment_size, spec.fragment_size)
        self.torch_dtype = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}[self.dtype]
        self._initargs = (run.collection, spec.name, size, run.cuda, run.embedder.reference_compatible)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _context(self):
        return worker_context()

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(self.processes, mp_context=self._context(),
                                                     initializer=_init_worker, initargs=self._initargs)
            return self._executor

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        """Drop a broken pool (once, however many of its futures report it); the next send starts one."""
        with self._lock:
            if self._executor is not broken:
                return
            self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    def _send(self, row: dict[str, Any], buffer: torch.Tensor) -> tuple[Future, ProcessPoolExecutor]:
        executor = self._pool()
        try:
            future = executor.submit(_prepare_in_worker, row, self.slots.name_of(buffer), self.shape, self.dtype.str)
        except BrokenProcessPool:   # broke since it was handed out: one fresh pool
            self._restart(executor)
            executor = self._pool()
            future = executor.submit(_prepare_in_worker, row, self.slots.name_of(buffer), self.shape, self.dtype.str)
        return future, executor

    def submit(self, row: dict[str, Any]) -> _Pending:
        return _Pending(self, row, self.slots.take(self.shape, self.torch_dtype))

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self.slots.close()


__all__ = ["ProcessPreparer", "SharedSlots", "worker_context"]

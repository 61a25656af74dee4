"""The GPU check: every headline number of the platform in one run that fits eight minutes.

    python benchmarks/gpu_check.py --out-dir OUT             # on the GPU machine (gpu_check.sh)
    python benchmarks/gpu_check.py --out-dir OUT --device cpu --quick   # rehearsal (tests)

Per model (SSL4EO-S2, SSL4EO-S1, DINOv2-base, SigLIP SO400M-384; full-size, random weights):
forward-only fragments/s at the engine's batch size in bf16 (and fp32 for SSL4EO-S2), bf16
against fp32 cosine on the same fragments (min, mean), end-to-end cells/s through
``engine.embed_to_file`` on a synthetic 1068 px collection, and pipeline efficiency = end-to-end
cells/s / (forward fragments/s / fragments per cell). Then end-to-end SSL4EO-S2 cells/s with 1, 4,
8 and 16 decode workers, as threads and as processes (``EngineConfig.decode_processes``).

Every section has a time budget and the whole run a global one; a section that runs out of time
reports what it measured so far (or "out of time"), and a watchdog writes the table and exits if
the run itself overruns. After every section ``OUT/gpu_check.md`` and ``OUT/gpu_check.json`` are
rewritten, so even a killed run leaves its table behind.

End-to-end runs read a few unique synthetic samples over and over (metadata rows repeated), so
reads come from the page cache; decoding, fragmenting, the model and the GeoParquet write are all
real. A run stops at its measuring window by raising from ``embed_to_file``'s ``on_result``; the
rate is taken after the first results (warm-up: model autotuning, pools) are discarded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):   # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from majortom_assets import engine, geotiff, synthetic
from majortom_assets.core import CoreCollection
from majortom_assets.fragment import fragment_layout, gather_fragments
from majortom_assets.models import get_spec, load_embedder

MODELS = ("ssl4eo-s2", "ssl4eo-s1", "dinov2-rgb", "siglip-rgb")
LABELS = {"ssl4eo-s2": "SSL4EO-S2", "ssl4eo-s1": "SSL4EO-S1", "dinov2-rgb": "DINOv2-base",
          "siglip-rgb": "SigLIP SO400M-384"}
# Targets of the platform (issue 14): cells/s on one 16-core node with one GPU.
CELLS_TARGET = {"ssl4eo-s2": 150.0, "siglip-rgb": 25.0}
EFFICIENCY_TARGET = 0.8
COSINE_TARGET = 0.999
_HAS_PROCESSES = "decode_processes" in engine.EngineConfig.model_fields


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets (seconds) of one run; `quick` is the CPU rehearsal."""

    tiny: bool
    size: int
    unique_cells: int
    batch_size: int
    forward_window: float
    e2e_window: float
    e2e_warmup_cells: int
    worker_counts: tuple[int, ...]
    budget_synthetic: float
    budget_forward: float
    budget_e2e: float
    budget_sweep_run: float
    total_budget: float


FULL = Plan(tiny=False, size=engine.CORE_IMAGE_SIZE, unique_cells=16, batch_size=engine.EngineConfig().batch_size,
            forward_window=6.0, e2e_window=12.0, e2e_warmup_cells=24, worker_counts=(1, 4, 8, 16),
            budget_synthetic=90.0, budget_forward=50.0, budget_e2e=30.0, budget_sweep_run=14.0,
            total_budget=440.0)
# 390 px (a multiple of 6 above SigLIP's 384 px fragment): 4 fragments of 224 px per cell, 1 of 384
QUICK = Plan(tiny=True, size=390, unique_cells=2, batch_size=8,
             forward_window=0.5, e2e_window=1.5, e2e_warmup_cells=2, worker_counts=(1, 2),
             budget_synthetic=120.0, budget_forward=60.0, budget_e2e=45.0, budget_sweep_run=45.0,
             total_budget=600.0)


@dataclass
class Row:
    section: str
    model: str
    measure: str
    value: float | None = None
    unit: str = ""
    target: str = ""
    verdict: str = ""
    note: str = ""

    def shown(self) -> str:
        if self.value is None:
            return "—"
        v = self.value
        if self.section == "cosine":
            return f"{v:.6f}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


@dataclass
class Report:
    out_dir: Path
    environment: dict
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False

    def add(self, row: Row) -> Row:
        with self.lock:
            self.rows.append(row)
        return row

    def markdown(self) -> str:
        env = self.environment
        head = (f"GPU check: {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
                f"{env.get('cpus')} CPUs, imagecodecs={env.get('imagecodecs')}, rasterio={env.get('rasterio')}, "
                f"mode={env.get('mode')}, {time.perf_counter() - self.started:.0f} s"
                + ("" if self.finished else " (INCOMPLETE)"))
        lines = [head, "", "| section | model | measure | value | unit | target | verdict | note |",
                 "|---|---|---|---|---|---|---|---|"]
        with self.lock:
            rows = list(self.rows)
        for r in rows:
            lines.append(f"| {r.section} | {r.model} | {r.measure} | {r.shown()} | {r.unit} | {r.target} | "
                         f"{r.verdict} | {r.note} |")
        return "\n".join(lines) + "\n"

    def write(self) -> str:
        text = self.markdown()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            payload = {"environment": self.environment, "finished": self.finished,
                       "seconds": time.perf_counter() - self.started, "rows": [asdict(r) for r in self.rows]}
        for name, content in (("gpu_check.md", text), ("gpu_check.json", json.dumps(payload, indent=2))):
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(content)
            os.replace(tmp, self.out_dir / name)
        return text


class OutOfTime(Exception):
    """A section's (or the run's) budget is spent."""


class Clock:
    """A section's deadline, never later than the run's."""

    def __init__(self, budget: float, run_deadline: float) -> None:
        self.deadline = min(time.perf_counter() + budget, run_deadline)
        self.budget = budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def check(self) -> None:
        if self.left() <= 0:
            raise OutOfTime(f"budget {self.budget:.0f} s spent")


def _verdict(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return ""
    return "met" if value >= target else "MISSED"


# ---- synthetic collections ------------------------------------------------------------------
def _generate(args: tuple[str, str, list[str], int]) -> str:
    out, source, cells, size = args
    synthetic.generate_collection(out, source, cells=cells, size=size, seed=14, samples_per_shard=8,
                                  compress="deflate")
    return out


def make_collections(root: Path, plan: Plan, sources: set[str]) -> dict[str, Path]:
    """One synthetic collection per source, generated in parallel processes (GDAL-free writer)."""
    cells = synthetic.cells_for_rows(["506U", "312U"], max(1, plan.unique_cells // 2))[: plan.unique_cells]
    jobs = [(str(root / f"Core-{s}"), s, cells, plan.size) for s in sorted(sources)]
    with ProcessPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(_generate, jobs))
    return {s: Path(p) for s, p in zip(sorted(sources), done, strict=True)}


# ---- measurements ---------------------------------------------------------------------------
def sample_fragments(collection: CoreCollection, name: str, size: int, count: int) -> torch.Tensor:
    """`count` raw fragments (repeating the collection's samples) in the model's bands and dtype."""
    spec = get_spec(name)
    meta = collection.metadata()
    layout = fragment_layout(size, size, spec.fragment_size, spec.target_overlap)
    parts = []
    for _, row in meta.iterrows():
        pixels = collection.read_sample(row, spec.bands, size=size).pixels
        parts.append(gather_fragments(pixels, layout))
        if sum(len(p) for p in parts) >= count:
            break
    stacked = np.concatenate(parts)
    reps = -(-count // len(stacked))
    return torch.from_numpy(np.concatenate([stacked] * reps)[:count].astype(stacked.dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_call(embedder, x: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    if precision == "fp32":
        return embedder(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return embedder(x)


@torch.inference_mode()
def forward_rate(embedder, raw: torch.Tensor, precision: str, device: torch.device, window: float,
                 clock: Clock) -> tuple[float, int]:
    """Forward-only fragments/s on one engine-sized batch already on the device (normalised)."""
    x = embedder.preprocess(raw.to(device), inplace=False)
    if embedder.prefers_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):   # warm-up: kernel selection, allocator
        _model_call(embedder, x, precision, device)
        _sync(device)
        clock.check()
    n, start = 0, time.perf_counter()
    while True:
        _model_call(embedder, x, precision, device)
        _sync(device)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= window or clock.left() <= 0:
            return n * x.shape[0] / elapsed, n


@torch.inference_mode()
def cosine_bf16(embedder, raw: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """min and mean cosine between bf16-autocast and true-fp32 (TF32 off) embeddings of the same fragments."""
    x = embedder.preprocess(raw.to(device), inplace=False)
    if embedder.prefers_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = _model_call(embedder, x, "fp32", device).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    low = _model_call(embedder, x, "bf16", device).float()
    cos = torch.nn.functional.cosine_similarity(reference, low, dim=1)
    return float(cos.min()), float(cos.mean())


class _Enough(Exception):
    pass


def end_to_end(collection: CoreCollection, embedder, config: engine.EngineConfig, out: Path, window: float,
               warmup: int, clock: Clock) -> dict:
    """Steady-state cells/s of embed_to_file over repeated metadata rows, stopped after `window` s."""
    meta = collection.metadata()
    # enough rows for any window (a 16-core node reaches a few hundred cells/s); one take, not a concat
    repeated = meta.take(np.resize(np.arange(len(meta)), 50_000)).reset_index(drop=True)
    stamps: list[float] = []
    failures: list[str] = []
    state = {"first": None}

    def on_result(item) -> None:
        now = time.perf_counter()
        if isinstance(item, engine.SampleFailure):
            failures.append(item.reason)
        stamps.append(now)
        if len(stamps) == warmup:
            state["first"] = now
        if state["first"] is not None and now - state["first"] >= window:
            state["stopped"] = "window"
            raise _Enough
        if clock.left() <= 0:
            state["stopped"] = "section budget"
            raise _Enough

    started = time.perf_counter()
    try:
        engine.embed_to_file(collection, repeated, embedder, config, out, on_result=on_result)
    except _Enough:
        pass
    finally:
        out.unlink(missing_ok=True)
    result = {"cells": len(stamps), "seconds": time.perf_counter() - started, "failures": len(failures),
              "first_failure": failures[0] if failures else "", "stopped": state.get("stopped", "end of rows")}
    if len(stamps) > warmup:
        result["cells_per_s"] = (len(stamps) - warmup) / (stamps[-1] - stamps[warmup - 1])
    elif len(stamps) > 1:
        result["cells_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        result["note"] = "window shorter than the warm-up"
    return result


# ---- the run --------------------------------------------------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.deadline = time.perf_counter() + (args.budget_s or self.plan.total_budget)
        self.workers = args.decode_workers or min(16, os.cpu_count() or 1)
        env = {
            "device": str(self.device), "mode": "quick (tiny models)" if args.quick else "full-size models",
            "device_name": torch.cuda.get_device_name(self.device) if self.cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "imagecodecs": geotiff.imagecodecs_available(), "rasterio": geotiff.rasterio_available(),
            "batch_size": self.plan.batch_size, "decode_workers": self.workers,
            "plan": asdict(self.plan), "models": list(args.models),
        }
        self.report = Report(Path(args.out_dir), env)
        self.collections: dict[str, CoreCollection] = {}
        self.forward: dict[str, float] = {}

    def clock(self, budget: float) -> Clock:
        return Clock(budget, self.deadline)

    def section(self, title: str, model: str, budget: float, body: Callable[[Clock], None]) -> None:
        """Run one section under its budget; record how it ended when it did not finish."""
        clock = self.clock(budget)
        if clock.left() <= 0:
            self.report.add(Row(title, model, "skipped", verdict="out of time", note="run budget spent"))
            return
        started = time.perf_counter()
        try:
            body(clock)
        except OutOfTime as exc:
            self.report.add(Row(title, model, "section stopped", verdict="out of time", note=str(exc)))
        except Exception as exc:  # noqa: BLE001 -- one broken section must not cost the others
            traceback.print_exc()
            self.report.add(Row(title, model, "section failed", verdict="ERROR",
                                note=f"{type(exc).__name__}: {str(exc)[:200]}".replace("|", "/")))
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
            print(f"[gpu_check] {title} {model}: {time.perf_counter() - started:.1f} s", flush=True)
            self.report.write()

    def config(self, workers: int, processes: int = 0) -> engine.EngineConfig:
        extra = {"decode_processes": processes} if _HAS_PROCESSES else {}
        return engine.EngineConfig(device=str(self.device), precision="bf16" if self.cuda else "fp32",
                                   batch_size=self.plan.batch_size, decode_workers=workers,
                                   image_size=self.plan.size,
                                   prefetch_samples=max(4, 2 * max(workers, processes)), **extra)

    def run(self) -> None:
        plan = self.plan
        sources = {get_spec(m).source for m in self.args.models}
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=self.args.work_dir))
        try:
            self._run(plan, sources, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _run(self, plan: Plan, sources: set[str], tmp: Path) -> None:

        def synth(clock: Clock) -> None:
            started = time.perf_counter()
            if _HAS_PROCESSES:   # the decode workers' fork server imports while the rest runs
                from majortom_assets.decode_processes import worker_context

                worker_context(start=True)
            paths = make_collections(tmp, plan, sources)
            self.collections = {s: CoreCollection(str(p)) for s, p in paths.items()}
            self.report.add(Row("setup", "", f"synthetic collections {sorted(sources)}",
                                time.perf_counter() - started, "s",
                                note=f"{plan.unique_cells} unique {plan.size} px cells each, DEFLATE"))

        self.section("setup", "", plan.budget_synthetic, synth)
        for name in self.args.models:
            self.model_sections(name, tmp)
        if "ssl4eo-s2" in self.args.models:
            self.sweep(tmp)
        self.report.finished = True

    def model_sections(self, name: str, tmp: Path) -> None:
        plan, label = self.plan, LABELS[name]
        spec = get_spec(name)
        state: dict = {}

        def forward(clock: Clock) -> None:
            started = time.perf_counter()
            embedder = load_embedder(name, "random", tiny=plan.tiny).to(self.device)
            if embedder.prefers_channels_last:
                embedder.to(memory_format=torch.channels_last)
            state["embedder"] = embedder
            self.report.add(Row("forward", label, "build (random weights) + move", time.perf_counter() - started,
                                "s", note=f"{sum(p.numel() for p in embedder.parameters()) / 1e6:.2f} M parameters"))
            clock.check()
            raw = sample_fragments(self.collections[spec.source], name, plan.size, plan.batch_size)
            state["raw"] = raw
            per_cell = fragment_layout(plan.size, plan.size, spec.fragment_size, spec.target_overlap).count
            state["per_cell"] = per_cell
            precisions = ["bf16", "fp32"] if name == "ssl4eo-s2" else ["bf16"]
            for precision in precisions:
                rate, batches = forward_rate(embedder, raw, precision, self.device, plan.forward_window, clock)
                if precision == "bf16":
                    self.forward[name] = rate
                self.report.add(Row("forward", label, f"{precision} fragments/s, batch {plan.batch_size}", rate,
                                    "fragments/s", note=f"{batches} batches; = {rate / per_cell:.1f} cells/s "
                                    f"at {per_cell} fragments/cell"))
            lo, mean = cosine_bf16(embedder, raw, self.device)
            self.report.add(Row("cosine", label, "bf16 vs fp32 cosine, min", lo, target=f"≥ {COSINE_TARGET}",
                                verdict=_verdict(lo, COSINE_TARGET), note=f"{raw.shape[0]} fragments, TF32 off"))
            self.report.add(Row("cosine", label, "bf16 vs fp32 cosine, mean", mean, target=f"≥ {COSINE_TARGET}",
                                verdict=_verdict(mean, COSINE_TARGET)))

        def e2e(clock: Clock) -> None:
            if "embedder" not in state:
                raise RuntimeError("no model: its forward section did not build it")
            # processes are the production setting on a GPU node; the CPU rehearsal keeps its
            # per-model runs on threads (starting worker processes dominates a few-second run there)
            threads_only = self.args.threads_only or self.args.quick
            modes = ["processes", "threads"] if _HAS_PROCESSES and not threads_only else ["threads"]
            for mode in modes:   # processes first (the production setting); threads if they cannot start
                config = self.config(self.workers) if mode == "threads" else self.config(1, self.workers)
                try:
                    result = end_to_end(self.collections[spec.source], state["embedder"], config,
                                        tmp / f"{name}.parquet", plan.e2e_window, plan.e2e_warmup_cells, clock)
                except OutOfTime:
                    raise
                except Exception as exc:
                    if mode == "threads":
                        raise
                    self.report.add(Row("end-to-end", label, f"cells/s, {self.workers} decode {mode}",
                                        verdict="ERROR", note=f"{type(exc).__name__}: {exc}"[:200].replace("|", "/")))
                    continue
                break
            rate = result.get("cells_per_s")
            target = CELLS_TARGET.get(name)
            self.report.add(Row("end-to-end", label, f"cells/s, {self.workers} decode {mode}", rate, "cells/s",
                                f"≥ {target:g}" if target else "", _verdict(rate, target),
                                _e2e_note(result)))
            forward_rate_ = self.forward.get(name)
            if rate is not None and forward_rate_:
                efficiency = rate / (forward_rate_ / state["per_cell"])
                self.report.add(Row("end-to-end", label, "pipeline efficiency (e2e / forward-bound)", efficiency,
                                    target=f"≥ {EFFICIENCY_TARGET}", verdict=_verdict(efficiency, EFFICIENCY_TARGET)))

        self.section("forward", label, plan.budget_forward, forward)
        self.section("end-to-end", label, plan.budget_e2e, e2e)
        if name == "ssl4eo-s2":
            self._s2_embedder = state.get("embedder")
        state.clear()

    def sweep(self, tmp: Path) -> None:
        plan = self.plan
        modes = [("threads", 0)]
        if _HAS_PROCESSES:
            modes.append(("processes", 1))
        for mode, _ in modes:
            for workers in plan.worker_counts:
                def body(clock: Clock, workers=workers, mode=mode) -> None:
                    embedder = getattr(self, "_s2_embedder", None)
                    if embedder is None:
                        raise RuntimeError("no SSL4EO-S2 model: its forward section did not build it")
                    config = self.config(workers) if mode == "threads" else self.config(1, processes=workers)
                    result = end_to_end(self.collections["S2L1C"], embedder, config, tmp / "sweep.parquet",
                                        plan.e2e_window * 0.6, plan.e2e_warmup_cells, clock)
                    self.report.add(Row("decode workers", LABELS["ssl4eo-s2"], f"cells/s, {workers} decode {mode}",
                                        result.get("cells_per_s"), "cells/s", note=_e2e_note(result)))
                self.section("decode workers", f"{LABELS['ssl4eo-s2']} {mode} x{workers}", plan.budget_sweep_run, body)


def _e2e_note(result: dict) -> str:
    note = f"{result['cells']} cells in {result['seconds']:.1f} s, stopped by {result['stopped']}"
    if result.get("failures"):
        note += f"; {result['failures']} FAILED: {result['first_failure'][:120]}"
    if result.get("note"):
        note += f"; {result['note']}"
    return note.replace("|", "/")


def _watchdog(report: Report, seconds: float) -> None:
    """Write whatever was measured and leave if the run overruns (a hung kernel, a slow start)."""
    def fire() -> None:
        report.add(Row("watchdog", "", "run stopped", verdict="out of time",
                       note=f"the whole check passed {seconds:.0f} s"))
        print(report.write(), flush=True)
        os._exit(3)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="where gpu_check.md and gpu_check.json go")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, small windows (CPU rehearsal)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--budget-s", type=float, default=None, help="total time budget (default: the plan's)")
    parser.add_argument("--decode-workers", type=int, default=None, help="decode threads for the per-model runs")
    parser.add_argument("--threads-only", action="store_true",
                        help="per-model end-to-end runs with decode threads (default: processes, "
                             "except with --quick)")
    parser.add_argument("--work-dir", default=None, help="where the synthetic collections go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    check = Check(args)
    _watchdog(check.report, (args.budget_s or check.plan.total_budget) + 20.0)
    try:
        check.run()
    finally:
        print(check.report.write(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

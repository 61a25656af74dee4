"""Dagster at archive scale: 1,893 grid-row partitions x 4 models over 2.25 M metadata rows.

    python -m benchmarks.bench_dagster_scale [--samples 2250000] [--work DIR] [--materialised 0.5]

Builds three synthetic Core collections (S2L1C, S2L2A, S1RTC) whose metadata.parquet holds
`--samples` rows each, spread over the 10 km grid like Core (cells drawn uniformly from the grid,
so rows hold samples in proportion to their cell count), all pointing at the few real samples of
one small synthetic shard. Then, with every model enabled (4 embeddings assets, 9 row assets of
1,893 partitions each), it measures:

- code location load: `defs()` + asset graph in a fresh interpreter, and `dagster asset list`;
- the three metadata assets materialising 2.25 M rows each (the selection the automation reads);
- one `new_core_samples` sensor tick (the first: reads every collection's metadata and requests
  one selection refresh each) and the next (requests every changed row), one
  `missing_rows_nightly` schedule tick;
- "backfill all": the UI's GraphQL `launchPartitionBackfill(allPartitions: true)` over the 9 row
  assets against a running `dagster-webserver`, then one backfill-daemon iteration planning it
  (runs land in the queue; no daemon executes them);
- the embeddings asset page and its partitions view rendered by headless Chromium (/usr/bin/chromium).

A fraction (`--materialised`) of every row asset's partitions is first recorded as materialised so
the partition views have real status to show. DAGSTER_HOME lives on /dev/shm when it exists: the
SQLite event log's fsyncs (about 0.1 s per event on a busy disk) would otherwise dominate the setup,
not the measured operations. Disk: about 3 x 110 MB of metadata (+ the selections), removed at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "tests"))

SOURCES = ("S2L1C", "S2L2A", "S1RTC")
TARGETS = {"code location load": 10.0, "sensor tick": 30.0, "schedule tick": 30.0, "UI page": 5.0}


def log(message: str) -> None:
    print(f"[bench_dagster_scale] {message}", flush=True)


def write_metadata(collection: Path, samples: int, seed: int) -> float:
    """Replace the collection's metadata with `samples` rows over the whole grid (row-sorted, as
    Core's), pointing at the collection's real samples in turn. Returns seconds."""
    from majortom_assets import grid

    started = time.perf_counter()
    real = pq.read_table(collection / "metadata.parquet").to_pandas()
    g = grid.get_grid()
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(g.n_cells, size=samples, replace=False))  # all_cells order: row-major
    rows_all, cols_all = g.all_cells()
    rows, cols = rows_all[pick], cols_all[pick]
    lat, lon = g.cell_centre(rows, cols)
    ref = np.arange(samples) % len(real)
    product = np.char.add(np.char.add(real["product_id"].to_numpy()[ref].astype(str), "_"), np.arange(samples).astype(str))
    table = pa.table(
        {
            "grid_cell": pa.array(grid.cell_name(rows, cols)),
            "grid_row_u": pa.array(rows.astype(np.int32)),
            "grid_col_r": pa.array(cols.astype(np.int32)),
            "product_id": pa.array(product),
            "timestamp": pa.array(real["timestamp"].to_numpy()[ref].astype(str)),
            "cloud_cover": pa.array(rng.uniform(0, 100, samples)),
            "nodata": pa.array(np.zeros(samples)),
            "centre_lat": pa.array(lat),
            "centre_lon": pa.array(lon),
            "crs": pa.array(real["crs"].to_numpy()[ref].astype(str)),
            "parquet_url": pa.array(real["parquet_url"].to_numpy()[ref].astype(str)),
            "parquet_row": pa.array(real["parquet_row"].to_numpy()[ref].astype(np.int64)),
        }
    )
    pq.write_table(table, collection / "metadata.parquet", row_group_size=100_000)
    return time.perf_counter() - started


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def subprocess_seconds(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


LOAD_SCRIPT = (
    "import time; t = time.perf_counter(); from majortom_assets.definitions import defs; "
    "d = defs(); g = d.resolve_asset_graph(); d.get_repository_def().get_implicit_global_asset_job_def(); "
    "print(time.perf_counter() - t)"
)


def record_materialised(instance, row_keys, rows: list[str], fraction: float) -> tuple[int, float]:
    """Report `fraction` of every row asset's partitions as materialised (runless events)."""
    import dagster as dg

    chosen = rows[: int(len(rows) * fraction)]
    started = time.perf_counter()
    for key in row_keys:
        for row in chosen:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key=key, partition=row, metadata={"samples": 1})
            )
    return len(chosen) * len(row_keys), time.perf_counter() - started


BACKFILL_MUTATION = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""


def graphql(base_url: str, query: str, variables: dict) -> dict:
    import urllib.request

    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(f"{base_url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        payload = json.loads(response.read())
    if "errors" in payload:
        raise RuntimeError(payload["errors"])
    return payload["data"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dagster_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2_250_000, help="metadata rows per collection")
    parser.add_argument("--materialised", type=float, default=0.5, help="fraction of row partitions recorded as done")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--planned-sample", type=int, default=500, help="planned events written and timed")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument(
        "--storage", choices=("postgres", "sqlite"), default=None,
        help="instance storage: PostgreSQL on 127.0.0.1:5432 (production's; default when it answers) or SQLite",
    )
    args = parser.parse_args(argv)
    from deploy_support import port_open, postgres_database, postgres_instance_home

    storage = args.storage or ("postgres" if port_open(5432) else "sqlite")

    work = args.work or Path(tempfile.mkdtemp(prefix="majortom-dagster-scale-"))
    shm = Path("/dev/shm")
    dagster_home = Path(tempfile.mkdtemp(prefix="majortom-dagster-home-", dir=shm if shm.is_dir() else work))
    home = work / "home"
    results: dict[str, float | int | str] = {"samples per collection": args.samples, "instance storage": storage}
    stack_pg = ExitStack()
    try:
        from majortom_assets import synthetic
        from majortom_assets.demo import prepare_dagster_home

        for i, source in enumerate(SOURCES):
            folder = home / "collections" / f"Core-{source}"
            meta = folder / "metadata.parquet"
            if meta.exists() and pq.read_metadata(meta).num_rows == args.samples:
                continue  # --work of an earlier run: same synthetic collection
            synthetic.generate_collection(folder, source, cells=synthetic.default_cells()[:3], size=384, seed=i)
            seconds = write_metadata(folder, args.samples, seed=i)
            log(f"{source}: {args.samples:,} metadata rows written in {seconds:.1f} s")
        pg_env: dict[str, str] = {}
        if storage == "postgres":
            pg_env = postgres_instance_home(dagster_home, stack_pg.enter_context(postgres_database("majortom_bench")))
        else:
            prepare_dagster_home(dagster_home)
        env = {
            **os.environ,
            **pg_env,
            "MAJORTOM_HOME": str(home),
            "DAGSTER_HOME": str(dagster_home),
            "MAJORTOM_ENV": "local",
            "MAJORTOM_MODELS": "ssl4eo-s2,ssl4eo-s1,siglip-rgb,dinov2-rgb",
            "MAJORTOM_IMAGE_SIZE": "384",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        os.environ.update(
            {k: env[k] for k in ("MAJORTOM_HOME", "DAGSTER_HOME", "MAJORTOM_ENV", "MAJORTOM_MODELS", "MAJORTOM_IMAGE_SIZE")}
        )
        os.environ.update(pg_env)

        # 1. code location load, in a fresh interpreter each
        seconds, out = subprocess_seconds([sys.executable, "-c", LOAD_SCRIPT], env)
        results["code location load: defs() + asset graph (s)"] = round(float(out.strip().splitlines()[-1]), 2)
        results["code location load: interpreter + defs (s)"] = round(seconds, 2)
        seconds, out = subprocess_seconds([str(Path(sys.executable).parent / "dagster"), "asset", "list", "-m", "majortom_assets"], env)
        results["dagster asset list (s)"] = round(seconds, 2)
        results["assets listed"] = len(out.split())
        log(f"code location: {results}")

        import dagster as dg

        from majortom_assets.definitions import defs
        from majortom_assets.defs import keys
        from majortom_assets.defs.partitions import ROW_NAMES
        from majortom_assets.defs.resources import build_resources, load_settings

        definitions = defs()
        settings = load_settings()
        resources = build_resources(settings)
        row_keys = [k for s in keys.sources_for_models(settings.models) for k in keys.row_chain_keys(s, settings.models)]
        row_keys = list(dict.fromkeys(row_keys))
        results["row assets"] = len(row_keys)
        results["partitions per row asset"] = len(ROW_NAMES)

        with dg.DagsterInstance.get() as instance:
            # 2. the metadata selections (what sensor and schedule read)
            everything = [*definitions.assets, *(definitions.asset_checks or [])]
            metadata_keys = [keys.core_metadata_key(s) for s in SOURCES]
            result, seconds = timed(
                dg.materialize, everything, instance=instance, resources=resources, selection=metadata_keys
            )
            assert result.success
            results["3 metadata assets over the samples (s)"] = round(seconds, 2)
            events, seconds = record_materialised(instance, row_keys, list(ROW_NAMES), args.materialised)
            results["row materialisations recorded (setup)"] = events
            log(f"setup: {events} row materialisations recorded in {seconds:.1f} s")

            # 3. one sensor tick, one schedule tick
            from majortom_assets.defs.schedules import missing_rows_nightly
            from majortom_assets.defs.sensors import new_core_samples

            with dg.build_sensor_context(instance=instance, resources={"collections": resources["collections"]}) as ctx:
                first, seconds = timed(new_core_samples, ctx)
            results["sensor tick 1: read 3 x metadata, request refreshes (s)"] = round(seconds, 2)
            results["sensor tick 1 run requests"] = len(first.run_requests)
            for source in SOURCES:  # the refresh runs' materialisations, with an empty filter
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key=keys.core_metadata_key(source), metadata={"filter": dg.MetadataValue.json({})})
                )
            with dg.build_sensor_context(
                instance=instance, cursor=first.cursor, resources={"collections": resources["collections"]}
            ) as ctx:
                second, seconds = timed(new_core_samples, ctx)
            results["sensor tick 2: request changed rows (s)"] = round(seconds, 2)
            results["sensor tick 2 run requests"] = len(second.run_requests)
            with dg.build_schedule_context(instance=instance, resources={"storage": resources["storage"]}) as ctx:
                requests, seconds = timed(lambda: list(missing_rows_nightly(ctx)))
            results["schedule tick (s)"] = round(seconds, 2)
            results["schedule tick run requests"] = len(requests)
            log(f"automation: {results}")

        # 4. backfill all + UI pages, against a running webserver
        import ui_helpers as ui

        slug = "dinov2_rgb"
        with ExitStack() as stack:
            server = stack.enter_context(ui.dagster_webserver(env, work, timeout_s=300))
            log("webserver up; launching 'backfill all'")
            selection = [{"path": list(k.path)} for k in row_keys]
            data, seconds = timed(
                graphql, server.base_url, BACKFILL_MUTATION, {"params": {"assetSelection": selection, "allPartitions": True}}
            )
            outcome = data["launchPartitionBackfill"]
            if outcome["__typename"] != "LaunchBackfillSuccess":
                raise RuntimeError(f"backfill all failed: {outcome}")
            results["backfill all: launchPartitionBackfill (s)"] = round(seconds, 2)
            backfill_id = outcome["backfillId"]
            log(f"backfill {backfill_id} launched in {seconds:.1f} s; planning it")

            from dagster._core.instance.runs import run_domain
            from dagster._core.test_utils import create_test_daemon_workspace_context
            from dagster._core.workspace.load_target import WorkspaceFileTarget
            from dagster._daemon.backfill import execute_backfill_iteration

            planned = {"seconds": 0.0, "events": 0}
            log_planned = run_domain.RunDomain._log_asset_planned_events

            def timed_planned(self, dagster_run, execution_plan_snapshot, asset_graph):
                # Dagster OSS writes one "materialisation planned" event per row and row asset
                # when it creates the run (17,037 here). Writing them all takes tens of minutes on
                # this shared 2-core box, so the first `--planned-sample` are written and timed and
                # the rest are counted, not written; the total is extrapolated from the sample.
                report = self._instance.report_dagster_event
                count = {"n": 0}

                def sampled(event, *a, **kw):
                    count["n"] += 1
                    if count["n"] <= args.planned_sample:
                        return report(event, *a, **kw)
                    return None

                self._instance.report_dagster_event = sampled
                started = time.perf_counter()
                try:
                    log_planned(self, dagster_run, execution_plan_snapshot, asset_graph)
                finally:
                    self._instance.report_dagster_event = report
                seconds = time.perf_counter() - started
                written = min(count["n"], args.planned_sample)
                planned["seconds"] += seconds
                planned["events"] += count["n"]
                planned["written"] = planned.get("written", 0) + written
                planned["extrapolated"] = planned.get("extrapolated", 0.0) + seconds * count["n"] / max(written, 1)

            run_domain.RunDomain._log_asset_planned_events = timed_planned
            with dg.DagsterInstance.get() as instance:
                target = WorkspaceFileTarget([str(REPO / "workspace.yaml")])
                with create_test_daemon_workspace_context(target, instance) as context:
                    context.create_request_context().get_code_location_entries()  # load outside the timing
                    started = time.perf_counter()
                    list(execute_backfill_iteration(context, logging.getLogger("bench")))
                    total = time.perf_counter() - started
                results["backfill all: one daemon iteration, total (s)"] = round(total, 2)
                results["  of which planning the backfill (s)"] = round(total - planned["seconds"], 2)
                results["  of which writing sampled planned events (s)"] = round(planned["seconds"], 2)
                results["  planned events: total / written and timed"] = f"{planned['events']} / {planned.get('written', 0)}"
                results["  all planned events, extrapolated (s)"] = round(planned.get("extrapolated", 0.0), 1)
                backfill = instance.get_backfill(backfill_id)
                runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
                results["backfill all: status"] = str(backfill.status)
                results["backfill all: runs requested"] = len(runs)
                results["backfill all: run partition ranges"] = "; ".join(
                    f"{r.tags.get('dagster/asset_partition_range_start')}...{r.tags.get('dagster/asset_partition_range_end')}"
                    for r in runs
                )
            log(f"backfill: {results}")

            browser = stack.enter_context(ui.Browser(timeout_s=120))
            pages = {
                "UI embeddings asset page": (f"/assets/embeddings/{slug}", ("Latest materialization", "Downstream assets")),
                "UI embeddings partitions view": (f"/assets/embeddings/{slug}?view=partitions", ("Materialized (", "Missing (")),
            }
            for label, (path, ready) in pages.items():
                for attempt in ("first", "again"):
                    browser.send("Page.navigate", url="about:blank")
                    _, seconds = timed(browser.goto, server.base_url + path, *ready)
                    results[f"{label}, {attempt} load (s)"] = round(seconds, 2)
            page = browser.page()
            results["UI partitions view shows"] = " ".join(
                t for t in page.text.split(" ") if t.startswith(("(", "Materialized", "Missing", "Failed"))
            )[:120]
    finally:
        stack_pg.close()
        shutil.rmtree(dagster_home, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

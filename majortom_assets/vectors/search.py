"""Cosine similarity search over one model's embeddings with faiss.

Vectors are L2-normalised and indexed with inner product, so scores are cosine similarities.
Index choice (measured in docs/benchmarks.md, "Vectors": 1M × 768 clustered vectors, 2-core box):

* ``flat``    exact; ``auto`` uses it up to ``flat_max`` (100k) vectors (~10-20 ms per query there).
* ``ivffp16`` IVF coarse lists (k-means on a sample, ~30 s) + float16 codes, 1.5 KB per 768-d
  vector: recall@10 0.998 at 1 ms per query. The ``auto`` choice above ``flat_max``: training is
  bounded (only the coarse k-means), and half-precision codes keep the ranking of near-ties that
  8-bit codes scramble.
* ``ivfsq8``  the same with 8-bit codes (0.8 KB/vector): recall@10 only 0.84 at any nprobe —
  neighbours inside a tight cluster differ by less than the 8-bit step.
* ``ivfpq``   IVF + product quantisation (dim/8 bytes per vector, the compact option for indexes
  that must not fit in RAM otherwise); optionally re-ranked (``refine="fp16"``); PQ training is the
  slowest step (~3 min at 1M × 768 on 2 cores).
* ``hnsw``    graph on full float vectors: recall 1.0 at 1 ms on 100k, but building takes ~50 s per
  100k vectors here and grows faster than linearly, so it is never chosen automatically.

Filters (bbox, dates, grid rows) are applied inside faiss with an ID bitmap. faiss may then find
fewer than k hits (IVF probes only ``nprobe`` lists; HNSW's walk can starve), so the search widens
``nprobe`` up to every list, and HNSW falls back to exact search of its flat storage (always,
when under 10% of vectors pass), until min(k, number of allowed vectors) results are found.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Self

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from majortom_assets.vectors import files

IndexKind = Literal["auto", "flat", "ivffp16", "ivfsq8", "ivfpq", "hnsw"]
IVF_KINDS = ("ivffp16", "ivfsq8", "ivfpq")
REFINE_CODES = {"sq8": "SQ8", "fp16": "SQfp16", "flat": "Flat"}
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "manifest.json"
FORMAT = "majortom-vector-index/1"
META_COLUMNS = ["unique_id", "grid_cell", "grid_row_u", "product_id", "timestamp", "centre_lat",
                "centre_lon", "geometry", "pixel_bbox"]


class IndexConfig(BaseModel):
    """Build parameters; defaults scale with the number of vectors N."""

    model_config = ConfigDict(extra="forbid")
    kind: IndexKind = "auto"
    flat_max: int = Field(100_000, ge=0, description="auto: exact flat index up to this many vectors")
    nlist: int | None = Field(None, ge=1, description="IVF lists; default ~sqrt(N) rounded to a power of 2")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantisers; default dim/8 (must divide dim)")
    pq_nbits: int = Field(8, ge=1, le=16, description="bits per PQ code (256 centroids at 8)")
    refine: Literal["none", "sq8", "fp16", "flat"] = Field(
        "none", description="ivfpq: re-rank k·refine_factor PQ candidates with these codes")
    refine_factor: int = Field(4, ge=1)
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(80, ge=8)
    train_size: int | None = Field(None, ge=1, description="training sample; default 64·nlist")
    kmeans_iters: int = Field(10, ge=1)
    nprobe: int = Field(16, ge=1, description="default IVF lists probed per query")
    ef_search: int = Field(128, ge=1, description="default HNSW search breadth")
    batch_rows: int = Field(files.DEFAULT_BATCH_ROWS, ge=1)
    seed: int = 0


class SearchFilter(BaseModel):
    """Which vectors may be returned. bbox is (min_lon, min_lat, max_lon, max_lat) on fragment
    centres; min_lon > max_lon means the box crosses the antimeridian. Dates are inclusive."""

    model_config = ConfigDict(extra="forbid")
    bbox: tuple[float, float, float, float] | None = None
    start: datetime | None = None
    end: datetime | None = None
    rows: list[str] | None = None

    @field_validator("bbox")
    @classmethod
    def _check_bbox(cls, v):
        from majortom_assets.grid import check_bbox

        return v if v is None else check_bbox(v)

    @field_validator("rows")
    @classmethod
    def _check_rows(cls, v):
        from majortom_assets.grid import parse_row_names

        if v is not None:
            parse_row_names(v)
        return v

    @model_validator(mode="after")
    def _check_dates(self):
        if self.start and self.end and _utc(self.start) > _utc(self.end):
            raise ValueError(f"start {self.start} is after end {self.end}")
        return self

    @property
    def active(self) -> bool:
        return any(x is not None for x in (self.bbox, self.start, self.end, self.rows))


def _utc(ts) -> np.datetime64:
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.tz_localize(None).to_datetime64().astype("datetime64[ns]")


# ----------------------------------------------------------------------------------- building
def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def choose_kind(n: int, config: IndexConfig) -> str:
    if config.kind != "auto":
        return config.kind
    return "flat" if n <= config.flat_max else "ivffp16"


def _make_index(kind: str, dim: int, n: int, config: IndexConfig) -> tuple[faiss.Index, dict]:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, ip)
        index.hnsw.efConstruction = config.ef_construction
        return index, {"hnsw_m": config.hnsw_m, "ef_construction": config.ef_construction}
    nlist = config.nlist or min(65536, max(16, _pow2(math.sqrt(n))))
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants >= 39 training points per centroid
    if kind in ("ivfsq8", "ivffp16"):
        spec, params = f"IVF{nlist},{'SQ8' if kind == 'ivfsq8' else 'SQfp16'}", {"nlist": nlist}
    elif kind == "ivfpq":
        m = config.pq_m or max(1, dim // 8)
        if dim % m:
            raise ValueError(f"pq_m={m} must divide the embedding dimension {dim}")
        spec = f"IVF{nlist},PQ{m}x{config.pq_nbits}"
        if config.refine != "none":
            spec += f",Refine({REFINE_CODES[config.refine]})"
        params = {"nlist": nlist, "pq_m": m, "pq_nbits": config.pq_nbits, "refine": config.refine,
                  "refine_factor": config.refine_factor}
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of auto, flat, ivffp16, ivfsq8, ivfpq, hnsw")
    index = faiss.index_factory(dim, spec, ip)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = config.kmeans_iters
    ivf.cp.seed = config.seed
    if kind == "ivfpq":
        faiss.downcast_index(ivf).pq.cp.niter = config.kmeans_iters
    return index, {"factory": spec, **params}


def _training_sample(paths: list[Path], n: int, size: int, config: IndexConfig) -> np.ndarray:
    """Uniform sample of `size` rows (without replacement), read batch by batch."""
    return files.sample_unit_vectors(paths, n, size, config.seed, config.batch_rows)


def build_index(
    paths, out_dir: str | os.PathLike, kind: IndexKind | None = None,
    config: IndexConfig | None = None, model: str | None = None, progress: bool = False,
) -> dict:
    """Build a cosine index of every fragment in `paths` and persist it atomically to `out_dir`.

    faiss id i is row i of ``metadata.parquet`` (plus the source file and row, so query vectors
    can be re-read exactly). Returns the manifest (kind, parameters, counts, timings).
    """
    config = (config or IndexConfig()).model_copy(update={"kind": kind} if kind else {})
    paths = files.global_paths(paths)
    n, dim = files.row_count(paths), files.common_dim(paths)
    if n == 0:
        raise ValueError("the embedding files hold no rows to index")
    chosen = choose_kind(n, config)
    index, params = _make_index(chosen, dim, n, config)
    t0 = time.perf_counter()
    if not index.is_trained:
        nlist = params["nlist"]
        size = config.train_size or max(64 * nlist, 10_000)
        index.train(_training_sample(paths, n, size, config))
    t_train = time.perf_counter() - t0
    meta_parts, sources = [], []
    bar = tqdm(total=n, desc=f"index {chosen}", unit="vec", disable=not progress)
    for si, path in enumerate(paths):
        rows = 0
        for offset, x, meta in files.iter_embeddings(path, config.batch_rows, META_COLUMNS):
            index.add(files.l2_normalise(x))
            meta = meta.append_column("source", pa.array(np.full(len(x), si, np.int32)))
            meta = meta.append_column("source_row", pa.array(np.arange(offset, offset + len(x))))
            meta_parts.append(meta)
            rows += len(x)
            bar.update(len(x))
        sources.append({"path": str(path.resolve()), "rows": rows})
    bar.close()
    t_add = time.perf_counter() - t0 - t_train
    manifest = {
        "format": FORMAT, "model": model, "kind": chosen, "metric": "cosine (inner product, L2-normalised)",
        "dim": dim, "count": int(index.ntotal), "params": params,
        "search_defaults": {"nprobe": config.nprobe, "ef_search": config.ef_search},
        "train_seconds": round(t_train, 3), "add_seconds": round(t_add, 3),
        "faiss_version": faiss.__version__, "sources": sources,
    }
    with files.atomic_directory(out_dir) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(pa.concat_tables(meta_parts), tmp / METADATA_FILE, compression="zstd")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


# ----------------------------------------------------------------------------------- querying
@dataclass
class _Meta:
    table: pa.Table
    cells: np.ndarray
    rows: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    time: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> _Meta:
        """The query-side columns of an index's metadata table, as numpy arrays once."""
        return cls(
            table=table,
            cells=table.column("grid_cell").to_numpy(zero_copy_only=False),
            rows=table.column("grid_row_u").to_numpy(),
            lat=table.column("centre_lat").to_numpy(),
            lon=table.column("centre_lon").to_numpy(),
            time=files.timestamps_ns(table.column("timestamp")),
        )


def _read_rows(path: Path, rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and unique_ids at the given row positions of one file, reading only their row
    groups; rows past the file's end (it shrank), or of another dimension, come back as zeros
    with unique_id None."""
    from majortom_assets.geoparquet import embedding_matrix

    x = np.zeros((len(rows), dim), np.float32)
    uids = np.full(len(rows), None, dtype=object)
    with pq.ParquetFile(path) as pf:
        bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        inside = rows < bounds[-1]
        if not inside.any():
            return x, uids
        groups = np.unique(np.searchsorted(bounds, rows[inside], side="right") - 1)
        table = pf.read_row_groups(groups.tolist(), columns=["embedding", "unique_id"])
    local = np.concatenate([np.arange(bounds[g], bounds[g + 1]) for g in groups])
    pos = np.searchsorted(local, rows[inside])
    found = embedding_matrix(table.column("embedding"))
    if found.shape[1] != dim:   # rewritten by another model: no row is the indexed one
        return x, uids
    x[inside] = found[pos]
    uids[inside] = table.column("unique_id").to_numpy(zero_copy_only=False)[pos]
    return x, uids


class SearchIndex:
    """A persisted index plus its aligned metadata; load once, query many times."""

    def __init__(self, directory: Path, index: faiss.Index, meta: _Meta, manifest: dict) -> None:
        self.directory, self.index, self._meta, self.manifest = directory, index, meta, manifest
        self.kind = manifest["kind"]
        self.dim = int(manifest["dim"])

    def close(self) -> None:
        """Release the faiss index now (a loaded index is usable until then)."""
        self.index = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SearchIndex:
        """Open a persisted index: a flat/IVF/HNSW one built by `build_index`, or an incremental
        one (`vectors.incremental`), which comes back as an `IncrementalSearchIndex`."""
        d = Path(directory)
        from majortom_assets.vectors import incremental

        if cls is SearchIndex and incremental.is_incremental(d):
            return IncrementalSearchIndex.load(d)
        missing = [f for f in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} is not a search index (missing {', '.join(missing)}); "
                                    "build one with `majortom index`")
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        index = faiss.read_index(str(d / INDEX_FILE))
        table = pq.read_table(d / METADATA_FILE)
        if table.num_rows != index.ntotal:
            raise ValueError(f"{d}: metadata has {table.num_rows} rows but the index {index.ntotal}")
        meta = _Meta.of(table)
        return cls(d, index, meta, manifest)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # -- query vectors -----------------------------------------------------------------------
    def vectors_at(self, ids: np.ndarray) -> np.ndarray:
        """Exact float32 embeddings of index rows, re-read from the source partitions."""
        ids = np.asarray(ids, dtype=np.int64)
        src = self._meta.table.column("source").to_numpy()[ids]
        srow = self._meta.table.column("source_row").to_numpy()[ids]
        expected = self._meta.table.column("unique_id").to_numpy(zero_copy_only=False)[ids]
        out = np.empty((len(ids), self.dim), np.float32)
        for s in np.unique(src):
            sel = src == s
            path = Path(self.manifest["sources"][int(s)]["path"])
            x, uids = _read_rows(path, srow[sel], self.dim)
            if (uids != expected[sel]).any():
                raise ValueError(f"{path} changed since {self.directory} was indexed (its rows no longer "
                                 f"hold the indexed unique_ids); rebuild the index with `majortom index`")
            out[sel] = x
        return out

    def ids_of_cell(self, grid_cell: str) -> np.ndarray:
        ids = np.flatnonzero(self._meta.cells == grid_cell)
        if len(ids) == 0:
            raise KeyError(f"grid cell {grid_cell} has no fragments in this index ({self.directory})")
        return ids

    def cell_vector(self, grid_cell: str, mode: Literal["central", "mean"] = "central") -> np.ndarray:
        """Query vector of a cell: its central fragment (mean over dates/products if several) or
        the mean of all its fragments; both L2-normalised, so each fragment weighs equally."""
        ids = self.ids_of_cell(grid_cell)
        if mode == "central":
            sub = self._meta.table.take(pa.array(ids))
            mask = files.central_mask(sub.column("grid_cell").to_numpy(zero_copy_only=False),
                                      sub.column("product_id").to_numpy(zero_copy_only=False),
                                      files.pixel_boxes(sub.column("pixel_bbox")))
            ids = ids[mask]
        elif mode != "mean":
            raise ValueError(f"cell query mode must be 'central' or 'mean', got {mode!r}")
        return files.l2_normalise(files.l2_normalise(self.vectors_at(ids)).mean(axis=0))

    def id_of(self, unique_id: str) -> int:
        hits = np.flatnonzero(pc.equal(self._meta.table.column("unique_id"), unique_id).to_numpy(
            zero_copy_only=False))
        if len(hits) == 0:
            raise KeyError(f"unique_id {unique_id} is not in this index ({self.directory})")
        return int(hits[0])

    # -- filtering ---------------------------------------------------------------------------
    def allowed(self, flt: SearchFilter | None) -> np.ndarray | None:
        """Boolean mask of index rows passing the filter (None: everything passes)."""
        if flt is None or not flt.active:
            return None
        m = self._meta
        mask = np.ones(len(self), bool)
        if flt.bbox is not None:
            w, s, e, n = flt.bbox
            mask &= (m.lat >= s) & (m.lat <= n)
            mask &= ((m.lon >= w) & (m.lon <= e)) if w <= e else ((m.lon >= w) | (m.lon <= e))
        if flt.start is not None:
            mask &= m.time >= _utc(flt.start)
        if flt.end is not None:
            mask &= m.time <= _utc(flt.end)
        if flt.rows is not None:
            from majortom_assets.grid import parse_row_name

            mask &= np.isin(m.rows, [parse_row_name(r) for r in flt.rows])
        return mask

    # -- search ------------------------------------------------------------------------------
    def _params(self, sel, nprobe: int, ef_search: int, k_factor: int | None = None):
        if self.kind in IVF_KINDS:
            base = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel) if sel else \
                faiss.SearchParametersIVF(nprobe=nprobe)
            if self.manifest["params"].get("refine", "none") != "none":
                factor = k_factor or self.manifest["params"]["refine_factor"]
                params = faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=base)
                params._keep_alive = base  # the C++ struct only points at `base`
                return params
            return base
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=ef_search, sel=sel) if sel else \
                faiss.SearchParametersHNSW(efSearch=ef_search)
        return faiss.SearchParameters(sel=sel) if sel else None

    def search_vectors(
        self, queries: np.ndarray, k: int = 10, mask: np.ndarray | None = None,
        nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (Q, k'); k' = min(k, allowed vectors); ids never -1.

        ``rerank`` (ivfpq with a refine stage): candidates re-ranked per query, i.e. k_factor =
        rerank / k; other kinds have no re-ranking stage and ignore it."""
        k_factor = max(1, -(-rerank // k)) if rerank else None
        q = files.l2_normalise(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n_ok = len(self) if mask is None else int(mask.sum())
        want = min(k, n_ok)
        if want == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        sel = bits = None
        if mask is not None and n_ok < len(self):
            bits = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        defaults = self.manifest.get("search_defaults", {})
        nprobe = nprobe or defaults.get("nprobe", 32)
        ef = ef_search or defaults.get("ef_search", 128)
        nlist = self.manifest["params"].get("nlist", 1)
        # A graph walk restricted to a small allowed set is both slow and unreliable: scan instead.
        exact_hnsw = self.kind == "hnsw" and sel is not None and n_ok < 0.1 * len(self)
        while True:
            if exact_hnsw:
                storage = faiss.downcast_index(self.index.storage)
                D, I = storage.search(q, want, params=faiss.SearchParameters(sel=sel))
                break
            D, I = self.index.search(q, want, params=self._params(sel, nprobe, ef, k_factor))
            if (I >= 0).all():
                break
            if self.kind in IVF_KINDS and nprobe < nlist:
                nprobe = min(nlist, nprobe * 4)  # widen until every list is probed: then exhaustive
            elif self.kind == "hnsw" and not exact_hnsw:  # the graph walk starved
                exact_hnsw = True
            else:
                break
        del bits  # the bitmap must outlive the searches that read it
        if (I < 0).any():
            raise RuntimeError(f"faiss returned fewer than {want} results although {n_ok} vectors qualify")
        return D, I

    def results(self, D: np.ndarray, I: np.ndarray) -> pd.DataFrame:
        """One row per hit: query, rank, similarity, distance (1 - cosine) and the metadata."""
        q, rank = np.divmod(np.arange(I.size), I.shape[1]) if I.size else (np.zeros(0, int),) * 2
        ids = I.reshape(-1)
        meta = self._meta.table.take(pa.array(ids)).select(META_COLUMNS).to_pandas()
        sim = D.reshape(-1).astype(np.float64)
        head = pd.DataFrame({"query": q, "rank": rank + 1, "id": ids, "similarity": sim,
                             "distance": 1.0 - sim})
        return pd.concat([head, meta], axis=1)

    def query(
        self, vector: np.ndarray | None = None, *, cell: str | None = None, unique_id: str | None = None,
        latlon: tuple[float, float] | None = None, k: int = 10, filters: SearchFilter | None = None,
        cell_mode: Literal["central", "mean"] = "central", exclude_query: bool = False,
        nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None,
    ) -> pd.DataFrame:
        """k most similar fragments to exactly one of: a raw vector, a cell, a unique_id, a lat/lon.

        A lat/lon is mapped to its Major TOM cell and queried like ``cell``. ``exclude_query``
        drops the query's own fragment (unique_id) or all fragments of its cell (cell / lat/lon).
        """
        given = [x is not None for x in (vector, cell, unique_id, latlon)]
        if sum(given) != 1:
            raise ValueError("give exactly one of vector, cell, unique_id or latlon")
        mask = self.allowed(filters)
        own = None
        if latlon is not None:
            from majortom_assets.grid import get_grid

            cell = str(get_grid().latlon_to_cell_name(float(latlon[0]), float(latlon[1])))
        if cell is not None:
            vector = self.cell_vector(cell, cell_mode)
            own = self.ids_of_cell(cell)
        elif unique_id is not None:
            own = np.array([self.id_of(unique_id)])
            vector = self.vectors_at(own)
        if exclude_query and own is not None:
            mask = np.ones(len(self), bool) if mask is None else mask.copy()
            mask[own] = False
        D, I = self.search_vectors(vector, k, mask, nprobe, ef_search, rerank=rerank)
        return self.results(D, I)


class IncrementalSearchIndex(SearchIndex):
    """The query API of `SearchIndex` over an incremental index (`vectors.incremental`).

    Ids here are positions 0..N-1 over the live rows (row segments in id order), aligned with
    the concatenated per-row metadata; faiss' own ids (with holes left by replaced rows) stay
    inside the `incremental.Searcher`. Exact vectors come from the index's memory-mapped copies,
    so queries by cell or unique_id never re-read the row files.
    """

    def __init__(self, directory: Path, searcher, meta: _Meta, manifest: dict) -> None:
        self.searcher = searcher
        super().__init__(directory, searcher.index, meta, manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> IncrementalSearchIndex:
        from majortom_assets.vectors import incremental

        d = Path(directory)
        index = incremental.IncrementalIndex(d)
        searcher = index.open_searcher()
        parts = []
        for seg in searcher.segments:
            path = seg.directory / "meta.parquet"
            if not path.is_file():
                raise FileNotFoundError(f"{d}: row {seg.name} has no metadata ({path}); it was built without "
                                        "row metadata and can only be searched by vector (Searcher)")
            parts.append(pq.read_table(path))
        if not parts:
            raise ValueError(f"{d}: the incremental index holds no rows")
        table = pa.concat_tables(parts, promote_options="default")
        meta = _Meta.of(table)
        manifest = {**index.manifest, "params": {"nlist": searcher.nlist}}
        return cls(d, searcher, meta, manifest)

    def close(self) -> None:
        """Free the index before the inverted lists it reads (`incremental.Searcher.close`)."""
        self.index = None
        self.searcher.close()

    def __len__(self) -> int:
        return len(self.searcher)

    def vectors_at(self, ids: np.ndarray) -> np.ndarray:
        return self.searcher.vectors(np.asarray(ids, dtype=np.int64))

    def search_vectors(
        self, queries: np.ndarray, k: int = 10, mask: np.ndarray | None = None,
        nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ candidates re-ranked exactly (``rerank`` of them, default from the index);
        like the other kinds, widens nprobe until min(k, allowed) results are found."""
        q = files.l2_normalise(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if rerank is not None and rerank < 0:
            raise ValueError(f"rerank must be >= 0, got {rerank}")
        n_ok = len(self) if mask is None else int(mask.sum())
        want = min(k, n_ok)
        if want == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        allowed = mask if mask is not None and n_ok < len(self) else None
        nprobe = nprobe or self.searcher.config.nprobe
        while True:
            D, I = self.searcher.search(q, want, nprobe=nprobe, rerank=rerank, allowed=allowed)
            if (I[:, :want] >= 0).all() or nprobe >= self.searcher.nlist:
                break
            nprobe = min(self.searcher.nlist, nprobe * 4)
        D, I = D[:, :want], I[:, :want]
        if (I < 0).any():
            raise RuntimeError(f"faiss returned fewer than {want} results although {n_ok} vectors qualify")
        return D, I


def exact_search(paths: Sequence[Path], queries: np.ndarray, k: int = 10,
                 batch_rows: int = files.DEFAULT_BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Streaming brute-force cosine top-k (the recall reference); ids are global row numbers."""
    q = files.l2_normalise(np.atleast_2d(queries))
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    start = 0
    for path in files.as_paths(paths):
        for _, x, _ in files.iter_embeddings(path, batch_rows):
            s = q @ files.l2_normalise(x).T
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)), s.shape)], 1)
            kk = min(k, cand_s.shape[1])
            top = np.argpartition(-cand_s, kk - 1, axis=1)[:, :kk]
            top_s = np.take_along_axis(cand_s, top, 1)
            order = np.argsort(-top_s, axis=1, kind="stable")
            best_s = np.take_along_axis(top_s, order, 1)
            best_i = np.take_along_axis(np.take_along_axis(cand_i, top, 1), order, 1)
            start += len(x)
    return best_s, best_i

"""A similarity index that grows by the row: trained once, extended per row, searched from disk.

Why: the flat / IVF indexes of `search.py` are rebuilt from every row file on each change, which
at archive scale (56 M vectors per model) is hours of reading for one new row. Here:

* **Compressed codes, exact re-ranking.** IVF-PQ (``nlist`` coarse lists, ``pq_m`` bytes per
  vector) finds ``rerank`` candidates; their exact float32 vectors (L2-normalised, kept per row in
  a memory-mapped ``vectors.npy``) give the final cosine order. PQ only has to put the true
  neighbours among the candidates, so 8 bits per 8 dimensions suffice.
* **Trained once.** The coarse quantiser and PQ codebooks are trained on a sample and reused for
  every later row. A drift check guards this: each added row's mean quantisation residual
  (``||x - decode(encode(x))||²``) is compared with the residual of held-out training vectors;
  a ratio above ``drift_threshold`` (or a collection grown ``grow_factor`` × past the size the
  lists were sized for) marks the index for retraining, which `update` then does (or ``--retrain``).
* **Per-row segments.** A row's codes, coarse-list numbers, exact vectors and metadata live in
  ``rows/<ROW>-<first id>/``. Adding a row encodes only that row; replacing one writes a new
  segment with fresh ids and drops the old one (its ids become dead); nothing else is read.
* **Packed on-disk inverted lists.** Searching 1,700 small segments would be slow, so segments
  are periodically packed into one faiss ``OnDiskInvertedLists`` file (memory-mapped: resident
  memory is the pages a query touches). Rows added since the last pack are held in memory and
  stacked on top (``HStackInvertedLists``); dead ids of replaced rows are masked by an id bitmap.
  Packing reads only codes (``pq_m`` + 8 bytes per vector, never the embeddings) and happens when
  the unpacked part exceeds ``pack_fraction`` of the packed one, so its cost per added vector is
  amortised constant.

Every write goes to a new directory or a temp file that is renamed into place, and the manifest
(the single source of truth for which segments are live) is replaced last, so a crash leaves the
previous state readable; `verify` checks ids, counts and files against the manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from majortom_assets.vectors import files

FORMAT = "majortom-incremental-index/1"
MANIFEST_FILE = "manifest.json"
TRAINED_FILE = "trained.faiss"
ROWS_DIR = "rows"
PACKED_INDEX = "index.faiss"
PACKED_LISTS = "lists.ivfdata"
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class IncrementalConfig(BaseModel):
    """Training and search parameters; defaults scale with the expected number of vectors."""

    model_config = ConfigDict(extra="forbid")
    nlist: int | None = Field(None, ge=1, description="coarse lists; default ~4·sqrt(N), power of 2, <= 4096")
    pq_m: int | None = Field(None, ge=1, description="PQ bytes per vector; default dim/8 (must divide dim)")
    pq_nbits: int | None = Field(None, ge=1, le=8, description="bits per PQ code; default 8 (fewer for tiny samples)")
    train_size: int | None = Field(None, ge=1, description="training sample; default 40·nlist, >= 20k")
    holdout: int = Field(2_000, ge=1, description="sample vectors kept out of training for the drift baseline")
    kmeans_iters: int = Field(10, ge=1)
    nprobe: int = Field(32, ge=1, description="default lists probed per query")
    rerank: int = Field(200, ge=0, description="default PQ candidates re-ranked with exact vectors (0: none)")
    drift_threshold: float = Field(1.5, gt=1.0, description="retrain when a row's residual / training residual exceeds this")
    grow_factor: float = Field(16.0, gt=1.0, description="retrain when live vectors exceed this × the trained-for count")
    pack_fraction: float = Field(0.25, gt=0.0, description="pack when unpacked (or dead) vectors exceed this share")
    batch_rows: int = Field(files.DEFAULT_BATCH_ROWS, ge=1)
    seed: int = 0


class DriftError(RuntimeError):
    """Raised by `update(retrain="never")` when a row no longer fits the trained codebooks."""


# ----------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence faiss' C-level printf chatter (on-disk list resizing, file renames) on fd 1, so
    `--format json` output and logs stay clean."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:   # no real fd 1 (embedded interpreters): nothing to protect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"row name {name!r} must be letters, digits, '_' or '.' (e.g. 136U)")
    return name


def _write_json(path: Path, data: dict) -> None:
    """Atomic replace of a small JSON file (temp file in the same directory, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ptr(a: np.ndarray):
    """faiss pointer to an array the caller keeps alive (a temporary would be freed first)."""
    return faiss.swig_ptr(a)


def file_stamp(path: Path) -> dict:
    """What says a row file changed: size, mtime and row count (footer only)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "rows": pq.ParquetFile(path).metadata.num_rows}


# ----------------------------------------------------------------------------------- training
def default_params(n: int, dim: int, config: IncrementalConfig) -> dict:
    """nlist, pq_m, pq_nbits and the training-sample size for about `n` vectors of width `dim`."""
    nlist = config.nlist or min(4096, max(1, _pow2(4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n // 39 or 1))   # faiss k-means wants >= 39 points per centroid
    m = config.pq_m or max(1, dim // 8)
    if dim % m:
        raise ValueError(f"pq_m={m} must divide the embedding dimension {dim}")
    train = config.train_size or max(40 * nlist, 20_000)
    usable = min(train, n)
    # 8-bit codes want ~39 training points per centroid; tiny collections get coarser codes
    # (re-ranking with exact vectors keeps the final order exact anyway)
    nbits = config.pq_nbits or min(8, max(1, int(math.log2(max(2, usable // 39)))))
    if usable < max(2, 1 << nbits):
        raise ValueError(f"{usable} vectors are too few to train {1 << nbits}-centroid PQ codebooks")
    return {"nlist": nlist, "pq_m": m, "pq_nbits": nbits, "train_size": train}


def train(sample: np.ndarray, config: IncrementalConfig, expected: int | None = None) -> tuple[faiss.Index, dict]:
    """An empty trained IVF-PQ (L2 metric on unit vectors: same order as cosine, and faiss' fast
    residual tables) plus the training record (held-out residual = the drift baseline)."""
    x = files.l2_normalise(sample)
    n, dim = x.shape
    hold = min(config.holdout, max(1, n // 5))
    rng = np.random.default_rng(config.seed)
    perm = rng.permutation(n)
    held, fit = x[perm[:hold]], x[perm[hold:]]
    params = default_params(expected or n, dim, config)
    params["nlist"] = max(1, min(params["nlist"], len(fit) // 39 or 1))
    spec = f"IVF{params['nlist']},PQ{params['pq_m']}x{params['pq_nbits']}"
    index = faiss.index_factory(dim, spec, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = config.kmeans_iters
    ivf.cp.seed = config.seed
    pq_ = faiss.downcast_index(ivf).pq
    pq_.cp.niter = config.kmeans_iters
    pq_.cp.seed = config.seed
    pq_.cp.max_points_per_centroid = 64   # 16k points per 256-centroid sub-quantiser: ample, 4x faster
    t0 = time.perf_counter()
    index.train(fit)
    record = {"factory": spec, **params, "vectors": len(fit), "expected": int(expected or n),
              "residual": residual(index, held), "seconds": round(time.perf_counter() - t0, 3)}
    return index, record


def residual(index: faiss.Index, x: np.ndarray, limit: int = 20_000) -> float:
    """Mean squared quantisation error of (at most `limit` of) the unit vectors `x`."""
    if len(x) > limit:
        x = x[np.linspace(0, len(x) - 1, limit).astype(np.int64)]
    x = np.ascontiguousarray(x, np.float32)
    rec = index.sa_decode(index.sa_encode(x))
    return float(np.mean(np.sum((x - rec) ** 2, axis=1)))


def residual_of_codes(index: faiss.Index, x: np.ndarray, lists: np.ndarray, codes: np.ndarray,
                      limit: int = 20_000) -> float:
    """`residual` from codes already computed by `encode` (no second coarse assignment):
    IVF-PQ reconstructs a vector as its list centroid + the decoded PQ residual."""
    if len(x) > limit:
        pick = np.linspace(0, len(x) - 1, limit).astype(np.int64)
        x, lists, codes = x[pick], lists[pick], codes[pick]
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    keys = np.ascontiguousarray(lists, np.int64)
    rec = ivf.quantizer.reconstruct_batch(keys)
    if ivf.by_residual:
        rec += ivf.pq.decode(np.ascontiguousarray(codes))
    else:
        rec = ivf.pq.decode(np.ascontiguousarray(codes))
    return float(np.mean(np.sum((x - rec) ** 2, axis=1)))


def encode(index: faiss.Index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coarse list numbers int32, PQ codes uint8 (n, code_size)) of unit vectors."""
    ivf = faiss.extract_index_ivf(index)
    x = np.ascontiguousarray(x, np.float32)
    _, lists = ivf.quantizer.search(x, 1)
    lists = np.ascontiguousarray(lists.reshape(-1), np.int64)
    codes = np.empty((len(x), ivf.code_size), np.uint8)
    if len(x):
        ivf.encode_vectors(len(x), _ptr(x), _ptr(lists), _ptr(codes), False)
    return lists.astype(np.int32), codes


# ----------------------------------------------------------------------------------- the index
@dataclass
class RowSegment:
    name: str
    start: int
    count: int
    directory: Path

    @property
    def stop(self) -> int:
        return self.start + self.count


def segment_entries(segment: RowSegment) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(inverted list, count, ids, codes) of one row segment, grouped by list: what faiss'
    add_entries / update_entries take. The arrays are views into contiguous copies this generator
    keeps alive while the caller hands their pointers to faiss."""
    lists = np.load(segment.directory / "lists.npy")
    order = np.argsort(lists, kind="stable")
    codes = np.ascontiguousarray(np.load(segment.directory / "codes.npy", mmap_mode="r")[order])
    ids = np.ascontiguousarray(order.astype(np.int64) + segment.start)
    uniq, first, counts = np.unique(lists[order], return_index=True, return_counts=True)
    for lst, a, c in zip(uniq.tolist(), first.tolist(), counts.tolist()):
        yield lst, c, ids[a:], codes[a:]


class IncrementalIndex:
    """The on-disk index: manifest, trained codebooks, row segments and packed lists.

    Write side (`create`, `add_row`, `remove_row`, `pack`) for one writer at a time; read side
    via `open_searcher` (any number of readers, each sees the manifest it loaded).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} is not an incremental index (no {MANIFEST_FILE})")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT}")
        self.config = IncrementalConfig(**self.manifest["config"])
        self._trained: faiss.Index | None = None

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | os.PathLike, sample: np.ndarray, config: IncrementalConfig | None = None,
               model: str | None = None, expected: int | None = None) -> IncrementalIndex:
        """Train on `sample` and write an empty index to `directory` (which must not exist or be
        empty: full rebuilds create in a temp directory and swap it in, see `update`)."""
        config = config or IncrementalConfig()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if any(d.iterdir()):
            raise FileExistsError(f"{d} is not empty; an index is created in a fresh directory")
        index, record = train(sample, config, expected)
        faiss.write_index(index, str(d / TRAINED_FILE))
        (d / ROWS_DIR).mkdir()
        manifest = {
            "format": FORMAT, "kind": "incremental", "model": model, "dim": int(sample.shape[1]),
            "metric": "cosine (IVF-PQ candidates, exact re-ranking)", "code_size": int(
                faiss.extract_index_ivf(index).code_size), "config": config.model_dump(),
            "training": record, "next_id": 0, "rows": {}, "packed": None, "drift": {},
            "faiss_version": faiss.__version__,
        }
        _write_json(d / MANIFEST_FILE, manifest)
        return cls(d)

    # -- state -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return sum(r["count"] for r in self.manifest["rows"].values())

    def segments(self) -> list[RowSegment]:
        """Live row segments in id order."""
        rows = sorted(self.manifest["rows"].items(), key=lambda kv: kv[1]["start"])
        return [RowSegment(name, r["start"], r["count"], self.directory / ROWS_DIR / r["dir"]) for name, r in rows]

    def trained_index(self) -> faiss.Index:
        if self._trained is None:
            self._trained = faiss.read_index(str(self.directory / TRAINED_FILE))
        return self._trained

    def _save(self) -> None:
        _write_json(self.directory / MANIFEST_FILE, self.manifest)

    def needs_retrain(self) -> list[str]:
        """Why the codebooks should be retrained (empty: they still fit)."""
        why = [f"row {row}: residual {ratio:.2f}× the training residual"
               for row, ratio in sorted(self.manifest.get("drift", {}).items())]
        expected = self.manifest["training"]["expected"]
        if self.count > self.config.grow_factor * expected:
            why.append(f"{self.count} vectors, {self.count / expected:.0f}× the {expected} the lists were sized for")
        return why

    # -- writing ---------------------------------------------------------------------------------
    def add_row(self, name: str, x: np.ndarray, meta: pa.Table | None = None, source: dict | None = None,
                pack: bool | None = None) -> dict:
        """Add (or replace) row `name` with vectors `x` (normalised here) and optional per-vector
        metadata; returns the row's manifest entry. Replacing a row kills its old ids."""
        check_name(name)
        x = files.l2_normalise(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"row {name}: vectors of shape {x.shape}, the index holds dimension {self.dim}")
        if meta is not None and meta.num_rows != len(x):
            raise ValueError(f"row {name}: {meta.num_rows} metadata rows for {len(x)} vectors")
        index = self.trained_index()
        start = int(self.manifest["next_id"])
        dirname = f"{name}-{start}"
        final = self.directory / ROWS_DIR / dirname
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.tmp-", dir=self.directory / ROWS_DIR))
        try:
            lists, codes = encode(index, x)
            np.save(tmp / "lists.npy", lists)
            np.save(tmp / "codes.npy", codes)
            np.save(tmp / "vectors.npy", x)
            if meta is not None:
                pq.write_table(meta, tmp / "meta.parquet", compression="zstd")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        base = max(self.manifest["training"]["residual"], 1e-12)
        ratio = residual_of_codes(index, x, lists, codes) / base if len(x) else 0.0
        old = self.manifest["rows"].get(name)
        entry = {"start": start, "count": len(x), "dir": dirname, "residual_ratio": round(ratio, 4),
                 "source": source}
        self.manifest["rows"][name] = entry
        self.manifest["next_id"] = start + len(x)
        drift = self.manifest.setdefault("drift", {})
        drift.pop(name, None)
        if ratio > self.config.drift_threshold:
            drift[name] = round(ratio, 4)
        self._save()
        if old is not None:
            shutil.rmtree(self.directory / ROWS_DIR / old["dir"], ignore_errors=True)
        if pack or (pack is None and self.should_pack()):
            self.pack()
        return entry

    def remove_row(self, name: str) -> None:
        old = self.manifest["rows"].pop(name, None)
        if old is None:
            raise KeyError(f"row {name} is not in the index {self.directory}")
        self.manifest.get("drift", {}).pop(name, None)
        self._save()
        shutil.rmtree(self.directory / ROWS_DIR / old["dir"], ignore_errors=True)
        if self.should_pack():
            self.pack()

    def _packed_live(self) -> tuple[int, int, int]:
        """(packed live vectors, packed dead vectors, unpacked live vectors)."""
        packed = self.manifest.get("packed") or {"rows": {}, "count": 0}
        live = sum(r["count"] for n, r in self.manifest["rows"].items() if packed["rows"].get(n) == r["start"])
        return live, packed["count"] - live, self.count - live

    def should_pack(self) -> bool:
        live, dead, unpacked = self._packed_live()
        share = self.config.pack_fraction * max(live, 1)
        return unpacked > share or dead > share

    def pack(self) -> dict:
        """Write every live row's codes into one on-disk inverted-lists file (codes only: no
        vector is read or re-encoded), swap it in via the manifest, delete the previous pack."""
        segs = self.segments()
        trained = self.trained_index()
        ivf = faiss.extract_index_ivf(trained)
        nlist, cs = ivf.nlist, ivf.code_size
        sizes = np.zeros(nlist, np.int64)
        for s in segs:
            sizes += np.bincount(np.load(s.directory / "lists.npy"), minlength=nlist)
        generation = int((self.manifest.get("packed") or {}).get("generation", 0)) + 1
        name = f"packed-{generation}"
        final = self.directory / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.directory))
        t0 = time.perf_counter()
        try:
            with quiet_stdout():
                il = faiss.OnDiskInvertedLists(nlist, cs, str(tmp / PACKED_LISTS))
                total = int(sizes.sum()) * (cs + 8)
                il.update_totsize(max(total + 8 * nlist * (cs + 8), 4096))
                for lst in np.flatnonzero(sizes):
                    il.resize(int(lst), int(sizes[lst]))
                fill = np.zeros(nlist, np.int64)
                for s in segs:
                    for lst, c, ids, codes in segment_entries(s):
                        il.update_entries(lst, int(fill[lst]), c, _ptr(ids), _ptr(codes))
                        fill[lst] += c
                packed = faiss.read_index(str(self.directory / TRAINED_FILE))
                pivf = faiss.extract_index_ivf(packed)
                pivf.replace_invlists(il, True)
                il.this.disown()
                pivf.ntotal = packed.ntotal = int(sizes.sum())
                faiss.write_index(packed, str(tmp / PACKED_INDEX))
                del packed
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        previous = (self.manifest.get("packed") or {}).get("dir")
        self.manifest["packed"] = {"dir": name, "generation": generation, "count": int(sizes.sum()),
                                   "rows": {s.name: s.start for s in segs},
                                   "seconds": round(time.perf_counter() - t0, 3)}
        self._save()
        if previous and previous != name:
            shutil.rmtree(self.directory / previous, ignore_errors=True)
        return self.manifest["packed"]

    def clean(self) -> list[Path]:
        """Remove directories no manifest entry names (left by a crash between write and swap)."""
        keep = {r["dir"] for r in self.manifest["rows"].values()}
        packed = (self.manifest.get("packed") or {}).get("dir")
        removed = []
        for p in (self.directory / ROWS_DIR).iterdir():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        for p in self.directory.glob("*packed-*"):
            if p.name != packed:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    # -- checking --------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems with ids/rows consistency (empty list: consistent). Checks that row id ranges
        are disjoint and below next_id, each segment's files exist with the manifest's count and
        shapes, list numbers are valid, and the packed lists hold exactly the ids of the rows the
        manifest says were packed."""
        problems = []
        ivf = faiss.extract_index_ivf(self.trained_index())
        segs = self.segments()
        prev_stop = 0
        for s in segs:
            if s.start < prev_stop:
                problems.append(f"row {s.name}: ids [{s.start}, {s.stop}) overlap the previous row")
            prev_stop = max(prev_stop, s.stop)
            if s.stop > self.manifest["next_id"]:
                problems.append(f"row {s.name}: ids reach {s.stop} beyond next_id {self.manifest['next_id']}")
            if not s.directory.is_dir():
                problems.append(f"row {s.name}: segment {s.directory} is missing")
                continue
            try:
                lists = np.load(s.directory / "lists.npy", mmap_mode="r")
                codes = np.load(s.directory / "codes.npy", mmap_mode="r")
                vecs = np.load(s.directory / "vectors.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                problems.append(f"row {s.name}: unreadable segment file in {s.directory}: {exc}")
                continue
            shapes = {"lists": (lists.shape, (s.count,)), "codes": (codes.shape, (s.count, ivf.code_size)),
                      "vectors": (vecs.shape, (s.count, self.dim))}
            for what, (got, want) in shapes.items():
                if tuple(got) != want:
                    problems.append(f"row {s.name}: {what}.npy has shape {tuple(got)}, expected {want}")
            if len(lists) and (int(lists.min()) < 0 or int(lists.max()) >= ivf.nlist):
                problems.append(f"row {s.name}: coarse list numbers outside [0, {ivf.nlist})")
            meta = s.directory / "meta.parquet"
            if meta.is_file() and pq.ParquetFile(meta).metadata.num_rows != s.count:
                problems.append(f"row {s.name}: meta.parquet has {pq.ParquetFile(meta).metadata.num_rows} rows, "
                                f"expected {s.count}")
        packed = self.manifest.get("packed")
        if packed:
            try:
                with quiet_stdout():
                    index = faiss.read_index(str(self.directory / packed["dir"] / PACKED_INDEX),
                                             faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
            except RuntimeError as exc:
                return [*problems, f"packed lists {packed['dir']} unreadable: {exc}"]
            il = faiss.extract_index_ivf(index).invlists
            ids = [faiss.rev_swig_ptr(il.get_ids(lst), il.list_size(lst)).copy()
                   for lst in range(il.nlist) if il.list_size(lst)]
            got = np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
            starts = sorted(packed["rows"].values())
            counts = {r["start"]: r["count"] for r in self.manifest["rows"].values()}
            want = [np.arange(st, st + counts[st]) for st in starts if st in counts]
            want = np.concatenate(want) if want else np.zeros(0, np.int64)
            live = np.isin(got, want)
            if len(got) != packed["count"]:
                problems.append(f"packed lists hold {len(got)} ids, the manifest says {packed['count']}")
            if not np.array_equal(got[live], want):
                problems.append("packed lists do not hold exactly the ids of the live packed rows")
        return problems

    # -- reading ---------------------------------------------------------------------------------
    def open_searcher(self) -> Searcher:
        return Searcher(self)


class Searcher:
    """A loaded, read-only view: packed on-disk lists (memory-mapped) + unpacked rows in memory,
    a bitmap of live ids, and the exact vectors of every row memory-mapped for re-ranking."""

    def __init__(self, index: IncrementalIndex) -> None:
        self.owner = index
        self.manifest = index.manifest
        self.config = index.config
        self.dim = index.dim
        self.segments = index.segments()
        self.index = faiss.read_index(str(index.directory / TRAINED_FILE))
        ivf = faiss.extract_index_ivf(self.index)
        self._keep: list = []   # faiss objects the index points at (python must keep them alive)
        packed = self.manifest.get("packed")
        packed_rows = (packed or {}).get("rows", {})
        lists = []
        if packed:
            with quiet_stdout():
                pidx = faiss.read_index(str(index.directory / packed["dir"] / PACKED_INDEX),
                                        faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
            pivf = faiss.extract_index_ivf(pidx)
            ondisk = faiss.downcast_InvertedLists(pivf.invlists)
            pivf.own_invlists = False
            ondisk.this.acquire()
            del pidx
            lists.append(ondisk)
        delta = [s for s in self.segments if packed_rows.get(s.name) != s.start]
        if delta or not lists:
            arr = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
            for s in delta:
                for li, c, ids, codes in segment_entries(s):
                    arr.add_entries(li, c, _ptr(ids), _ptr(codes))
            lists.append(arr)
        self._keep.extend(lists)
        if len(lists) == 1:
            combined = lists[0]
        else:
            vec = faiss.InvertedListsPtrVector()
            for il in lists:
                vec.push_back(il)
            combined = faiss.HStackInvertedLists(vec.size(), vec.data())
            self._keep.extend([vec, combined])
        ivf.replace_invlists(combined, False)
        self.ntotal_ids = int(self.manifest["next_id"])
        ivf.ntotal = self.index.ntotal = sum(il.compute_ntotal() for il in lists)
        self.nlist = ivf.nlist
        self.starts = np.array([s.start for s in self.segments], np.int64)
        self.counts = np.array([s.count for s in self.segments], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.live_bits = np.zeros((self.ntotal_ids + 7) // 8, np.uint8)
        live = np.zeros(self.ntotal_ids, bool)
        for s in self.segments:
            live[s.start:s.stop] = True
        self.live_bits = np.packbits(live, bitorder="little")
        self.all_live = self.index.ntotal == len(self)
        # plain ndarray views of the maps: np.memmap's Python-level __getitem__ costs more than
        # the gather itself at ~50 candidates per query
        self._vectors = [np.asarray(np.load(s.directory / "vectors.npy", mmap_mode="r")) for s in self.segments]

    def close(self) -> None:
        """Free the faiss objects in dependency order: the index first, then the inverted lists it
        points at. Left to Python's shutdown garbage collection they go in any order, and a list
        freed before the index that reads it crashed the process at exit. Idempotent."""
        if self.index is None:
            return
        ivf = faiss.extract_index_ivf(self.index)
        empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(empty, True)   # the index owns an empty list set, not ours
        empty.this.disown()
        self.index = None
        while self._keep:
            self._keep.pop()                # HStack and its pointer vector before the lists

    def __len__(self) -> int:
        return int(self.offsets[-1])

    # -- id <-> position (positions are 0..N-1 over live rows in id order) -------------------------
    def ids_of(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        seg = np.searchsorted(self.offsets, positions, side="right") - 1
        return self.starts[seg] + positions - self.offsets[seg]

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        seg = np.searchsorted(self.starts, ids, side="right") - 1
        return self.offsets[seg] + ids - self.starts[seg]

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """Exact (unit) vectors at live positions, gathered from the memory-mapped row files."""
        positions = np.asarray(positions, np.int64)
        seg = np.searchsorted(self.offsets, positions, side="right") - 1
        if len(self._vectors) == 1 or (len(seg) and seg.min() == seg.max()):
            s = int(seg[0]) if len(seg) else 0
            return np.asarray(self._vectors[s][positions - self.offsets[s]], np.float32)
        out = np.empty((len(positions), self.dim), np.float32)
        for s in np.unique(seg):
            sel = np.flatnonzero(seg == s)
            out[sel] = self._vectors[s][positions[sel] - self.offsets[s]]
        return out

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, rerank: int | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, live positions), each (Q, k'); `allowed` is an optional boolean
        mask over positions. Positions of -1 mean fewer than k candidates were found."""
        q = files.l2_normalise(np.atleast_2d(np.asarray(queries, np.float32)))
        nprobe = min(nprobe or self.config.nprobe, self.nlist)
        rerank = self.config.rerank if rerank is None else rerank
        cand = max(k, rerank)
        bits = self.live_bits
        if allowed is not None:
            ok = np.zeros(self.ntotal_ids, bool)
            ok[self.ids_of(np.flatnonzero(allowed))] = True
            bits = np.packbits(ok, bitorder="little")
        if allowed is None and self.all_live:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
        else:
            sel = faiss.IDSelectorBitmap(self.ntotal_ids, _ptr(bits))
            params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
        D, I = self.index.search(q, cand, params=params)
        del bits
        valid = I >= 0
        pos = np.where(valid, self.positions_of(np.where(valid, I, self.starts[0] if len(self.starts) else 0)), -1)
        if rerank == 0:
            sims = np.where(valid, 1.0 - D / 2.0, -np.inf).astype(np.float32)
        else:
            sims = np.full(pos.shape, -np.inf, np.float32)
            flat = pos[valid]
            if len(flat):
                x = self.vectors(flat)
                rows = np.nonzero(valid)[0]
                sims[valid] = np.einsum("ij,ij->i", x, q[rows])
        kk = min(k, cand)
        top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        S = np.take_along_axis(sims, top, 1)
        P = np.take_along_axis(pos, top, 1)
        P[~np.isfinite(S)] = -1
        return S, P

    def resident_bytes(self) -> dict:
        """What a loaded searcher keeps in memory, by part (the packed lists are memory-mapped)."""
        ivf = faiss.extract_index_ivf(self.index)
        return {"coarse_centroids": int(ivf.nlist * self.dim * 4),
                "pq_codebooks": int(faiss.downcast_index(ivf).pq.centroids.size() * 4),
                "live_bitmap": int(self.live_bits.nbytes)}


# ----------------------------------------------------------------------------------- from files
def read_row(path: Path, batch_rows: int, columns: list[str]) -> tuple[np.ndarray, pa.Table]:
    """One row file's embeddings (float32) and the metadata columns, read batch by batch."""
    xs, metas = [], []
    for _, x, meta in files.iter_embeddings(path, batch_rows, columns):
        xs.append(x)
        metas.append(meta)
    dim = files.file_dim(path)
    x = np.concatenate(xs) if xs else np.zeros((0, dim), np.float32)
    return x, pa.concat_tables(metas) if metas else None


def row_name(path: Path) -> str:
    """The index's name for a row file: its grid row (``row=136U``) or, outside that layout, its stem."""
    name = files.partition_row(path) or Path(path).stem
    return check_name(name)


def _sample(paths: list[Path], n: int, size: int, seed: int, batch_rows: int) -> np.ndarray:
    return files.sample_unit_vectors(paths, n, size, seed, batch_rows)


def update(
    paths, out_dir: str | os.PathLike, config: IncrementalConfig | None = None, model: str | None = None,
    retrain: str = "auto", meta_columns: list[str] | None = None, progress: bool = False,
) -> dict:
    """Bring the index at `out_dir` up to date with the row files `paths`.

    Only files that are new or changed (size, mtime or row count differ from the manifest) are
    read; rows whose file disappeared are removed. ``retrain``: ``"auto"`` rebuilds from scratch
    when there is no index, the dimension changed, or the drift check asks for it; ``"always"``
    rebuilds; ``"never"`` raises `DriftError` instead of rebuilding. A rebuild is written to a
    temp directory and swapped in atomically. Returns a report (rows read/kept/removed, why a
    rebuild happened, timings).
    """
    from tqdm.auto import tqdm

    if retrain not in ("auto", "always", "never"):
        raise ValueError(f"retrain must be auto, always or never, got {retrain!r}")
    paths = files.as_paths(paths)
    out = Path(out_dir)
    names = [row_name(p) for p in paths]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"several files map to the same row name(s) {sorted(dup)}: {paths}")
    dim = files.common_dim(paths)
    t0 = time.perf_counter()
    reasons: list[str] = []
    existing = None
    if (out / MANIFEST_FILE).is_file():
        try:
            existing = IncrementalIndex(out)
        except (ValueError, KeyError) as exc:
            reasons.append(f"existing index unreadable ({exc})")
    elif out.exists() and any(out.iterdir()):
        reasons.append(f"{out} holds another kind of index")
    else:
        reasons.append("no index yet")
    if existing is not None:
        config = config or existing.config
        if existing.dim != dim:
            reasons.append(f"dimension changed from {existing.dim} to {dim}")
        if retrain == "always":
            reasons.append("retrain requested")
    config = config or IncrementalConfig()
    meta_columns = list(meta_columns or [])
    report = {"rows_read": [], "rows_kept": [], "rows_removed": [], "retrained": False, "reasons": reasons}

    def add(index: IncrementalIndex, todo: list[tuple[str, Path]]) -> None:
        bar = tqdm(total=len(todo), desc="index rows", unit="row", disable=not progress)
        for name, path in todo:
            x, meta = read_row(path, config.batch_rows, meta_columns)
            index.add_row(name, x, meta if meta_columns else None,
                          source={"path": str(path.resolve()), **file_stamp(path)}, pack=False)
            report["rows_read"].append(name)
            bar.update(1)
        bar.close()

    if existing is not None and not reasons:
        rows = existing.manifest["rows"]
        todo = []
        for name, path in zip(names, paths):
            src = (rows.get(name) or {}).get("source") or {}
            stamp = file_stamp(path)
            if src.get("path") == str(path.resolve()) and all(src.get(k) == v for k, v in stamp.items()):
                report["rows_kept"].append(name)
            else:
                todo.append((name, path))
        for gone in sorted(set(rows) - set(names)):
            existing.remove_row(gone)
            report["rows_removed"].append(gone)
        add(existing, todo)
        why = existing.needs_retrain()
        if why and retrain == "never":
            raise DriftError(f"{out}: the trained codebooks no longer fit ({'; '.join(why)}); "
                             "rebuild with retraining (`majortom index --retrain`)")
        if not why:
            if existing.should_pack():
                existing.pack()
            existing.clean()
            report.update(_summary(existing), seconds=round(time.perf_counter() - t0, 3))
            return report
        reasons.extend(why)
        report["rows_read"].clear()
        report["rows_kept"].clear()
    # full (re)build: sample all files, train, add every row, pack, swap in
    report["retrained"] = True
    n = files.row_count(paths)
    if n == 0:
        raise ValueError("the embedding files hold no rows to index")
    params = default_params(n, dim, config)
    sample = _sample(paths, n, params["train_size"] + config.holdout, config.seed, config.batch_rows)
    with files.atomic_directory(out) as tmp:
        index = IncrementalIndex.create(tmp, sample, config, model=model, expected=n)
        del sample
        add(index, list(zip(names, paths)))
        index.manifest["drift"] = {}   # measured against codebooks trained on these very rows
        index.pack()
    index = IncrementalIndex(out)
    report.update(_summary(index), seconds=round(time.perf_counter() - t0, 3))
    return report


def _summary(index: IncrementalIndex) -> dict:
    t = index.manifest["training"]
    return {"kind": "incremental", "count": index.count, "dim": index.dim, "rows": len(index.manifest["rows"]),
            "factory": t["factory"], "train_seconds": t["seconds"],
            "packed": (index.manifest.get("packed") or {}).get("count", 0),
            "needs_retrain": index.needs_retrain()}


def is_incremental(directory: str | os.PathLike) -> bool:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False

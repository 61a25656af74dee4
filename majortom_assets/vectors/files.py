"""Finding and streaming the Table 2 embedding partitions that every vectors module reads.

Partitions live at ``<root>/embeddings/<model>/row=<ROW>/embeddings.parquet``. Everything here reads
them in record batches so memory stays bounded by the batch, never by the model's row count; only
small per-partition metadata columns (cell, product, pixel box) are held for a whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from majortom_assets import geoparquet

EMBEDDING_FILE = "embeddings.parquet"
DEFAULT_BATCH_ROWS = 16_384
_ROW_DIR = re.compile(r"^row=(.+)$")
_log = logging.getLogger(__name__)


class UnknownModelError(ValueError):
    """A model name with no embeddings under the root; the message lists the ones that exist."""


def default_root() -> Path:
    return Path(os.environ.get("MAJORTOM_HOME", "./data"))


def known_models(root: str | os.PathLike) -> list[str]:
    base = Path(root) / "embeddings"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob(f"row=*/{EMBEDDING_FILE}")))


def model_paths(root: str | os.PathLike, model: str, rows: Sequence[str] | None = None) -> list[Path]:
    """Partition files of one model, sorted by row name; ``rows`` (e.g. ``["136U"]``) restricts them.

    Row names are validated by the grid before they touch a path, so ``rows=["../x"]`` is an error.
    """
    from majortom_assets.grid import parse_row_name, row_name

    models = known_models(root)
    if model not in models:
        raise UnknownModelError(
            f"no embeddings for model {model!r} under {Path(root) / 'embeddings'}; "
            f"known models: {', '.join(models) if models else '(none)'}"
        )
    base = Path(root) / "embeddings" / model
    if rows is None:
        return sorted(base.glob(f"row=*/{EMBEDDING_FILE}"))
    out = []
    for name in rows:
        canonical = str(row_name(parse_row_name(name)))
        path = base / f"row={canonical}" / EMBEDDING_FILE
        if not path.is_file():
            raise FileNotFoundError(f"model {model!r} has no partition for grid row {canonical}: {path}")
        out.append(path)
    return out


def partition_row(path: str | os.PathLike) -> str | None:
    """The grid row a hive-style partition path names (``row=136U``), or None for other layouts."""
    m = _ROW_DIR.match(Path(path).parent.name)
    return m.group(1) if m else None


def as_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no embedding files given")
    return out


class MixedWeightsError(ValueError):
    """Row files of one product embedded with different weights; the message names the rows."""


def weights_key(info: geoparquet.EmbeddingFileInfo) -> tuple[str, str, str | None, bool]:
    """What must be equal for two files' vectors to share a space: model, weights and their hash."""
    return info.model, info.weights, info.weights_sha256, info.random_weights


def check_same_weights(paths: Sequence[Path]) -> None:
    """MixedWeightsError unless every file was embedded by the same model with the same weights.

    Vectors of different weights live in different spaces: an index, an export, a PCA or a
    probe over both would silently compare the incomparable. Footers only (cheap). The message
    groups the rows (or files) by weights so the odd ones can be re-embedded.
    """
    groups: dict[tuple, list[str]] = {}
    for path in paths:
        try:
            info = geoparquet.read_info(path)
        except ValueError as exc:
            raise ValueError(f"{path}: cannot read its provenance ({exc})") from None
        groups.setdefault(weights_key(info), []).append(partition_row(path) or str(path))
    if len(groups) > 1:
        parts = [f"{model} weights {name!r} (sha256 {sha[:12] if sha else 'none'}"
                 f"{', random' if random else ''}): rows {', '.join(rows)}"
                 for (model, name, sha, random), rows in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
        raise MixedWeightsError("the row files were embedded with different weights and cannot be mixed: "
                                + "; ".join(parts) + ". Re-embed the odd rows with the same weights, or "
                                "select rows of one weights with --rows")


def global_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """`as_paths` for a product over many rows (index, export, PCA, evaluation): the files must
    share their weights (`check_same_weights`)."""
    out = as_paths(paths)
    check_same_weights(out)
    return out


def row_count(paths: Iterable[Path]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def file_dim(path: Path) -> int:
    """Embedding width from the file schema (the fixed_size_list size), cheap: footer only."""
    field = pq.read_schema(path).field("embedding")
    if not pa.types.is_fixed_size_list(field.type):
        return int(geoparquet.read_info(path).dim)
    return int(field.type.list_size)


def common_dim(paths: Sequence[Path]) -> int:
    dims = {p: file_dim(p) for p in paths}
    distinct = set(dims.values())
    if len(distinct) != 1:
        detail = ", ".join(f"{p}: {d}" for p, d in dims.items())
        raise ValueError(f"embedding files disagree on dimension ({detail})")
    return distinct.pop()


def iter_batches(
    path: Path, columns: Sequence[str], batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pa.Table]:
    """Record batches of one partition as small tables (row order = file order)."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
        yield pa.Table.from_batches([batch])


def iter_embeddings(
    path: Path, batch_rows: int = DEFAULT_BATCH_ROWS, columns: Sequence[str] = ()
) -> Iterator[tuple[int, np.ndarray, pa.Table]]:
    """(row offset in the file, float32 (n, dim) block, the requested extra columns) per batch."""
    offset = 0
    for table in iter_batches(path, ["embedding", *columns], batch_rows):
        x = geoparquet.embedding_matrix(table.column("embedding"))
        yield offset, x, table.drop_columns(["embedding"])
        offset += table.num_rows


def timestamps_ns(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as naive-UTC datetime64[ns] whether the file stores timestamps or ISO strings."""
    if pa.types.is_timestamp(column.type):
        if column.type.tz is None:
            column = column.cast(pa.timestamp(column.type.unit, tz="UTC"))
        return np.asarray(column.cast(pa.timestamp("ns", tz="UTC")).to_numpy(), dtype="datetime64[ns]")
    ts = pd.to_datetime(column.to_numpy(zero_copy_only=False), utc=True, format="ISO8601")
    return ts.tz_localize(None).to_numpy("datetime64[ns]")


def pixel_boxes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, 4) int64 pixel_bbox without a Python loop (list<int>[4] or fixed_size_list)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    if flat.size != 4 * len(column):
        raise ValueError("pixel_bbox must hold exactly 4 integers per row")
    return flat.astype(np.int64).reshape(-1, 4)


def central_mask(grid_cell: np.ndarray, product_id: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """True for the central fragment of each (grid_cell, product_id) sample.

    The image extent is recovered from the boxes themselves (min start, max end per sample), so
    any fragment layout works; the central fragment is the box whose centre is nearest the image
    centre, ties broken by the smaller (row_start, col_start) so the choice never depends on row
    order in the file.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=bool)
    # numpy over factorised (cell, product) groups: a row file is read once per global product,
    # so this runs ~1,700 times per archive update and its fixed cost matters more than its speed
    cell_codes, _ = pd.factorize(np.asarray(grid_cell, dtype=object))
    prod_codes, prods = pd.factorize(np.asarray(product_id, dtype=object))
    group, _ = pd.factorize(cell_codes.astype(np.int64) * (len(prods) + 1) + prod_codes)
    g = int(group.max()) + 1
    b = boxes.astype(np.float64)
    r0min, c0min = np.full(g, np.inf), np.full(g, np.inf)
    r1max, c1max = np.full(g, -np.inf), np.full(g, -np.inf)
    np.minimum.at(r0min, group, b[:, 0])
    np.minimum.at(c0min, group, b[:, 1])
    np.maximum.at(r1max, group, b[:, 2])
    np.maximum.at(c1max, group, b[:, 3])
    img_r, img_c = (r0min + r1max)[group] / 2.0, (c0min + c1max)[group] / 2.0
    d2 = ((b[:, 0] + b[:, 2]) / 2.0 - img_r) ** 2 + ((b[:, 1] + b[:, 3]) / 2.0 - img_c) ** 2
    order = np.lexsort((boxes[:, 1], boxes[:, 0], d2, group))
    first = np.r_[True, group[order][1:] != group[order][:-1]]
    mask = np.zeros(n, dtype=bool)
    mask[order[first]] = True
    return mask


def file_central_mask(path: Path) -> np.ndarray:
    meta = geoparquet.read_table(path, columns=["grid_cell", "product_id", "pixel_bbox"])
    return central_mask(
        meta.column("grid_cell").to_numpy(zero_copy_only=False),
        meta.column("product_id").to_numpy(zero_copy_only=False),
        pixel_boxes(meta.column("pixel_bbox")),
    )


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-normalised float32 copy; zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then each directory's entries."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            geoparquet.fsync_path(Path(dirpath) / name)
        geoparquet.fsync_path(dirpath, directory=True)


def _old_copies(final: Path) -> list[Path]:
    """Sibling ``.<name>.old-*`` directories that `atomic_directory` moved a previous `final` into."""
    prefix = f".{final.name}.old-"
    if not final.parent.is_dir():
        return []
    return [p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]


def _temp_dir_prefix(final: Path) -> str:
    """``.<name>.tmp-<writer tag>-<pid>-``: names the writer so a sweep can tell dead from live."""
    return f".{final.name}.tmp-{geoparquet._own_tag()}-{os.getpid()}-"


def sweep_stale_temp_dirs(path: str | os.PathLike,
                          max_age_s: float = geoparquet.STALE_TEMP_AGE_S) -> list[Path]:
    """Remove ``.<name>.tmp-*`` directories of `path` left by writers that died; returns them.

    The directory twin of `geoparquet.sweep_stale_temps`: a killed ``majortom index`` or
    ``export`` leaves its partial directory (a half-written index.faiss) behind. A directory is
    stale when its writer ran in this pid space and its pid is gone, or (a writer elsewhere, or a
    name from before writers were recorded) when it has not been modified for `max_age_s`; live
    writers' directories are kept fresh by the same heartbeat as temp files. Errors only log.
    """
    final = Path(path)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.tmp-(?:(?P<tag>[0-9a-f]{{12}})-(?P<pid>\d+)-)?"
                         rf"[A-Za-z0-9_]+$")
    tag, now = geoparquet._own_tag(), time.time()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        why = geoparquet.stale_reason(match, mtime, tag, now, max_age_s)
        if why is None:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if os.path.exists(entry.path):
            _log.warning("could not remove stale temp directory %s", entry.path)
            continue
        _log.warning("removed stale temp directory %s: %s", entry.path, why)
        removed.append(Path(entry.path))
    return removed


def recover_directory(path: str | os.PathLike) -> None:
    """Finish what a crash inside `atomic_directory` left behind.

    If `path` is missing and a moved-aside old copy exists (the crash fell between the two
    renames), the newest such copy is renamed back into place; left-over old copies beside an
    existing `path` (a crash after the swap, before clean-up) are removed, and so are the temp
    directories of writers that died (`sweep_stale_temp_dirs`).
    """
    final = Path(path)
    sweep_stale_temp_dirs(final)
    olds = _old_copies(final)
    if not final.exists():
        saved = [d / final.name for d in olds if (d / final.name).is_dir()]
        if saved:
            newest = max(saved, key=lambda p: p.stat().st_mtime_ns)
            os.replace(newest, final)
            geoparquet.fsync_path(final.parent, directory=True)
    if final.exists():
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling temp directory that replaces ``path`` only if the block succeeds.

    What is guaranteed, for a single writer of ``path``:

    * if the block fails, the temp directory is removed and ``path`` is untouched;
    * the new directory's files and directory entries are fsynced before it is swapped in, so
      ``path`` never names a partly written directory, before or after a crash;
    * the swap itself is *not* atomic: Linux cannot rename a directory over a non-empty one
      (``os.replace`` fails with ENOTEMPTY), so the old directory is first renamed aside into a
      sibling ``.<name>.old-*`` directory and the new one is then renamed into place. Between
      those two renames ``path`` is briefly missing (a reader sees no directory, never a mixed
      one). If the second rename fails, the old directory is renamed back and the error raised;
      if the process dies in that window, the old directory survives under ``.<name>.old-*`` and
      the next `atomic_directory` (or `recover_directory`) call on ``path`` restores it first;
    * the old directory is deleted only once the new one is in place.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_dir_prefix(final), dir=final.parent))
    geoparquet._HEARTBEAT.add(tmp)   # a slow live writer's directory never looks stale
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        geoparquet._HEARTBEAT.discard(tmp)
    old = None
    try:
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None and not final.exists():
                os.replace(old / final.name, final)   # put the old directory back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and final.exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    geoparquet.fsync_path(final.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sample_unit_vectors(paths, n: int, size: int, seed: int, batch_rows: int = DEFAULT_BATCH_ROWS) -> np.ndarray:
    """A uniform sample (without replacement) of `size` of the `n` rows of `paths`, L2-normalised,
    read batch by batch so memory is the sample, not the files (index training sets)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=min(size, n), replace=False))
    out, start = [], 0
    for path in paths:
        for _, x, _ in iter_embeddings(path, batch_rows):
            lo, hi = np.searchsorted(chosen, [start, start + len(x)])
            if hi > lo:
                out.append(l2_normalise(x[chosen[lo:hi] - start]))
            start += len(x)
    return np.concatenate(out)

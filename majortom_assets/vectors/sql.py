"""DuckDB access to the embedding partitions: one view per model, spatial loaded, cosine macros.

The spatial extension comes from the ``duckdb-ext-spatial`` wheel (no network): the connection's
``extension_directory`` points at ``<site-packages>/duckdb_ext/extensions``. Each view reads
``embeddings/<model>/row=*/embeddings.parquet`` with hive partitioning (so ``row`` is a
column), casts ``embedding`` to the fixed-size ``FLOAT[dim]`` that DuckDB's array functions need,
and with spatial loaded ``geometry`` arrives as a GEOMETRY. Examples: docs/sql.md.

Paths in the views are relative to the storage root and resolved through DuckDB's
``file_search_path`` (set to the root by `connect` / `open_database`), so a copied or moved data
folder reads its own files. Beside each view ``v`` a view ``v_wkb`` gives ``geometry`` as WKB
bytes for DuckDB clients without the spatial extension.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from majortom_assets.layout import StorageLayout
from majortom_assets.vectors import files

MODELS_VIEW = "majortom_models"
# What a user's query may be: reads only. EXPLAIN is allowed when what it explains is a read.
READ_STATEMENTS = frozenset({duckdb.StatementType.SELECT})
_EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN(\s+ANALY[SZ]E)?\s+", re.IGNORECASE)


class ReadOnlyQueryError(ValueError):
    """A statement that would write, attach, install or change settings, given to a read-only connection."""


def extension_directory() -> Path:
    """Where the duckdb-ext-spatial wheel keeps ``v<version>/<platform>/spatial.duckdb_extension``."""
    try:
        import duckdb_ext
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise RuntimeError("the duckdb-ext-spatial package is not installed") from exc
    for base in getattr(duckdb_ext, "__path__", []):
        path = Path(base) / "extensions"
        if path.is_dir():
            return path
    raise RuntimeError("duckdb-ext-spatial is installed but holds no extensions directory")


def view_name(model: str) -> str:
    """SQL-friendly view name of a model: non-word characters become '_' (dinov2-rgb -> dinov2_rgb)."""
    name = re.sub(r"\W", "_", model)
    return name if not name[:1].isdigit() else f"m_{name}"


def wkb_view_name(model: str) -> str:
    """The view of a model with ``geometry`` as WKB bytes, for clients without spatial."""
    return f"{view_name(model)}_wkb"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _spatial_connection(database: str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(database, read_only=read_only, config={
        "extension_directory": str(extension_directory()),
        "autoinstall_known_extensions": False,
    })
    con.execute("LOAD spatial")
    return con


def _search_under(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Resolve the views' relative paths under `root` (DuckDB's ``file_search_path``)."""
    con.execute(f"SET file_search_path = {_literal(str(root))}")


def _shadow_wkb_view(con: duckdb.DuckDBPyConnection, model: str) -> None:
    """In a session with spatial loaded the stored ``v_wkb`` view cannot bind (the Parquet reader
    turns GeoParquet geometry into GEOMETRY there, the view was stored with BLOB): a temporary
    view of the same name, which DuckDB resolves first, gives the same WKB through ST_AsWKB."""
    con.execute(f'CREATE OR REPLACE TEMP VIEW "{wkb_view_name(model)}" AS SELECT * REPLACE '
                f'(CAST(ST_AsWKB(geometry) AS BLOB) AS geometry) FROM "{view_name(model)}"')


def connect(root: str | os.PathLike | None = None, database: str = ":memory:",
            models: list[str] | None = None) -> duckdb.DuckDBPyConnection:
    """A connection with spatial loaded, one view per model, and the cosine macros.

    Macros: ``cosine_sim(a, b)`` (array_cosine_similarity of two FLOAT[dim] arrays) and, per
    model view ``v``, the table macro ``v_similar(uid, k)`` returning the k fragments most similar
    to the fragment ``uid`` (exact scan). ``majortom_models`` lists model, view, dim, partitions.
    Each view ``v`` has a twin ``v_wkb`` with ``geometry`` as WKB (BLOB): stored so that a DuckDB
    client without spatial can read it, and shadowed in this session (see `_shadow_wkb_view`).

    Views stored in a database file name their files relative to `root` (see the module
    docstring); those of an in-memory session, which lives no longer than the files stay put,
    use absolute paths, which is what `lock_down`'s allowed-directory check can vet (DuckDB
    checks the path as written, before the search path resolves it).
    """
    layout = StorageLayout.at(root if root is not None else files.default_root())
    root = layout.root
    con = _spatial_connection(database)
    _search_under(con, root)
    con.execute("CREATE OR REPLACE MACRO cosine_sim(a, b) AS array_cosine_similarity(a, b)")
    available = files.known_models(root)
    chosen = available if models is None else models
    rows = []
    for model in chosen:
        paths = files.model_paths(root, model)  # UnknownModelError lists the known ones
        dim = files.common_dim(paths)
        view = view_name(model)
        files_dir = layout.embeddings_dir(model)
        if database != ":memory:":
            files_dir = files_dir.relative_to(root)
        pattern = (files_dir / "row=*" / files.EMBEDDING_FILE).as_posix()
        select = (f"SELECT * REPLACE (CAST(embedding AS FLOAT[{dim}]) AS embedding) "
                  f"FROM read_parquet({_literal(pattern)}, hive_partitioning = true)")
        con.execute(f'CREATE OR REPLACE VIEW "{view}" AS {select}')
        # bound without GeoParquet conversion, so the stored geometry type is the file's WKB BLOB
        con.execute("SET enable_geoparquet_conversion = false")
        try:
            con.execute(f'CREATE OR REPLACE VIEW "{wkb_view_name(model)}" AS {select}')
        finally:
            con.execute("RESET enable_geoparquet_conversion")
        _shadow_wkb_view(con, model)
        con.execute(
            f'CREATE OR REPLACE MACRO "{view}_similar"(uid, k) AS TABLE '
            f'SELECT t.unique_id, t.grid_cell, t.timestamp, t.centre_lat, t.centre_lon, t.geometry, '
            f'array_cosine_similarity(t.embedding, q.embedding) AS similarity '
            f'FROM "{view}" t, (SELECT embedding FROM "{view}" WHERE unique_id = uid LIMIT 1) q '
            f"ORDER BY similarity DESC LIMIT k"
        )
        add_window_macros(con, view)
        rows.append((model, view, dim, len(paths)))
    con.execute(f"CREATE OR REPLACE TABLE {MODELS_VIEW} (model VARCHAR, view VARCHAR, dim INTEGER, "
                f"partitions INTEGER)")
    if rows:
        con.executemany(f"INSERT INTO {MODELS_VIEW} VALUES (?, ?, ?, ?)", rows)
    return con


def add_window_macros(con: duckdb.DuckDBPyConnection, view: str) -> None:
    """Time-window macros of one model view (definitions: `majortom_assets.vectors.windows`).

    * ``<view>_window(t0, t1)``: per cell, over the acquisitions between the days t0 and t1 (both
      included, UTC): ``acquisitions``, ``spread`` (sqrt of the summed per-dimension sample
      variance of the acquisition unit vectors; NULL for one acquisition), ``first``/``last`` and
      the normalised mean ``embedding``.
    * ``<view>_window_change(a0, a1, b0, b1)``: per cell seen in both windows, ``cosine_distance``
      between the window means and ``change_score`` = squared distance of the means over
      spread_a²/n_a + spread_b²/n_b (about 1 for noise; NULL when a window has one acquisition —
      the Python/CLI version borrows a pooled spread there instead).

    An acquisition is one product of a cell: the mean of its L2-normalised fragment vectors,
    normalised again, exactly as `windows.acquisitions(level="cell")` computes it.
    """
    v = view
    con.execute(
        f'CREATE OR REPLACE MACRO "{v}_window_dims"(t0, t1) AS TABLE '
        f"WITH frag AS ("
        f"  SELECT grid_cell, product_id, timestamp AS ts,"
        f"    unnest(range(len(CAST(embedding AS FLOAT[])))) AS i,"
        f"    unnest(CAST(embedding AS FLOAT[])) / sqrt(array_inner_product(embedding, embedding)) AS v"
        f'  FROM "{v}"'
        f"  WHERE timestamp >= timezone('UTC', CAST(CAST(t0 AS DATE) AS TIMESTAMP))"
        f"    AND timestamp < timezone('UTC', CAST(CAST(t1 AS DATE) + 1 AS TIMESTAMP))"
        f"), acq AS ("
        f"  SELECT grid_cell, product_id, min(ts) AS ts, i, avg(v) AS v FROM frag GROUP BY grid_cell, product_id, i"
        f"), unit AS ("
        f"  SELECT grid_cell, product_id, ts, i,"
        f"    v / sqrt(sum(v * v) OVER (PARTITION BY grid_cell, product_id)) AS v FROM acq"
        f") SELECT grid_cell, i, avg(v) AS m, var_samp(v) AS var, count(*) AS n, min(ts) AS first,"
        f"  max(ts) AS last FROM unit GROUP BY grid_cell, i"
    )
    con.execute(
        f'CREATE OR REPLACE MACRO "{v}_window"(t0, t1) AS TABLE '
        f"WITH d AS (SELECT *, sqrt(sum(m * m) OVER (PARTITION BY grid_cell)) AS norm "
        f'  FROM "{v}_window_dims"(t0, t1)) '
        f"SELECT grid_cell, any_value(n) AS acquisitions, sqrt(sum(var)) AS spread, min(first) AS first,"
        f"  max(last) AS last, list(m / norm ORDER BY i) AS embedding FROM d GROUP BY grid_cell"
    )
    con.execute(
        f'CREATE OR REPLACE MACRO "{v}_window_change"(a0, a1, b0, b1) AS TABLE '
        f"SELECT grid_cell, any_value(a.n) AS acquisitions_a, any_value(b.n) AS acquisitions_b,"
        f"  sqrt(sum(a.var)) AS spread_a, sqrt(sum(b.var)) AS spread_b,"
        f"  1 - sum(a.m * b.m) / sqrt(sum(a.m * a.m) * sum(b.m * b.m)) AS cosine_distance,"
        f"  sum((a.m - b.m) * (a.m - b.m)) / nullif(sum(a.var) / any_value(a.n) + sum(b.var) / any_value(b.n), 0)"
        f"    AS change_score "
        f'FROM "{v}_window_dims"(a0, a1) a JOIN "{v}_window_dims"(b0, b1) b USING (grid_cell, i) '
        f"GROUP BY grid_cell ORDER BY change_score DESC NULLS LAST, grid_cell"
    )


def open_database(path: str | os.PathLike, read_only: bool = True,
                  root: str | os.PathLike | None = None) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file written by `write_database` (or ``connect(root, database=path)``).

    The views and macros persist in the file, but a view is re-bound on every query and its
    ``geometry`` column was stored as GEOMETRY: without spatial the Parquet reader returns BLOB
    and DuckDB refuses the view ("types don't match"). This loads spatial from the wheel's
    extension directory (no network) and resolves the views' relative paths under `root`, by
    default the storage root the file lies in (``<root>/sql/majortom.duckdb``), so a copied or
    moved data folder reads its own files. Clients without spatial use the ``<view>_wkb`` views
    (``SET file_search_path = '<root>'`` first, or run from the root).
    """
    layout = StorageLayout.at(root) if root is not None else StorageLayout.of_sql_database(path)
    con = _spatial_connection(str(path), read_only=read_only)
    _search_under(con, layout.root)
    try:
        models = [m for (m,) in con.sql(f"SELECT model FROM {MODELS_VIEW}").fetchall()]
    except duckdb.CatalogException:
        models = []   # not a catalog file of ours: nothing to shadow
    for model in models:
        _shadow_wkb_view(con, model)
    return con


@dataclass(frozen=True)
class SqlCatalog:
    """What `write_database` wrote and proved: one row per view, and an example query's result."""

    path: Path
    views: pd.DataFrame          # model, view, dim, partitions, rows
    missing: tuple[str, ...]     # requested models without embedding files (no view)
    example_query: str
    example: pd.DataFrame


def write_database(layout: StorageLayout, models: list[str] | tuple[str, ...]) -> SqlCatalog:
    """The catalog file ``<root>/sql/majortom.duckdb``: views over every model of `models` that has
    embeddings, written atomically and check-pointed (the file holds everything, no WAL), then
    reopened to prove the views resolve and a similarity query runs.

    FileNotFoundError when none of the models has embedding files (nothing to catalogue).
    """
    from majortom_assets.geoparquet import atomic_output

    present = [m for m in models if layout.embedding_files(m)]
    if not present:
        raise FileNotFoundError(f"no embedding files under {layout.root / 'embeddings'} for "
                                f"{', '.join(models)}; materialise an embeddings asset first")
    path = layout.sql_database()
    with atomic_output(path) as tmp:
        con = connect(layout.root, database=str(tmp), models=present)
        try:
            con.execute("CHECKPOINT")
        finally:
            con.close()
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    con = open_database(path, root=layout.root)
    try:
        views = con.sql(f"SELECT model, view, dim, partitions FROM {MODELS_VIEW} ORDER BY model").df()
        views["rows"] = [con.sql(f'SELECT count(*) FROM "{v}"').fetchone()[0] for v in views["view"]]
        view = views["view"].iloc[0]
        uid = con.sql(f'SELECT unique_id FROM "{view}" ORDER BY unique_id LIMIT 1').fetchone()[0]
        query = (f"SELECT unique_id, grid_cell, timestamp, round(similarity, 4) AS similarity\n"
                 f"FROM {view}_similar('{uid}', 5)\nORDER BY similarity DESC, unique_id")
        example = con.sql(query).df()
    finally:
        con.close()
    return SqlCatalog(path, views, tuple(m for m in models if m not in present), query, example)


def lock_down(con: duckdb.DuckDBPyConnection, root: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """Confine a connection to reading under the storage root, for SQL typed by a user.

    After this, files outside ``root`` cannot be read or written (``enable_external_access`` off
    with ``root`` as the one allowed directory: no ``read_text('/etc/...')``, no http), extensions
    are neither installed nor auto-loaded from the network, and ``lock_configuration`` stops the
    query from switching any of it back. Statement types are checked by ``read_only_query``: the
    allowed directory is needed to read the Parquet files, so a ``COPY ... TO`` inside the root
    is refused there, not here.
    """
    allowed = str(Path(root).resolve()) + os.sep
    con.execute(f"SET allowed_directories = [{_literal(allowed)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")
    return con


def _check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from None
    if not statements:
        raise ReadOnlyQueryError("the query holds no SQL statement")
    for statement in statements:
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = _EXPLAIN_PREFIX.sub("", statement.query, count=1)
            if inner != statement.query:
                _check_read_only(con, inner)
                continue
        if kind not in READ_STATEMENTS:
            name = getattr(kind, "name", str(kind))
            raise ReadOnlyQueryError(
                f"{name} statements are not allowed: `majortom sql` only reads (SELECT, DESCRIBE, SHOW, "
                f"SUMMARIZE, EXPLAIN); write results with a DuckDB client of your own"
            )


def read_only_query(con: duckdb.DuckDBPyConnection, query: str):
    """Run a user's query if every statement in it only reads; returns a DataFrame.

    Statement types are taken from DuckDB's own parser (``extract_statements``), so a COPY,
    ATTACH, INSTALL, CREATE, DROP, SET or CALL hidden after a ``;`` is refused before anything runs.
    """
    _check_read_only(con, query)
    try:
        relation = con.sql(query)
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from None
    if relation is None:  # pragma: no cover - every allowed statement returns rows
        raise ReadOnlyQueryError("the statement returned no rows")
    return relation.df()

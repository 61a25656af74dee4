"""Downstream evaluation of embeddings (paper §6.3): k-NN and linear-probe accuracy.

Labels are per grid cell (or per point, mapped to its cell). Every fragment of a labelled cell is
a sample; folds are stratified by class and *grouped by grid_cell*, so overlapping fragments of
one cell never sit in train and test at once (that leak would inflate k-NN accuracy). A
shuffled-label control (labels permuted across cells) runs through the identical pipeline and
must land near chance; if it does not, something leaks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from majortom_assets import geoparquet
from majortom_assets.vectors import files


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    folds: int = Field(5, ge=2)
    k: int = Field(5, ge=1, description="neighbours for k-NN (cosine)")
    label_column: str = "class_id"
    fragments: str = Field("all", pattern="^(all|central)$")
    max_iter: int = Field(2000, ge=10)
    C: float = Field(1.0, gt=0)
    seed: int = 0
    control: bool = True


def labels_by_cell(labels: pd.DataFrame, label_column: str = "class_id") -> pd.Series:
    """grid_cell -> label; point labels (lat, lon) are mapped to their Major TOM cell first."""
    if label_column not in labels.columns:
        raise ValueError(f"labels have no column {label_column!r} (columns: {list(labels.columns)})")
    if "grid_cell" in labels.columns:
        cells = labels["grid_cell"].astype(str)
    elif {"lat", "lon"} <= set(labels.columns):
        from majortom_assets.grid import get_grid

        cells = pd.Series(get_grid().latlon_to_cell_name(labels["lat"].to_numpy(), labels["lon"].to_numpy()),
                          index=labels.index).astype(str)
    else:
        raise ValueError("labels need a grid_cell column or lat/lon columns")
    frame = pd.DataFrame({"grid_cell": cells, "label": labels[label_column].to_numpy()})
    conflicts = frame.groupby("grid_cell")["label"].nunique()
    if (conflicts > 1).any():
        bad = conflicts[conflicts > 1].index[:5].tolist()
        raise ValueError(f"cells with more than one label (e.g. {bad}); give one label per cell")
    return frame.drop_duplicates("grid_cell").set_index("grid_cell")["label"]


def labelled_features(paths, cells: Sequence[str], fragments: str = "all",
                      batch_rows: int = files.DEFAULT_BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, grid_cell per row) of labelled cells only, streamed batch by batch."""
    wanted = pa.array(sorted(set(cells)))
    xs, cs = [], []
    for path in files.global_paths(paths):
        mask = files.file_central_mask(path) if fragments == "central" else None
        for offset, x, meta in files.iter_embeddings(path, batch_rows, ["grid_cell"]):
            keep = pc.is_in(meta.column("grid_cell"), value_set=wanted).to_numpy(zero_copy_only=False)
            if mask is not None:
                keep &= mask[offset:offset + len(x)]
            if keep.any():
                xs.append(x[keep].copy())
                cs.append(meta.column("grid_cell").to_numpy(zero_copy_only=False)[keep])
    if not xs:
        raise ValueError("none of the labelled cells has embeddings in the given files")
    return np.concatenate(xs), np.concatenate(cs)


@dataclass
class ModelScores:
    model: str
    samples: int
    cells: int
    classes: int
    chance: float                      # majority-class accuracy
    knn_accuracy: float
    knn_std: float
    linear_accuracy: float
    linear_std: float
    control_knn_accuracy: float | None = None
    control_linear_accuracy: float | None = None
    fold_sizes: list[int] = field(default_factory=list)


def _cross_validate(x: np.ndarray, y: np.ndarray, groups: np.ndarray, cfg: EvalConfig) -> dict:
    cells_per_class = pd.Series(groups).groupby(y).nunique().min()
    if cells_per_class < cfg.folds:
        raise ValueError(f"every class needs at least {cfg.folds} labelled cells for {cfg.folds}-fold "
                         f"grouped cross-validation; the rarest has {cells_per_class}")
    splitter = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    xn = files.l2_normalise(x)
    knn, lin, sizes = [], [], []
    for train, test in splitter.split(x, y, groups):
        k = min(cfg.k, len(train))
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        knn.append(float((clf.fit(xn[train], y[train]).predict(xn[test]) == y[test]).mean()))
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter))
        lin.append(float((probe.fit(x[train], y[train]).predict(x[test]) == y[test]).mean()))
        sizes.append(len(test))
    return {"knn": knn, "linear": lin, "sizes": sizes}


def evaluate_model(model: str, paths, labels: pd.DataFrame, config: EvalConfig | None = None) -> ModelScores:
    cfg = config or EvalConfig()
    by_cell = labels_by_cell(labels, cfg.label_column)
    x, cells = labelled_features(paths, by_cell.index, cfg.fragments)
    return score_features(model, x, cells, by_cell, cfg)


def score_features(model: str, x: np.ndarray, cells: np.ndarray, by_cell: pd.Series,
                   cfg: EvalConfig) -> ModelScores:
    """k-NN and linear-probe scores (and the shuffled control) of features already gathered."""
    y = by_cell.reindex(cells).to_numpy()
    res = _cross_validate(x, y, cells, cfg)
    _, counts = np.unique(y, return_counts=True)
    scores = ModelScores(
        model=model, samples=len(y), cells=len(np.unique(cells)), classes=len(counts),
        chance=float(counts.max() / counts.sum()),
        knn_accuracy=float(np.mean(res["knn"])), knn_std=float(np.std(res["knn"])),
        linear_accuracy=float(np.mean(res["linear"])), linear_std=float(np.std(res["linear"])),
        fold_sizes=res["sizes"],
    )
    if cfg.control:
        rng = np.random.default_rng(cfg.seed + 1)
        shuffled = pd.Series(rng.permutation(by_cell.to_numpy()), index=by_cell.index)
        ctrl = _cross_validate(x, shuffled.reindex(cells).to_numpy(), cells, cfg)
        scores.control_knn_accuracy = float(np.mean(ctrl["knn"]))
        scores.control_linear_accuracy = float(np.mean(ctrl["linear"]))
    return scores


@dataclass
class EvalReport:
    config: dict
    models: list[ModelScores]

    def to_dict(self) -> dict:
        return {"config": self.config, "models": [asdict(m) for m in self.models]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        c = self.config
        lines = [
            f"# Embedding evaluation ({c['folds']}-fold stratified CV grouped by grid_cell)", "",
            (f"k-NN: cosine, k={c['k']}; linear probe: logistic regression on standardised features; "
             f"fragments: {c['fragments']}. Control = labels shuffled across cells (should be ≈ chance)."), "",
            "| model | samples | cells | classes | chance | k-NN acc | linear acc | control k-NN | control linear |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        fmt = lambda v: "—" if v is None else f"{v:.3f}"
        for m in self.models:
            lines.append(
                f"| {m.model} | {m.samples} | {m.cells} | {m.classes} | {m.chance:.3f} | "
                f"{m.knn_accuracy:.3f} ± {m.knn_std:.3f} | {m.linear_accuracy:.3f} ± {m.linear_std:.3f} | "
                f"{fmt(m.control_knn_accuracy)} | {fmt(m.control_linear_accuracy)} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike) -> dict:
        out = Path(out_dir)
        paths = {"json": out / "evaluation.json", "markdown": out / "evaluation.md"}
        for key, text in (("json", self.to_json()), ("markdown", self.to_markdown())):
            with geoparquet.atomic_output(paths[key]) as tmp:
                tmp.write_text(text)
        return {k: str(v) for k, v in paths.items()}


def evaluate(paths_by_model: Mapping[str, Sequence], labels: pd.DataFrame, folds: int = 5,
             config: EvalConfig | None = None) -> EvalReport:
    """Score every model on the same labels and folds, side by side."""
    cfg = (config or EvalConfig()).model_copy(update={"folds": folds} if config is None else {})
    if not paths_by_model:
        raise ValueError("no models to evaluate")
    return EvalReport(cfg.model_dump(), [evaluate_model(m, p, labels, cfg) for m, p in paths_by_model.items()])


# ------------------------------------------------------------- bounded, row-incremental evaluation
#: Labelled cells the archive-scale evaluation scores at most: a deterministic sample (by a hash of
#: the cell name, so it is the same sample whatever the row order and stable as rows are added).
MAX_CELLS = 4_000


def sample_cells(cells: Sequence[str], max_cells: int = MAX_CELLS) -> np.ndarray:
    """The `max_cells` cells with the smallest hash of their name (all of them if fewer)."""
    import hashlib

    cells = np.asarray(sorted(set(map(str, cells))), dtype=object)
    if len(cells) <= max_cells:
        return cells
    keys = np.array([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "big") for c in cells],
                    dtype=np.uint64)
    return np.sort(cells[np.argsort(keys, kind="stable")[:max_cells]])


def update_features(paths, cells: Sequence[str], cache_dir: str | os.PathLike, fragments: str = "all",
                    *, identity: str = "") -> tuple[np.ndarray, np.ndarray, dict]:
    """(embeddings, grid_cell, update summary) of the given cells, cached per row: O(changed rows).

    Each row's fragments of `cells` are kept in ``cache_dir/row=<ROW>.parquet``; only rows whose
    embedding file changed (`rowcache`) are read again. `identity` names the cell set and options
    (e.g. a digest of the labels and sample size): when it changes every row is read again.
    """
    from majortom_assets.layout import validate_row_key
    from majortom_assets.vectors import rowcache

    cache = Path(cache_dir)
    state_path = cache / "state.json"
    state = rowcache.load_state(state_path)
    if state.get("identity") != identity or state.get("fragments") != fragments:
        state = {}
    current = rowcache.current_rows(paths)
    diff = rowcache.diff(current, state.get("rows", {}))
    cache.mkdir(parents=True, exist_ok=True)

    def part(row: str) -> Path:
        return cache / f"row={validate_row_key(row)}.parquet"

    for row in diff.removed:
        part(row).unlink(missing_ok=True)
    for row in diff.to_read:
        try:
            x, c = labelled_features([current[row][0]], cells, fragments)
        except ValueError:  # no labelled cell in this row
            x, c = np.zeros((0, files.file_dim(current[row][0])), np.float32), np.zeros(0, dtype=object)
        table = pa.table({"grid_cell": pa.array(c, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])})
        with geoparquet.atomic_output(part(row)) as tmp:
            pq.write_table(table, tmp)
    xs, cs = [], []
    for row in sorted(current, key=rowcache._row_order):
        table = pq.read_table(part(row))
        if table.num_rows:
            xs.append(geoparquet.embedding_matrix(table.column("embedding")))
            cs.append(table.column("grid_cell").to_numpy(zero_copy_only=False))
    rowcache.save_state(state_path, {"identity": identity, "fragments": fragments,
                                     "rows": {r: current[r][1] for r in current}})
    if not xs:
        raise ValueError("none of the labelled cells has embeddings in the given files")
    return np.concatenate(xs), np.concatenate(cs), {**diff.summary(), "rows read": len(diff.to_read)}

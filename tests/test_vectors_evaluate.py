"""k-NN / linear-probe evaluation: far above chance on structured labels, chance when shuffled."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from majortom_assets.vectors import evaluate, testdata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    cells = testdata.cells_in_rows([10, 11, 12, 13], 10)
    good = testdata.write_synthetic(root, "good", cells=cells, dim=16, n_classes=4, seed=1,
                                    cell_scale=0.5, fragment_scale=0.3)
    # same cells and labels, but class structure drowned in per-cell noise: a weaker model
    weak = testdata.write_synthetic(root, "weak", cells=cells, dim=16, n_classes=4, seed=1,
                                    class_scale=0.05, cell_scale=1.0, fragment_scale=0.1)
    assert good.labels.class_id.tolist() == weak.labels.class_id.tolist()
    return good, weak


def test_scores_far_above_chance_and_control_at_chance(data):
    good, weak = data
    report = evaluate.evaluate({"good": good.paths, "weak": weak.paths}, good.labels, folds=4)
    by = {m.model: m for m in report.models}
    g = by["good"]
    assert g.cells == 40 and g.samples == 40 * 25 and g.classes == 4
    assert g.knn_accuracy > 0.9 and g.linear_accuracy > 0.9
    # grouped folds: per-cell identity is useless once cells never straddle train and test
    assert g.control_knn_accuracy < g.chance + 0.25
    assert g.control_linear_accuracy < g.chance + 0.25
    assert by["weak"].knn_accuracy < g.knn_accuracy
    md = report.to_markdown()
    assert "| good |" in md and "| weak |" in md
    assert json.loads(report.to_json())["models"][0]["model"] == "good"


def test_ungrouped_folds_would_leak(data):
    """The control catches leakage: with fragment-level (ungrouped) folds, shuffled cell labels
    are predicted well because a test fragment's neighbours are its own cell's fragments."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    good, _ = data
    by_cell = evaluate.labels_by_cell(good.labels)
    x, cells = evaluate.labelled_features(good.paths, by_cell.index)
    rng = np.random.default_rng(0)
    shuffled = pd.Series(rng.permutation(by_cell.to_numpy()), index=by_cell.index).reindex(cells).to_numpy()
    acc = []
    for tr, te in StratifiedKFold(4, shuffle=True, random_state=0).split(x, shuffled):
        clf = KNeighborsClassifier(5, metric="cosine").fit(x[tr], shuffled[tr])
        acc.append((clf.predict(x[te]) == shuffled[te]).mean())
    assert np.mean(acc) > 0.9  # leaky
    cfg = evaluate.EvalConfig(folds=4)
    grouped = evaluate._cross_validate(x, shuffled, cells, cfg)
    assert np.mean(grouped["knn"]) < 0.6  # ours is not


def test_point_labels_and_report_files(data, tmp_path):
    good, _ = data
    points = pd.DataFrame({"lat": good.labels.centre_lat, "lon": good.labels.centre_lon,
                           "class_id": good.labels.class_id})
    mapped = evaluate.labels_by_cell(points)
    assert mapped.to_dict() == good.labels.set_index("grid_cell").class_id.to_dict()
    report = evaluate.evaluate({"good": good.paths}, points, folds=4,
                               config=evaluate.EvalConfig(folds=4, fragments="central", control=False))
    m = report.models[0]
    assert m.samples == 40 and m.control_knn_accuracy is None
    written = report.write(tmp_path / "rep")
    with open(written["json"]) as fh:
        assert json.load(fh)["config"]["fragments"] == "central"


def test_errors(data):
    good, _ = data
    with pytest.raises(ValueError, match="grid_cell"):
        evaluate.labels_by_cell(pd.DataFrame({"class_id": [1]}))
    with pytest.raises(ValueError, match="more than one label"):
        evaluate.labels_by_cell(pd.DataFrame({"grid_cell": ["1U_1R", "1U_1R"], "class_id": [1, 2]}))
    with pytest.raises(ValueError, match="at least 10"):
        evaluate.evaluate({"good": good.paths}, good.labels, config=evaluate.EvalConfig(folds=10))
    with pytest.raises(ValueError, match="none of the labelled cells"):
        evaluate.evaluate({"good": good.paths}, pd.DataFrame({"grid_cell": ["0U_5R"] * 1, "class_id": [0]}))

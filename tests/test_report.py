"""The report's figures and summary as a thesis would use them: drawn with real matplotlib."""

from __future__ import annotations

import json

import pytest

from evo.trainers import report


def _rows(models=("GLM", "XGBoost", "RandomForest", "MLP"), cals=("none", "platt", "isotonic")):
    rows = []
    for i, (m, c) in enumerate((m, c) for m in models for c in cals):
        k = 0.5 + i / 40
        rows.append({"job_id": f"j{i + 1}", "model_type": m, "node": "n1",
                     "params": {"trainer": m, "calibration": c},
                     "metrics": {"auc": k, "brier": 0.25 - i / 100},
                     "artifacts": {"roc": json.dumps({"fpr": [0, 0.5, 1], "tpr": [0, k, 1]}),
                                   "calibration_bins": json.dumps(
                                       {"mean_p": [0.2, 0.5, 0.8], "freq": [0.25, 0.5, 0.75],
                                        "count": [10.0 + i, 50.0, 12.0]})}})
    return rows


def test_twelve_series_are_told_apart_by_colour_per_model_and_line_style_per_calibration():
    rows = _rows()
    styles = report.series_styles(rows)
    assert len({(s["color"], s["ls"]) for s in styles}) == 12
    by_model = {}
    for r, s in zip(rows, styles):
        by_model.setdefault(r["model_type"], set()).add(s["color"])
    assert all(len(c) == 1 for c in by_model.values()) and len(
        {next(iter(c)) for c in by_model.values()}) == 4
    assert [s["ls"] for s in styles[:3]] == ["-", "--", ":"]  # none, platt, isotonic


def test_one_model_gets_a_colour_per_series_and_repeats_get_markers():
    rows = _rows(models=("XGBoost",), cals=("none",)) * 3
    styles = report.series_styles(rows)
    assert len({s["color"] for s in styles}) == 3
    same = report.series_styles([rows[0], dict(rows[0], job_id="jx")])
    assert same[0]["extra_marker"] is None and same[1]["extra_marker"] is not None


@pytest.mark.parametrize("kind", ["roc", "calibration"])
def test_the_legend_sits_outside_the_axes_and_calibration_has_bin_counts_below(kind):
    import matplotlib.pyplot as plt

    rows = _rows()
    if kind == "roc":
        fig = report.curve_figure(rows, ["calibration"], "roc", ("fpr", "tpr"),
                                  ("auc", "AUC", ".3f"), ("x", "y"), "t", marker=None)
    else:
        fig = report.curve_figure(rows, ["calibration"], "calibration_bins", ("mean_p", "freq"),
                                  ("brier", "Brier", ".4f"), ("x", "y"), "t", marker="o",
                                  counts="count")
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 12
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes_box.x1  # entirely right of the plot: no curve is hidden
    if kind == "calibration":
        below = fig.axes[1]
        assert below.get_ylabel().startswith("Forecasts") and len(below.lines) == 12
        assert list(below.lines[0].get_ydata()) == [10.0, 50.0, 12.0]
    plt.close(fig)


def test_pdfs_embed_truetype_fonts_and_the_table_says_it_needs_booktabs(tmp_path):
    rows = _rows()
    path = report._curves(rows, ["calibration"], tmp_path / "roc.pdf", "roc", ("fpr", "tpr"),
                          ("auc", "AUC", ".3f"), ("x", "y"), "t", marker=None)
    raw = path.read_bytes()
    assert b"/FontFile2" in raw and b"/Type3" not in raw  # TrueType outlines, not Type 3
    tex = report.latex_table(["Model"], [["GLM"]], set(), "Walk-forward comparison, sweep e2e (s1)",
                             "tab:s1", "l")
    assert tex.splitlines()[0].startswith("% Needs \\usepackage{booktabs}")
    assert "\\caption{Walk-forward comparison, sweep e2e (s1)}" in tex

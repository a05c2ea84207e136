"""The evaluation report: metrics.json, report.md and its PNG plots, written into one folder.

Plots are drawn on `matplotlib.figure.Figure` objects, which render PNGs through Agg
without touching pyplot's global backend or figure registry: importing this module never
changes a user's notebook backend, and the server can draw from several threads.
Every file is written to a temporary name and moved into place, so an interrupted
evaluation never leaves a half-written report behind.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from .._io import atomic_write, read_csv_rows, write_json
from ..errors import XferlearnError
from .metrics import (
    DEFAULT_THRESHOLD, expected_calibration_error, positive_index, reliability_bins)

ECE_BINS = 15
# Order of the run description in report.md; any other run_info keys follow these.
RUN_INFO_ORDER = ("run", "run_dir", "data", "data_dir", "backbone", "weights", "checkpoint")
# Unreadable files are listed in report.md up to this many; metrics.json keeps them all.
UNREADABLE_LISTED = 20
# Columns in a Lightning metrics.csv that index rows rather than measure anything.
HISTORY_INDEX_COLUMNS = ("epoch", "step")
_TABLE_ROWS = (("accuracy", "Accuracy"), ("auc", "AUC"), ("sensitivity", "Sensitivity"),
               ("specificity", "Specificity"), ("ppv", "PPV"), ("npv", "NPV"))


def write_report(out_dir: Path, metrics: dict, y_true, probs, classes, *,
                 title: str = "xferlearn evaluation", run_info: dict | None = None,
                 history_csv: Path | None = None, intervals: dict | None = None,
                 extra_sections: list[str] | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md and the plots into out_dir; return {stem: path}.

    `metrics` is compute_metrics' result for the same y_true/probs/classes. metrics.json is
    that dict plus "ece" and, when given, "intervals". The training-curves plot is drawn
    only when history_csv exists.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise XferlearnError(f"cannot create report folder {out_dir}: {error.strerror or error}") from error
    classes = [str(name) for name in classes]
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.shape != (len(y), len(classes)):
        raise ValueError(f"probs shape {p.shape} does not match {len(y)} labels "
                         f"and {len(classes)} classes")
    ece = expected_calibration_error(y, p, ECE_BINS)

    paths = {
        "roc": _write_png(out_dir / "roc.png", _roc_figure(y, p, classes, metrics)),
        "confusion_matrix": _write_png(out_dir / "confusion_matrix.png",
                                       _confusion_figure(metrics, classes)),
        "reliability": _write_png(out_dir / "reliability.png", _reliability_figure(y, p, ece)),
    }
    history_note = None
    if history_csv is not None and Path(history_csv).is_file():
        try:
            history = load_history(Path(history_csv))
        except XferlearnError as error:  # a broken log must not cost the user the report
            history_note = f"Training curves were not plotted: {error}"
        else:
            if history:
                paths["training_curves"] = _write_png(out_dir / "training_curves.png",
                                                      _history_figure(history))
            else:
                history_note = f"Training curves were not plotted: {history_csv} holds no metrics."

    record = {**metrics, "ece": ece}
    if intervals is not None:
        record["intervals"] = intervals
    paths["metrics"] = write_json(out_dir / "metrics.json", record)
    markdown = _markdown(title, metrics, classes, ece, run_info, intervals, paths,
                         history_note, extra_sections)
    paths["report"] = atomic_write(out_dir / "report.md", markdown)
    return paths


def load_history(history_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series from a Lightning CSVLogger metrics.csv.

    Rows are sparse: each holds only the metrics logged at that step. A metric logged
    several times in an epoch (a step-level train loss) is averaged over the epoch, since
    single steps are noisy; an epoch-level metric has one value and keeps it.
    """
    rows = read_csv_rows(history_csv)
    if not rows or "epoch" not in rows[0]:
        raise XferlearnError(f"{history_csv} is not a Lightning metrics.csv: no 'epoch' column")
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        epoch = _number(row.get("epoch"))
        if epoch is None:
            continue
        for name, text in row.items():
            value = _number(text)
            if name is None or name in HISTORY_INDEX_COLUMNS or value is None:
                continue
            values[name][int(epoch)].append(value)
    return {name: [(epoch, float(np.mean(per_epoch[epoch]))) for epoch in sorted(per_epoch)]
            for name, per_epoch in sorted(values.items())}


# --- plots ----------------------------------------------------------------------------------

def _roc_figure(y: np.ndarray, p: np.ndarray, classes: list[str], metrics: dict) -> Figure:
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    if len(classes) == 2:
        # The run's positive class, as the metrics were computed for it.
        pos = classes.index(metrics["positive_class"]) if metrics.get("positive_class") in classes \
            else positive_index(classes)
        is_pos = y == pos
        if is_pos.all() or not is_pos.any():
            _say_undefined(ax, "ROC undefined: only one class in the data")
        else:
            fpr, tpr, _ = roc_curve(is_pos, p[:, pos])
            ax.plot(fpr, tpr, linewidth=2, label=f"{classes[pos]} (AUC {_fmt(metrics.get('auc'))})")
            _mark_point(ax, metrics, filled=True,
                        label=f"operating point, threshold {_fmt(metrics.get('threshold'))}")
            if metrics.get("threshold") != DEFAULT_THRESHOLD and "at_0.5" in metrics:
                _mark_point(ax, metrics["at_0.5"], filled=False, label="threshold 0.5")
    else:
        drawn = 0
        for k, name in enumerate(classes):
            is_k = y == k
            if is_k.all() or not is_k.any():
                continue
            fpr, tpr, _ = roc_curve(is_k, p[:, k])
            auc = metrics.get("per_class", {}).get(name, {}).get("auc")
            ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} vs rest (AUC {_fmt(auc)})")
            drawn += 1
        if not drawn:
            _say_undefined(ax, "ROC undefined: only one class in the data")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title="ROC curve")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _mark_point(ax, rates: dict, *, filled: bool, label: str) -> None:
    sens, spec = rates.get("sensitivity"), rates.get("specificity")
    if sens is None or spec is None:
        return
    ax.plot([1 - spec], [sens], marker="o", markersize=8, linestyle="none", color="crimson",
            markerfacecolor="crimson" if filled else "none", label=label)


def _confusion_figure(metrics: dict, classes: list[str]) -> Figure:
    matrix = np.asarray(metrics["confusion_matrix"], dtype=int)
    size = 2.5 + 0.9 * len(classes)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    row_totals = matrix.sum(axis=1)
    for (i, j), count in np.ndenumerate(matrix):
        share = f"\n{count / row_totals[i]:.0%}" if row_totals[i] else ""
        dark = count > matrix.max() / 2
        ax.text(j, i, f"{count}{share}", ha="center", va="center",
                color="white" if dark else "black")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=30, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title=_decision_rule_short(metrics))
    fig.tight_layout()
    return fig


def _reliability_figure(y: np.ndarray, p: np.ndarray, ece: float) -> Figure:
    bins = reliability_bins(y, p, ECE_BINS)
    edges, width = bins["edges"], 1.0 / ECE_BINS
    filled = bins["count"] > 0
    fig = Figure(figsize=(5.5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    top.bar(edges[:-1][filled], bins["accuracy"][filled], width=width, align="edge",
            edgecolor="black", alpha=0.8, label="accuracy in bin")
    top.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability (top label), ECE {ece:.3f}")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(edges[:-1], bins["count"], width=width, align="edge", color="0.5")
    bottom.set(xlim=(0, 1), xlabel="confidence (highest class probability)", ylabel="images")
    fig.tight_layout()
    return fig


def _history_figure(history: dict[str, list[tuple[int, float]]]) -> Figure:
    losses = {name: series for name, series in history.items() if "loss" in name}
    others = {name: series for name, series in history.items() if "loss" not in name}
    groups = [(title, group) for title, group in (("loss", losses), ("metrics", others)) if group]
    fig = Figure(figsize=(5.5 * len(groups), 4.5))
    for ax, (title, group) in zip(np.atleast_1d(fig.subplots(1, len(groups))), groups):
        for name, series in group.items():
            epochs, values = zip(*series)
            ax.plot(epochs, values, marker="o", markersize=3, label=name)
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _say_undefined(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


# --- report.md ------------------------------------------------------------------------------

def _markdown(title, metrics, classes, ece, run_info, intervals, paths, history_note,
              extra_sections) -> str:
    lines = [f"# {title}", "", "## Data evaluated", ""]
    info = dict(run_info or {})
    for key in [k for k in RUN_INFO_ORDER if k in info] + [k for k in info if k not in RUN_INFO_ORDER]:
        lines.append(f"- {key.replace('_', ' ').capitalize()}: `{info[key]}`")
    per_class = metrics.get("n_per_class") or {}
    counts = ", ".join(f"{name} {count}" for name, count in per_class.items())
    lines.append(f"- Images: {metrics.get('n')}" + (f" ({counts})" if counts else ""))
    # Files the scan could not read are not in the figures; the reader must see that.
    unreadable = metrics.get("unreadable") or []
    if unreadable:
        lines.append(f"- Not evaluated, unreadable: {len(unreadable)} file(s)")
        lines += [f"  - `{item.get('file')}`: {item.get('reason')}"
                  for item in unreadable[:UNREADABLE_LISTED]]
        if len(unreadable) > UNREADABLE_LISTED:
            lines.append(f"  - … and {len(unreadable) - UNREADABLE_LISTED} more (see metrics.json)")
    lines.append("")

    lines += ["## Results", "", _decision_rule_sentence(metrics), ""]
    header = "| Metric | Value |" + (" 95% interval |" if intervals else "")
    lines += [header, "|---|---|" + ("---|" if intervals else "")]
    for key, label in _TABLE_ROWS:
        if key not in metrics:
            continue
        row = f"| {label} | {_fmt(metrics[key])} |"
        if intervals:
            bounds = intervals.get(key)
            row += f" {_fmt(bounds[0])} – {_fmt(bounds[1])} |" if bounds else " – |"
        lines.append(row)
    if intervals:
        lines += ["", "Intervals are percentile bootstrap over the evaluated images, "
                      "resampled within each class, at the threshold above."]
    at_half = metrics.get("at_0.5")
    if at_half and metrics.get("threshold") is not None:
        lines += ["", f"At a threshold of 0.5 instead: accuracy {_fmt(at_half['accuracy'])}, "
                      f"sensitivity {_fmt(at_half['sensitivity'])}, "
                      f"specificity {_fmt(at_half['specificity'])}."]
    if "per_class" in metrics:
        lines += ["", "| Class | Sensitivity | Specificity | AUC (vs rest) |", "|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(c['sensitivity'])} | {_fmt(c['specificity'])} | "
                  f"{_fmt(c['auc'])} |" for name, c in metrics["per_class"].items()]

    lines += ["", "## Confusion matrix", "", "Rows are the true class, columns the predicted one.",
              "", "| true \\ predicted | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for name, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(str(int(v)) for v in row) + " |")

    lines += ["", "## Calibration", "",
              f"Expected calibration error (top label, {ECE_BINS} equal-width bins): {ece:.3f}. "
              "It is the average gap between how confident the model is and how often it is "
              "right; 0 means its probabilities can be read at face value.", ""]

    lines += ["## Plots", ""]
    for stem, caption in (("roc", "ROC curve"), ("confusion_matrix", "Confusion matrix"),
                          ("reliability", "Reliability diagram"),
                          ("training_curves", "Training curves")):
        if stem in paths:
            lines += [f"![{caption}]({paths[stem].name})", ""]
    if history_note:
        lines += [history_note, ""]
    for section in extra_sections or []:
        lines += [section.rstrip("\n"), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _decision_rule_sentence(metrics: dict) -> str:
    source = metrics.get("threshold_source") or "not recorded"
    if metrics.get("threshold") is None:
        return ("Decision rule: each image is assigned the class with the highest probability "
                f"(no threshold; source: {source}).")
    positive = metrics.get("positive_class", "the positive class")
    return (f"Decision rule: an image is called **{positive}** when its {positive} probability is "
            f"at least **{metrics['threshold']:.4g}**. This threshold came from: {source}.")


def _decision_rule_short(metrics: dict) -> str:
    if metrics.get("threshold") is None:
        return "Confusion matrix (argmax)"
    return f"Confusion matrix (threshold {metrics['threshold']:.3g})"


# --- small helpers --------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return f"{value:.3f}" if isinstance(value, (float, np.floating)) else str(value)


def _number(text) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _write_png(path: Path, fig: Figure) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write(path, buffer.getvalue())

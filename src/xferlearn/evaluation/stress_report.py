"""The stress test's files: stress.json, stress.md, stress.png (metrics against severity) and
examples.png (one image under every shift), plus the short summary evaluate's report.md shows.

Figures are drawn on `matplotlib.figure.Figure`, as report.py does, so pyplot's global state
is never touched.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .._io import atomic_write, read_json, write_json
from ..errors import XferlearnError
from ..rundir import RunDir
from .corruptions import example_sheet
from .report import _fmt, _write_png

JSON, MARKDOWN, PLOT, EXAMPLES = "stress.json", "stress.md", "stress.png", "examples.png"
DEFINITIONS = (
    "Mean error: the mean, over every shift and severity, of the error (1 - accuracy) at the run's own "
    "stored threshold (never re-tuned on these images); added error: that minus the clean error. Mean AUC "
    "loss: the same mean of 1 - AUC, and its rise over the clean 1 - AUC. In the spirit of ImageNet-C's mean "
    "corruption error (Hendrycks & Dietterich, 2019), without its normalisation by a baseline model.")
CAVEAT = (
    "These shifts are synthetic and applied to the decoded image at the model's input size. They show which "
    "changes of acquisition the model is sensitive to and how far its operating point drifts; they do not "
    "measure performance at another site (hospital, camera, production line), which only labelled images "
    "from there can.")


def write_stress(out_dir: Path, record: dict, example: np.ndarray) -> dict[str, Path]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise XferlearnError(f"cannot create stress folder {out_dir}: {error.strerror or error}") from None
    shifts = list(record["shifts"])
    severities = sorted({row["severity"] for row in record["results"]})
    paths = {"json": write_json(out_dir / JSON, record), "plot": _write_png(out_dir / PLOT, _figure(record))}
    sheet = example_sheet(example, shifts, severities)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    paths["examples"] = atomic_write(out_dir / EXAMPLES, buffer.getvalue())
    paths["markdown"] = atomic_write(out_dir / MARKDOWN, markdown(record))
    return paths


def markdown(record: dict) -> str:
    binary = record.get("positive_class") is not None
    clean = record["clean"]
    counts = ", ".join(f"{name} {n}" for name, n in record["n_per_class"].items())
    lines = ["# xferlearn stress test", "",
             f"- Run: `{record['run']}`", f"- Data: {record['data']}", f"- Images: {record['n']} ({counts})"
             + (f", at most {record['limit']} per class (seed {record['seed']})" if record.get("limit") else ""),
             "- Decision rule: " + (f"{record['positive_class']} when its probability is at least "
                                    f"{record['threshold']:.4g} ({record['threshold_source']}); never re-tuned here"
                                    if binary else "the most probable class (argmax)"),
             f"- Test-time augmentation: {'on' if record.get('tta') else 'off'}", "",
             "## Summary", "", summary_lines(record), "", DEFINITIONS, "", CAVEAT, "",
             "## Every shift and severity", ""]
    head = ["Shift", "Severity", "Parameter", "AUC", "Accuracy", "Sensitivity", "Specificity"]
    if binary:
        head += ["Δ sensitivity", "Δ specificity", "Called positive"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(row):
        out = [_fmt(row.get(k)) for k in ("auc", "accuracy", "sensitivity", "specificity")]
        if binary:
            out += [_signed(row.get("delta_sensitivity")), _signed(row.get("delta_specificity")),
                    _fmt(row.get("positive_rate"))]
        return out

    lines.append("| clean | 0 | – | " + " | ".join(cells(clean)) + " |")
    lines += [f"| {r['shift']} | {r['severity']} | {r['parameter']:g} | " + " | ".join(cells(r)) + " |"
              for r in record["results"]]
    lines += ["", "## Shifts", "", "| Shift | Parameter at severities 1-5 |", "|---|---|"]
    lines += [f"| {name} | {info['parameter']}: {', '.join(f'{v:g}' for v in info['severities'])} |"
              for name, info in record["shifts"].items()]
    lines += ["", f"![metrics against severity]({PLOT})", "",
              f"![one image under every shift: rows in the order above, columns clean then each severity]({EXAMPLES})",
              ""]
    return "\n".join(lines)


def summary_lines(record: dict) -> str:
    """The summary as a few sentences (stress.md, evaluate's report.md, the CLI)."""
    s = record["summary"]
    text = (f"Mean error under shift {_fmt(s['mean_error'])} against {_fmt(s['clean_error'])} clean "
            f"(added error {_signed(s['added_error'])})")
    if "mean_auc_loss" in s:
        text += (f"; mean AUC loss {_fmt(s['mean_auc_loss'])} against {_fmt(s['clean_auc_loss'])} clean "
                 f"(added {_signed(s['added_auc_loss'])})")
    text += "."
    if "mean_sensitivity" in s and "mean_specificity" in s:
        clean = record["clean"]
        text += (f" At the stored threshold, sensitivity {_fmt(clean['sensitivity'])} clean, "
                 f"{_fmt(s['mean_sensitivity'])} on average under shift (lowest {_fmt(s['min_sensitivity'])}); "
                 f"specificity {_fmt(clean['specificity'])} clean, {_fmt(s['mean_specificity'])} on average "
                 f"(lowest {_fmt(s['min_specificity'])}).")
    worst = ", ".join(f"{w['shift']} ({_fmt(w['mean_error'])})" for w in s["worst_shifts"][:3])
    return text + f" Worst shifts by mean error: {worst}."


def stress_section(run: str | Path) -> str | None:
    """A report.md section with the run's latest stress test, where RUN/stress/stress.json exists."""
    record = read_json(RunDir.of(run).stress / JSON)
    if not isinstance(record, dict) or "summary" not in record:
        return None
    return ("## Stress test (acquisition-like shifts)\n\n"
            f"From `{RunDir.of(run).stress / MARKDOWN}`, on {record['n']} images of {record['data']}: "
            + summary_lines(record) + "\n\n" + DEFINITIONS)


def _figure(record: dict) -> Figure:
    binary = record.get("positive_class") is not None
    panels = ["auc", "sensitivity", "specificity"] if binary else ["auc", "accuracy"]
    fig = Figure(figsize=(5 * len(panels), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharex=True))
    colors = [f"C{k}" for k in range(10)]
    for ax, key in zip(axes, panels):
        clean = record["clean"].get(key)
        for k, shift in enumerate(record["shifts"]):
            rows = [r for r in record["results"] if r["shift"] == shift and r.get(key) is not None]
            if clean is None or not rows:
                continue
            ax.plot([0] + [r["severity"] for r in rows], [clean] + [r[key] for r in rows], marker="o",
                    markersize=3, color=colors[k % 10], linestyle="-" if k < 10 else "--", label=shift)
        label = {"auc": "AUC" + ("" if binary else " (macro)")}.get(key, key)
        ax.set(xlabel="severity (0: clean)", ylabel=label, title=label + (" at the stored threshold"
                                                                          if key != "auc" else ""))
        ax.set_xticks(range(6))
    axes[-1].legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    return fig


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.3f}"

"""Plots of training runs: one PNG per metric, runs compared on one metric, and bar charts of final scores.

A run directory holds ``metrics.jsonl``: one JSON object per line with an int ``"step"`` and
numeric metrics whose names may contain "/" (``"train/loss"``, ``"valid/rougeL"``). Lines may
carry different keys; non-numeric values are ignored. Figures are drawn with matplotlib's
object-oriented API on the Agg canvas, so nothing here needs a display or touches pyplot's state.
"""

from __future__ import annotations

import json
import os
import re
import warnings

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError
from ..files import write_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file, in file order.

    A last line that does not parse (the run was killed mid-write) is skipped silently; any other
    line that does not parse, or is not an object with an int "step", is skipped with a warning
    (a resumed run appends after such a line).
    """
    if not os.path.isfile(path):
        raise InputError(f"path {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            if k != len(lines) - 1:
                warnings.warn(f"{path}:{n}: skipping a line that is not a JSON object with an int 'step'",
                              stacklevel=2)
            continue
        records.append(record)
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values), sorted by step; a step logged twice keeps its last value (resumed runs)."""
    by_metric: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and _is_number(value):
                by_metric.setdefault(key, {})[record["step"]] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in sorted(by_metric.items())}


def run_series(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """A run directory's metrics as metric -> (steps, values), sorted by step (an error without metrics.jsonl)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise InputError(f"run_dir {run_dir!r} has no {METRICS_FILE}")
    return _series(read_metrics(path))


def _file_stem(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric.replace("/", "_")).strip("_") or "metric"


def _save(fig: Figure, path: str) -> str:
    """Write the figure as PNG through a temporary file, so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    FigureCanvasAgg(fig)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), suffix=".png")
    return path


def _axes(title: str, xlabel: str, ylabel: str, width: float = 6.0):
    fig = Figure(figsize=(width, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


#: Lines past matplotlib's ten colours repeat them with another dash pattern, so no two lines look alike.
_DASHES = ("-", "--", ":", "-.")


def line_style(index: int) -> dict:
    """Plot keywords for the ``index``-th line of a figure: a colour of the tab10 cycle, and for
    lines 10 and later a dash pattern, so every (colour, dash) pair is distinct for 40 lines."""
    return {"color": f"C{index % 10}", "linestyle": _DASHES[(index // 10) % len(_DASHES)]}


#: Up to this many labelled lines the legend goes inside the axes; past it, beside them.
_LEGEND_INSIDE = 5


def legend(ax, count: int) -> None:
    """A legend inside the axes for a few lines, beside them (right) for more, where it would hide
    the lines it names; the caller sizes the figure (``legend_width``)."""
    if count > _LEGEND_INSIDE:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    else:
        ax.legend()


def legend_width(count: int) -> float:
    """Figure width (inches) for ``count`` labelled lines: room for a legend beside the axes."""
    return 8.0 if count > _LEGEND_INSIDE else 6.0


def _plot_line(ax, steps: list[int], values: list[float], label: str | None = None, index: int = 0) -> None:
    # Sparse metrics (a validation point every N steps) read better with markers.
    ax.plot(steps, values, label=label, marker="o" if len(steps) <= 50 else None, markersize=3, **line_style(index))


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """One PNG per numeric metric of ``run_dir/metrics.jsonl`` (x = step); returns the paths written.

    Files go to ``out_dir`` (default ``run_dir/plots``), named after the metric with "/" and other
    characters unsafe in file names replaced by "_" (``train/loss`` -> ``train_loss.png``).
    """
    series = run_series(run_dir)
    if not series:
        raise InputError(f"run_dir {run_dir!r}: {METRICS_FILE} has no numeric metrics")
    out_dir = out_dir if out_dir is not None else os.path.join(run_dir, "plots")
    paths, used = [], set()
    for metric, (steps, values) in series.items():
        stem = _file_stem(metric)
        while stem in used:  # "a/b" and "a_b" would share a name
            stem += "_"
        used.add(stem)
        fig, ax = _axes(metric, "step", metric)
        _plot_line(ax, steps, values)
        paths.append(_save(fig, os.path.join(out_dir, stem + ".png")))
    return paths


def plot_comparison(run_dirs: dict[str, str], metric: str, path: str, title: str | None = None) -> str:
    """One PNG with a line of ``metric`` against step per run, labelled by the dict keys; returns ``path``.

    Runs without the metric (or without a metrics file) are skipped with a warning; it is an error
    if none has it.
    """
    if not isinstance(run_dirs, dict) or not run_dirs:
        raise ValueError("run_dirs must be a non-empty dict of label -> run directory")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty str, got {metric!r}")
    fig, ax = _axes(title if title is not None else metric, "step", metric, width=legend_width(len(run_dirs)))
    plotted = 0
    for label, run_dir in run_dirs.items():
        metrics_path = os.path.join(run_dir, METRICS_FILE)
        series = _series(read_metrics(metrics_path)) if os.path.isfile(metrics_path) else {}
        if metric not in series:
            warnings.warn(f"plot_comparison: run {label!r} ({run_dir}) has no {metric!r}; skipped", stacklevel=2)
            continue
        _plot_line(ax, *series[metric], label=str(label), index=plotted)
        plotted += 1
    if plotted == 0:
        raise ValueError(f"metric {metric!r} is in none of run_dirs {list(run_dirs)}")
    legend(ax, plotted)
    return _save(fig, path)


def bar_chart(values: dict[str, float], path: str, title: str, ylabel: str,
              errors: dict[str, float] | None = None) -> str:
    """A bar per key of ``values`` (in dict order), labelled with its value; returns ``path``.

    errors: optional error-bar half-widths (e.g. the std over seeds) for some or all keys.
    """
    if not isinstance(values, dict) or not values:
        raise ValueError("values must be a non-empty dict of label -> number")
    bad = [k for k, v in values.items() if not _is_number(v)]
    if bad:
        raise TypeError(f"values must be numbers; not for {bad}")
    errors = errors or {}
    if not isinstance(errors, dict):
        raise TypeError(f"errors must be a dict of label -> number, got {type(errors).__name__}")
    bad = [k for k, v in errors.items() if k not in values or not _is_number(v)]
    if bad:
        raise ValueError(f"errors has keys not in values or non-numeric entries: {bad}")
    labels = [str(k) for k in values]
    heights = [float(v) for v in values.values()]
    yerr = [float(errors.get(k, 0.0)) for k in values]
    # Wider for many bars, so that neither the value labels nor the rotated names overlap.
    fig, ax = _axes(title, "", ylabel, width=max(6.0, 0.6 * len(labels) + 1.5))
    ax.grid(False)
    ax.grid(True, axis="y", alpha=0.3)
    bars = ax.bar(range(len(labels)), heights, yerr=yerr if any(yerr) else None, capsize=4)
    ax.bar_label(bars, fmt="%.3g", padding=2, fontsize="small")  # 3 digits: 46.6, 0.426
    if len(labels) > 4:
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(labels)), labels)
    return _save(fig, path)

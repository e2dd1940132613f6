"""The sweep's table (one row per trial) and its plot (primary metric against each swept parameter)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from finetune.sweep.selection import TrialOutcome


def _num(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if value is not None and math.isfinite(value) else None


def trial_rows(
    outcomes: Sequence[TrialOutcome], swept: Sequence[str], metric: str | None, winner_run_id: str | None
) -> list[dict[str, Any]]:
    """Parameters, validation loss, primary metric, tokens/s, wall time, state, and which trial won."""
    rows = []
    for o in sorted(outcomes, key=lambda o: o.trial.index):
        row: dict[str, Any] = {"trial": o.trial.index, "run_id": o.trial.run_id}
        row.update({field: o.trial.params.get(field) for field in swept})
        row["val_loss"] = _num(o.metrics.get("val_loss"))
        if metric is not None and metric != "val_loss":
            row[metric] = _num(o.metrics.get(metric))
        row["tokens_per_sec"] = _num(o.tokens_per_sec, 1)
        row["wall_seconds"] = _num(o.wall_seconds, 1)
        row["state"] = o.state
        row["winner"] = o.trial.run_id == winner_run_id
        rows.append(row)
    return rows


def metric_plot_png(outcomes: Sequence[TrialOutcome], swept: Sequence[str], metric: str) -> bytes:
    """One panel per swept parameter: the finished trials' primary metric against its value (log x for log-spread values)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finished = [o for o in outcomes if o.finished]
    fig = Figure(figsize=(4.0 * max(1, len(swept)), 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no GUI backend, no process-wide matplotlib.use()
    axes = fig.subplots(1, max(1, len(swept)), squeeze=False)[0]
    for ax, field in zip(axes, swept):
        points = [(o.trial.params.get(field), o.score) for o in finished]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
        if numeric and points:
            xs = [float(x) for x, _ in points]
            ax.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x, _ in points})
            ax.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(field)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per trial ({len(finished)} finished)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()

"""Hyperparameter sweeps: a search space over the config, deterministic trials, selection by the gate."""

from finetune.sweep.report import metric_plot_png, trial_rows
from finetune.sweep.selection import TrialOutcome, rank, winner
from finetune.sweep.space import Sweep, SweepSpec, Trial, build_sweep, load_sweep, trial_run_id

__all__ = [
    "Sweep",
    "SweepSpec",
    "Trial",
    "TrialOutcome",
    "build_sweep",
    "load_sweep",
    "metric_plot_png",
    "rank",
    "trial_rows",
    "trial_run_id",
    "winner",
]

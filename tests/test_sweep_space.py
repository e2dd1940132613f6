"""Sweep expansion, trial ids, validation, ranking by the gate, median stopping, the table and the plot."""

from __future__ import annotations

import pytest

from finetune.config import ConfigError
from finetune.sweep import TrialOutcome, build_sweep, load_sweep, metric_plot_png, rank, trial_rows, winner
from finetune.sweep.space import Trial

BASE = {"model": {"path": "builtin:tiny-llama"}, "training": {"iters": 10}}
SPACE = {
    "grid": {"lora.rank": [4, 8]},
    "random": {
        "training.learning_rate": {"distribution": "log_uniform", "low": 1e-5, "high": 1e-2},
        "lora.dropout": {"distribution": "uniform", "low": 0.0, "high": 0.2},
        "lora.num_layers": {"distribution": "choice", "values": [1, 2]},
    },
    "max_trials": 6,
    "seed": 3,
}


def sweep(**space):
    return build_sweep({**BASE, "sweep": {**SPACE, **space}})


def test_expansion_is_deterministic_and_ids_follow_the_parameters() -> None:
    a, b = sweep(), sweep()
    assert [(t.run_id, t.params) for t in a.trials] == [(t.run_id, t.params) for t in b.trials]
    assert len(a.trials) == 6 and len({t.run_id for t in a.trials}) == 6
    assert [t.params["lora.rank"] for t in a.trials] == [4, 8, 4, 8, 4, 8]
    for t in a.trials:
        assert t.run_id.startswith(a.sweep_id + "-")
        assert 1e-5 <= t.params["training.learning_rate"] <= 1e-2
        assert 0.0 <= t.params["lora.dropout"] <= 0.2 and t.params["lora.num_layers"] in (1, 2)
        assert a.settings(t).training.learning_rate == t.params["training.learning_rate"]
        assert a.settings(t).training.iters == 10  # the base survives
    # Another seed draws other values; a longer sweep keeps the first trials (the draw depends on the index only).
    assert [t.params for t in sweep(seed=4).trials] != [t.params for t in a.trials]
    assert [t.params for t in sweep(max_trials=8, name="x").trials][:6] == [t.params for t in a.trials]


def test_log_uniform_spreads_over_decades() -> None:
    lrs = [t.params["training.learning_rate"] for t in sweep(max_trials=200).trials]
    decades = [sum(lo <= x < lo * 10 for x in lrs) for lo in (1e-5, 1e-4, 1e-3)]
    assert all(30 <= n <= 110 for n in decades), decades  # uniform in x would put ~90 % in the top decade


def test_run_id_depends_on_sweep_and_parameters_not_position() -> None:
    grid = build_sweep({**BASE, "sweep": {"name": "lr", "grid": {"training.learning_rate": [1e-3, 1e-4]}}})
    flipped = build_sweep({**BASE, "sweep": {"name": "lr", "grid": {"training.learning_rate": [1e-4, 1e-3]}}})
    assert {t.run_id: t.params for t in grid.trials} == {t.run_id: t.params for t in flipped.trials}
    other = build_sweep({**BASE, "sweep": {"name": "lr2", "grid": {"training.learning_rate": [1e-3, 1e-4]}}})
    assert not {t.run_id for t in grid.trials} & {t.run_id for t in other.trials}
    # The default sweep id changes with the base config: another base never resumes this sweep's runs.
    a = build_sweep({**BASE, "sweep": {"grid": {"lora.rank": [4]}}})
    b = build_sweep({**BASE, "training": {"iters": 11}, "sweep": {"grid": {"lora.rank": [4]}}})
    assert a.sweep_id != b.sweep_id


def test_grid_only_sweep_is_the_product_capped_by_max_trials() -> None:
    s = build_sweep({**BASE, "sweep": {"grid": {"lora.rank": [4, 8], "training.learning_rate": [1e-3, 1e-4]}}})
    assert [t.params for t in s.trials] == [
        {"lora.rank": 4, "training.learning_rate": 1e-3},
        {"lora.rank": 4, "training.learning_rate": 1e-4},
        {"lora.rank": 8, "training.learning_rate": 1e-3},
        {"lora.rank": 8, "training.learning_rate": 1e-4},
    ]
    with pytest.raises(ConfigError, match=r"4 combinations, more than sweep.max_trials=3"):
        build_sweep({**BASE, "sweep": {"max_trials": 3, "grid": {"lora.rank": [4, 8], "training.seed": [1, 2]}}})


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"grid": {"training.learnig_rate": [1e-3]}},
            r"sweep.grid 'training.learnig_rate': unknown config field \(did you mean training.learning_rate\?\)",
        ),
        ({"grid": {"trainer.iters": [1]}}, r"sweep.grid 'trainer.iters': unknown config field"),
        (
            {"random": {"lora.rnk": {"distribution": "choice", "values": [4]}}, "max_trials": 2},
            r"sweep.random 'lora.rnk': unknown",
        ),
        ({"grid": {"storage.uri": ["s3://x/y"]}}, r"'storage.uri': storage cannot be swept"),
        (
            {
                "random": {"training.learning_rate": {"distribution": "log_uniform", "low": 0, "high": 1}},
                "max_trials": 2,
            },
            r"sweep.random.training.learning_rate.log_uniform': Value error, log_uniform needs low > 0",
        ),
        (
            {"random": {"training.learning_rate": {"distribution": "gaussian", "low": 0, "high": 1}}, "max_trials": 2},
            r"sweep.random.training.learning_rate': Input tag 'gaussian'",
        ),
        (
            {"random": {"lora.dropout": {"distribution": "uniform", "low": 0.2, "high": 0.1}}, "max_trials": 2},
            r"sweep.random.lora.dropout.uniform': Value error, low \(0.2\) must be below high",
        ),
        (
            {"random": {"lora.dropout": {"distribution": "uniform", "low": 0, "high": 0.1}}},
            r"random draws need max_trials",
        ),
        ({"grid": {"lora.rank": []}}, r"grid field 'lora.rank' has no values"),
        (
            {"grid": {"lora.rank": [0]}},
            r"trial 0 \(lora.rank=0\): config key 'lora.rank': Input should be greater than 0",
        ),
        ({"grid": {"lora.dropout": [0.1]}, "max_trails": 2}, r"unknown config key 'sweep.max_trails'"),
        ({}, r"search space is empty"),
    ],
)
def test_bad_sweeps_name_the_field(space, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_sweep({**BASE, "sweep": space})


def test_bad_base_config_and_missing_section(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'training.iterz'"):
        build_sweep({"training": {"iterz": 1}, "sweep": {"grid": {"lora.rank": [4]}}})
    path = tmp_path / "sweep.yaml"
    path.write_text("training: {iters: 5}\n")
    with pytest.raises(ConfigError, match=rf"sweep file {path}: no 'sweep:' section"):
        load_sweep(path)
    path.write_text("training: {iters: 5}\nsweep:\n  grid: {lora.rank: [4, 8]}\n")
    loaded = load_sweep(path, overrides={"training": {"steps_per_eval": 5}})
    assert [t.params for t in loaded.trials] == [{"lora.rank": 4}, {"lora.rank": 8}]
    assert loaded.settings(loaded.trials[0]).training.steps_per_eval == 5


def outcome(
    index: int, score: float | None, *, metric: str = "val_loss", promote: bool = True, state: str = "Completed"
):
    trial = Trial(index, f"s-{index}", {"training.learning_rate": 10.0 ** -(index + 2), "lora.rank": 4 * (index + 1)})
    metrics = {} if score is None else {metric: score, "val_loss": score}
    return TrialOutcome(
        trial,
        state,
        metrics=metrics,
        primary_metric=metric,
        decision={"promote": promote, "reason": "r"},
        tokens_per_sec=100.0 + index,
        wall_seconds=9.0,
    )


def test_rank_follows_the_metric_direction_and_the_gate() -> None:
    losses = [outcome(0, 2.0), outcome(1, 1.5), outcome(2, 1.7), outcome(3, None, state="Crashed")]
    assert [o.trial.index for o in rank(losses)] == [1, 2, 0]
    scores = [
        outcome(0, 0.2, metric="exact_match"),
        outcome(1, 0.5, metric="exact_match"),
        outcome(2, 0.4, metric="exact_match"),
    ]
    assert [o.trial.index for o in rank(scores)] == [1, 2, 0]
    # The best trial failed the gate (e.g. a floor): the best one that passed wins; none passing: no winner.
    gated = [outcome(0, 2.0), outcome(1, 1.5, promote=False), outcome(2, 1.7)]
    assert winner(gated).trial.index == 2
    assert winner([outcome(0, 2.0, promote=False)]) is None
    with pytest.raises(ValueError, match="disagree on the primary metric"):
        rank([outcome(0, 1.0), outcome(1, 0.5, metric="exact_match")])


def test_table_rows_and_plot() -> None:
    outcomes = [outcome(0, 2.0), outcome(1, 1.5), outcome(2, None, state="Crashed")]
    rows = trial_rows(outcomes, ["training.learning_rate", "lora.rank"], "val_loss", "s-1")
    assert rows[1] == {
        "trial": 1,
        "run_id": "s-1",
        "training.learning_rate": 0.001,
        "lora.rank": 8,
        "val_loss": 1.5,
        "tokens_per_sec": 101.0,
        "wall_seconds": 9.0,
        "state": "Completed",
        "winner": True,
    }
    assert rows[2]["state"] == "Crashed" and rows[2]["val_loss"] is None and not rows[0]["winner"]
    png = metric_plot_png(outcomes, ["training.learning_rate", "lora.rank"], "val_loss")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_cli_lists_the_trials_and_names_bad_fields(tmp_path, capsys, monkeypatch) -> None:
    from test_cli import run_cli

    path = tmp_path / "sweep.yaml"
    path.write_text("training: {iters: 5}\nsweep:\n  name: cli\n  grid: {lora.rank: [4, 8]}\n")
    code, out, _ = run_cli(capsys, "sweep", "-c", str(path), "--dry-run", "--set", "training.iters=7")
    s = load_sweep(path, overrides={"training": {"iters": 7}})
    assert code == 0 and "sweep cli: 2 trials" in out
    assert all(f"{t.run_id}  {t.label()}" in out for t in s.trials)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code, _, err = run_cli(capsys, "sweep", "-c", str(path))
    assert code == 2 and "set PREFECT_API_URL to your Prefect server" in err
    path.write_text("sweep:\n  grid: {lora.rnak: [4]}\n")
    code, _, err = run_cli(capsys, "sweep", "-c", str(path), "--dry-run")
    assert (
        code == 2
        and f"sweep file {path}: sweep.grid 'lora.rnak': unknown config field (did you mean lora.rank?)"
        in " ".join(err.split())
    )

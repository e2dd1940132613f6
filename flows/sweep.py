"""The sweep: one resumable pipeline run per trial across the pool, the gate picks one winner, only it is promoted.

    finetune sweep -c sweep.yaml          # runs this flow from the terminal; trials go to the work pool

Each trial is a run of the ``sweep-trial`` deployment (the pipeline itself) queued with
``run_deployment(timeout=0)``: any worker of the pool takes it, one per Mac, with the pool's
heartbeats, zombie automation, task retries and per-Mac training slot. Its run id comes from
the sweep id and its parameters, so re-running the sweep reuses finished trials and resumes
the others from their checkpoints.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State

from finetune.config import SECTIONS
from finetune.sweep import Sweep, TrialOutcome, build_sweep, rank, winner
from tasks.data import fetch_dataset, template_dataset
from tasks.prepare import resolve_model
from tasks.publish import promote_candidate, publish_bundle, trial_storage
from tasks.sweep import (
    TRIAL_DEPLOYMENT,
    collect_outcome,
    staged_bundle,
    submit_trial,
    sweep_artifacts,
    wait_for_runs,
)


@flow(name="finetune-sweep", log_prints=True)
def finetune_sweep(
    config: dict[str, Any],
    work_dir: str = ".finetune",
    deployment: str = TRIAL_DEPLOYMENT,
    poll_seconds: float = 5.0,
) -> dict[str, Any] | State:
    """Run every trial of ``config`` (the config sections plus a ``sweep:`` section), then promote the best.

    Promotes nothing while any trial is unfinished: the missing one could have been the best.
    """
    sweep = build_sweep(config)
    logger = get_run_logger()
    logger.info("sweep %s: %d trials over %s", sweep.sweep_id, len(sweep.trials), ", ".join(sweep.swept_fields()))
    prepare_data(sweep, work_dir)

    runs = [submit_trial(deployment, sweep, t, trial_parameters(sweep, t, work_dir)) for t in sweep.trials]
    finished = wait_for_runs(runs, poll_seconds)
    settings = sweep.settings(sweep.trials[0])
    staging = trial_storage(settings.storage, sweep.sweep_id)
    outcomes = [collect_outcome(t, r.id, staging) for t, r in zip(sweep.trials, finished)]

    unfinished = [o for o in outcomes if o.state != "Completed"]
    ranked = rank(outcomes)
    metric = ranked[0].primary_metric if ranked else None
    best = None if unfinished else winner(outcomes)
    result = publish_results(sweep, outcomes, best, work_dir) if not unfinished else {}
    summary = summarize(outcomes, unfinished, best, result)
    logger.info(summary)
    sweep_artifacts(sweep, outcomes, metric, best and best.trial.run_id, summary, f"{work_dir}/sweeps")
    table = [{"run_id": o.trial.run_id, "params": o.trial.params, "state": o.state, "score": o.score} for o in outcomes]
    data = {
        "sweep_id": sweep.sweep_id,
        "metric": metric,
        "winner": best and best.trial.run_id,
        "trials": table,
        **result,
    }
    if unfinished:
        return Failed(message=summary, data=data)
    return Completed(message=summary, data=data)


def trial_parameters(sweep: Sweep, trial, work_dir: str) -> dict[str, Any]:
    """The pipeline's parameters for one trial: public sections only (workers read secrets from their environment)."""
    public = sweep.settings(trial).public_dict()
    return {
        **{name: public[name] for name in SECTIONS},
        "work_dir": work_dir,
        "run_id": trial.run_id,
        "sweep_id": sweep.sweep_id,
        # A trial is never "nothing changed since the last published run": it is one point of the sweep.
        "force": True,
    }


def prepare_data(sweep: Sweep, work_dir: str) -> None:
    """Fetch and tokenize once per (dataset, template, model) before any trial is queued; trials reuse the cache.

    Bad data then fails the sweep here, once, instead of in every trial.
    """
    for group in sweep.data_groups():
        settings = sweep.settings(group[0])
        model_path = resolve_model(settings.model.path, settings.model.revision, work_dir)
        fetched = fetch_dataset(settings.dataset, settings.storage, work_dir)
        template_dataset(fetched.directory, model_path, settings.template, settings.dataset.on_bad_row, work_dir)


def publish_results(sweep: Sweep, outcomes: list[TrialOutcome], best: TrialOutcome | None, work_dir: str) -> dict:
    """The winner through the normal publish and promote path; the others published too when ``publish_all``."""
    storage = sweep.settings(sweep.trials[0]).storage
    staging = trial_storage(storage, sweep.sweep_id)
    chosen = [o for o in outcomes if o is best or (sweep.spec.publish_all and o.finished)]
    result: dict[str, Any] = {"published": {}, "promoted": False, "promotion_reason": "no trial passed the gate"}
    for o in chosen:
        staged = staged_bundle(staging, o.trial.run_id, work_dir)
        published = publish_bundle(storage, o.trial.run_id, staged.path, staged.fields)
        result["published"][o.trial.run_id] = published.uri
        if o is best:
            margin = sweep.settings(o.trial).evaluation.promotion_margin
            promotion = promote_candidate(storage, o.trial.run_id, staged.scorecard, margin, staged.champion_run_id)
            result.update(promoted=promotion.promoted, promotion_reason=promotion.reason)
    return result


def summarize(
    outcomes: list[TrialOutcome], unfinished: list[TrialOutcome], best: TrialOutcome | None, result: dict
) -> str:
    if unfinished:
        names = ", ".join(f"{o.trial.run_id} ({o.state})" for o in unfinished)
        return f"{len(unfinished)} of {len(outcomes)} trials did not finish: {names}; re-run the sweep to resume them"
    if best is None:
        return f"{len(outcomes)} trials finished; none passed the gate, nothing promoted"
    verdict = "promoted" if result.get("promoted") else "not promoted"
    return (
        f"winner {best.trial.run_id} ({best.trial.label()}): {best.primary_metric} {best.score:.4f}; "
        f"{verdict}: {result.get('promotion_reason')}"
    )

"""Serve prefect.yaml's deployments from this machine alone: no work pool, no worker.

    python -m deployments.serve        # from the repository root; PREFECT_API_URL names the server

The same deployments (names, parameters, schedules, concurrency, triggers) as
`prefect deploy --all`, but run by this process, one at a time, from this checkout.
Use one or the other: both register `finetune-pipeline/finetune` and `.../retrain-nightly`.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron, Schedule

from deployments.project import HEARTBEAT_ENV, PREFECT_YAML, REPO, Project, load_project


def schedules_of(spec: dict[str, Any]) -> list[Schedule]:
    schedules = []
    for item in spec.get("schedules") or []:
        if "cron" not in item:
            raise ValueError(f"{PREFECT_YAML}: deployment {spec['name']}: serve.py handles cron schedules only")
        schedules.append(Cron(item["cron"], timezone=item.get("timezone"), slug=item.get("slug")))
    return schedules


def runner_deployments(project: Project) -> list[RunnerDeployment]:
    """prefect.yaml's deployments, as ``serve`` takes them (not the sweep: it waits on trials that
    one-at-a-time serving could never start; ``finetune sweep`` queues them from the terminal)."""
    from prefect.flows import load_flow_from_entrypoint

    deployments = []
    for spec in project.deployments:
        if spec["name"] == "sweep":
            continue
        limit = spec.get("concurrency_limit") or {}
        deployments.append(
            load_flow_from_entrypoint(spec["entrypoint"]).to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=schedules_of(spec),
                concurrency_limit=ConcurrencyLimitConfig(**limit) if limit else None,
                triggers=[DeploymentEventTrigger(**trigger) for trigger in spec.get("triggers") or []],
                # By module, not by file: Prefect registers a flow file under its own name, and
                # flows/finetune.py would then shadow the finetune package.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def main() -> None:
    project = load_project()
    # Flow runs are child processes of this one: they inherit the heartbeat frequency.
    os.environ.setdefault(HEARTBEAT_ENV, str(project.heartbeat_seconds))
    os.chdir(REPO)  # relative paths in parameters (work_dir, a local store) are relative to the checkout
    serve(*runner_deployments(project), limit=1)


if __name__ == "__main__":
    main()

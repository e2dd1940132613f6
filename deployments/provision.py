"""Stand a Prefect server up for finetune: work pool, training slot, zombie detection; launchd agent for a Mac.

    python -m deployments.provision                 # pool, this machine's training slot, zombie automation
    python -m deployments.provision plist --api-url http://prefect.local:4200/api \\
        > ~/Library/LaunchAgents/dev.finetune.worker.plist

Both read the pool name and the heartbeat frequency from prefect.yaml (change them there, then
re-run this and `prefect deploy --all`). Re-running updates
what exists. Each Mac's training slot is also created by its first training run
(prefect.yaml's job variables name it).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from datetime import timedelta
from pathlib import Path
from string import Template
from typing import Any
from xml.sax.saxutils import escape

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from deployments.project import HEARTBEAT_ENV, REPO, load_project
from tasks.schedule import training_slot_name

ZOMBIE_AUTOMATION = "finetune: mark flow runs without heartbeats Crashed"
MISSED_HEARTBEATS = 3
# Any event of the run after its heartbeat counts as a sign of life: another heartbeat, or a state
# change. A run that ends (Completed, Skipped, TimedOut, Cancelled, ... : event names are state
# *names*, which flows choose) or pauses stops sending heartbeats on purpose, so listing final
# states would miss the custom ones and crash runs that already finished.
LIFE_SIGNS = {"prefect.flow-run.*"}
PLIST_TEMPLATE = Path(__file__).with_name("launchd-worker.plist")
PLIST_LABEL = "dev.finetune.worker"


def zombie_automation(
    heartbeat_seconds: int, *, name: str = ZOMBIE_AUTOMATION, match_related: dict[str, Any] | None = None
) -> AutomationCore:
    """Crash a flow run whose heartbeats stop for ``MISSED_HEARTBEATS`` intervals (a killed worker or Mac).

    Prefect's server has no zombie detection of its own: without this, a run whose
    process was SIGKILLed stays Running forever and holds the deployment's slot.
    """
    window = timedelta(seconds=MISSED_HEARTBEATS * heartbeat_seconds)
    return AutomationCore(
        name=name,
        description=f"No heartbeat for {window.total_seconds():g} s ({MISSED_HEARTBEATS} x {heartbeat_seconds} s): "
        "the worker or machine died; mark the run Crashed so a rerun can resume it.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect=LIFE_SIGNS,
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            match_related=match_related or {},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=window,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {window.total_seconds():g} s: the worker or its machine stopped",
            )
        ],
    )


async def ensure_work_pool(client: PrefectClient, name: str) -> str:
    try:
        await client.read_work_pool(name)
        return f"work pool {name}: exists"
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        await client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
        return f"work pool {name}: created (process)"


async def ensure_concurrency_limit(client: PrefectClient, name: str, limit: int = 1) -> str:
    try:
        existing = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        return f"concurrency limit {name}: created ({limit})"
    if existing.limit != limit or not existing.active:
        await client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
        return f"concurrency limit {name}: set to {limit}"
    return f"concurrency limit {name}: exists ({limit})"


async def ensure_automation(client: PrefectClient, automation: AutomationCore) -> str:
    existing = await client.read_automations_by_name(automation.name)
    for stale in existing[1:]:
        await client.delete_automation(stale.id)
    if existing:
        await client.update_automation(existing[0].id, automation)
        return f"automation {automation.name!r}: updated"
    await client.create_automation(automation)
    return f"automation {automation.name!r}: created"


async def provision(pool: str, slot: str, heartbeat_seconds: int) -> list[str]:
    async with get_client() as client:
        return [
            await ensure_work_pool(client, pool),
            await ensure_concurrency_limit(client, slot),
            await ensure_automation(client, zombie_automation(heartbeat_seconds)),
        ]


def render_plist(api_url: str, pool: str, repo: Path = REPO, logs: Path | None = None) -> str:
    """The launchd agent of a Mac worker: starts at login, restarts when it dies, one flow run at a time."""
    values = {
        "label": PLIST_LABEL,
        "repo": str(repo),
        "pool": pool,
        "worker_name": socket.gethostname().split(".")[0],
        "api_url": api_url,
        "logs": str(logs or Path.home() / "Library" / "Logs" / "finetune"),
    }
    return Template(PLIST_TEMPLATE.read_text(encoding="utf-8")).substitute({k: escape(v) for k, v in values.items()})


def main(argv: list[str] | None = None) -> int:
    project = load_project()
    parser = argparse.ArgumentParser(prog="python -m deployments.provision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slot", default=training_slot_name(), help="this machine's training slot (%(default)s)")
    commands = parser.add_subparsers(dest="command")
    plist = commands.add_parser("plist", help="print the launchd agent for this Mac's worker")
    plist.add_argument("--api-url", required=True, help="the Prefect server's API, e.g. http://prefect.local:4200/api")
    plist.add_argument("--repo", type=Path, default=REPO, help="this Mac's clone (default: %(default)s)")
    plist.add_argument("--logs", type=Path, default=None, help="log directory (default: ~/Library/Logs/finetune)")
    args = parser.parse_args(argv)
    if args.command == "plist":
        sys.stdout.write(render_plist(args.api_url, project.pool, args.repo.resolve(), args.logs))
        return 0
    for line in asyncio.run(provision(project.pool, args.slot, project.heartbeat_seconds)):
        print(line)
    print(f"flow runs send a heartbeat every {project.heartbeat_seconds} s (prefect.yaml, {HEARTBEAT_ENV})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

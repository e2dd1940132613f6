"""The zombie automation against a real Prefect server: it crashes silent runs, and only those.

A run that ends (in any final state, whatever its name) or pauses stops sending heartbeats
on purpose; the automation must not fire for it. One automation on a 4 s heartbeat (12 s
window), scoped to this test's runs by tag, so other tests' runs are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.schemas.objects import StateType
from prefect.events import Event
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.states import Cancelled, Completed, Crashed, Failed, Paused, Running, State
from prefect_server import PrefectServer, client, wait_for

from deployments.provision import zombie_automation

pytestmark = pytest.mark.slow


@flow(name="zombie-probe")
def probe() -> None: ...


# Every way a run stops on purpose: Prefect's own final states, the custom names a flow or
# Prefect gives them (this project's Skipped, Prefect's TimedOut), and a pause.
STOPPED: dict[str, Callable[[], State]] = {
    "Skipped": lambda: Completed(name="Skipped", message="nothing changed"),
    "Completed": Completed,
    "Cancelled": Cancelled,
    "TimedOut": lambda: Failed(name="TimedOut"),
    "Failed": Failed,
    "Crashed": Crashed,
    "Paused": lambda: Paused(timeout_seconds=3600),
}


def test_zombie_automation_crashes_silent_runs_and_ignores_runs_that_stopped(
    prefect_server_api: PrefectServer,
) -> None:
    tag = f"zombie-{uuid4().hex[:8]}"
    automation = zombie_automation(4, name=f"test {tag}", match_related={"prefect.resource.id": f"prefect.tag.{tag}"})

    def heartbeat(run_id: UUID) -> None:
        event = Event(
            event="prefect.flow-run.heartbeat",
            resource={"prefect.resource.id": f"prefect.flow-run.{run_id}"},
            related=[{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}],
        )
        with client() as c:
            c.request("POST", "/events", json=[event.model_dump(mode="json")]).raise_for_status()

    def triggered() -> list[str]:
        """The flow runs the automation fired for (its `prefect.automation.triggered` events)."""
        with client() as c:
            page = c.read_events(
                EventFilter(
                    event=EventNameFilter(name=["prefect.automation.triggered"]),
                    resource=EventResourceFilter(id=[f"prefect.automation.{automation_id}"]),
                ),
                limit=50,
            )
        # for_each is the run's resource id: the firing names it in its triggering labels.
        labels = [event.payload.get("triggering_labels") or {} for event in page.events]
        return sorted(label.get("prefect.resource.id", "?").removeprefix("prefect.flow-run.") for label in labels)

    with client() as c:
        automation_id = c.create_automation(automation)
        silent = c.create_flow_run(probe, tags=[tag], state=Running())
        stopped = {name: c.create_flow_run(probe, tags=[tag], state=Running()) for name in STOPPED}
    try:
        for run in (silent, *stopped.values()):
            heartbeat(run.id)
        with client() as c:
            for name, state in STOPPED.items():
                c.set_flow_run_state(stopped[name].id, state(), force=True)
        started = time.monotonic()
        wait_for(
            lambda: client().read_flow_run(silent.id).state.type == StateType.CRASHED,
            90,
            "the silent run to be marked Crashed",
            interval=2,
        )
        print(f"\nzombie: heartbeat until Crashed (12 s window): {time.monotonic() - started:.1f} s")
        # The stopped runs' windows ended with the silent run's: had the automation fired for
        # them, its triggered events would be there by the time the silent run's is.
        wait_for(lambda: str(silent.id) in triggered(), 20, "the automation's triggered event")
        time.sleep(3)
        assert triggered() == [str(silent.id)]
        with client() as c:
            states = {name: c.read_flow_run(run.id).state.name for name, run in stopped.items()}
        assert states == {name: state().name for name, state in STOPPED.items()}
    finally:
        with client() as c:
            c.delete_automation(automation_id)

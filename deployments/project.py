"""What provision.py and serve.py read from prefect.yaml, so the pool name and heartbeat live in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


@dataclass(frozen=True)
class Project:
    pool: str
    heartbeat_seconds: int
    deployments: list[dict[str, Any]]


def load_project(path: Path = PREFECT_YAML) -> Project:
    """The deployments of ``path`` and the work pool and heartbeat frequency they share."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    deployments = data.get("deployments") or []
    if not deployments:
        raise ValueError(f"{path}: defines no deployments")
    pools = {(d.get("work_pool") or {}).get("name") for d in deployments}
    heartbeats = {
        ((d.get("work_pool") or {}).get("job_variables") or {}).get("env", {}).get(HEARTBEAT_ENV) for d in deployments
    }
    if len(pools) != 1 or None in pools:
        raise ValueError(f"{path}: every deployment must name the same work_pool (found {sorted(map(str, pools))})")
    if len(heartbeats) != 1 or None in heartbeats:
        raise ValueError(f"{path}: every deployment must set work_pool.job_variables.env.{HEARTBEAT_ENV}, to one value")
    return Project(pools.pop(), int(heartbeats.pop()), deployments)

"""The built package metadata installs exactly one MLX backend on Linux: cpu or cuda, never both."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
DARWIN = {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix"}


@pytest.fixture(scope="module")
def requirements(tmp_path_factory) -> list[Requirement]:
    """Requires-Dist of this checkout as pip builds it (its resolver's report, nothing installed)."""
    report = tmp_path_factory.mktemp("meta") / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--report",
            str(report),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (item,) = json.loads(report.read_text())["install"]
    return [Requirement(r) for r in item["metadata"]["requires_dist"]]


def selected(reqs: list[Requirement], env: dict[str, str], extras: set[str]) -> list[Requirement]:
    def wanted(r: Requirement) -> bool:
        if r.marker is None:
            return True
        return any(r.marker.evaluate({**env, "extra": e}) for e in extras | {""})

    return [r for r in reqs if wanted(r)]


def mlx_backends(reqs: list[Requirement], env: dict[str, str], extras: set[str]) -> set[str]:
    """Backend wheels that installing with ``extras`` brings in: ours, then through mlx's own extras."""
    mlx_reqs = [Requirement(r) for r in requires("mlx") or []]
    found = set()
    for r in selected(reqs, env, extras):
        if r.name in ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal"):
            found.add(r.name)
        if r.name == "mlx":
            found |= {m.name for m in selected(mlx_reqs, env, set(r.extras)) if m.name.startswith("mlx-")}
    return found


def test_cuda_extra_on_linux_selects_no_cpu_backend(requirements):
    assert mlx_backends(requirements, LINUX, {"cuda"}) == {"mlx-cuda-13"}
    assert mlx_backends(requirements, LINUX, {"cuda", "test"}) == {"mlx-cuda-13"}


def test_cpu_extra_on_linux_and_no_backend_in_the_base(requirements):
    assert mlx_backends(requirements, LINUX, {"cpu"}) == {"mlx-cpu"}
    assert mlx_backends(requirements, LINUX, set()) == set()  # extras only add: the base names none


def test_macos_gets_metal_whatever_the_extra(requirements):
    for extras in (set(), {"cpu"}, {"cuda"}):
        assert mlx_backends(requirements, DARWIN, extras) == {"mlx-metal"}


def test_constraints_pin_both_linux_backends():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins.get("mlx-cpu") == pins.get("mlx-cuda-13") == pins.get("mlx")

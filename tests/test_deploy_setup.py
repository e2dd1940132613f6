"""Standing the project up as the README says: `make setup` talks while it works, the server's UI finds its API."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

from prefect_server import PrefectServer

REPO = Path(__file__).resolve().parents[1]


def test_make_setup_says_what_it_is_doing(tmp_path: Path) -> None:
    """Every step announces itself and pip shows its progress (no -q): the first install takes minutes."""
    dry = subprocess.run(
        ["make", "-n", "-B", "setup", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    installs = [line for line in dry if " -m pip install " in line]
    assert len(installs) == 2 and not any(re.search(r"\s-q\b|--quiet", line) for line in installs), installs
    steps = [line for line in dry if line.startswith("echo") and "make setup [" in line]
    assert [re.search(r"\[(\d/\d)\]", line).group(1) for line in steps] == ["1/3", "2/3", "3/3"]
    # Each announcement comes right before the command it announces.
    assert dry.index(steps[2]) + 1 == dry.index(installs[1])


def test_ui_on_a_non_default_port_calls_its_own_api(prefect_server: PrefectServer) -> None:
    """The session's server runs as the README starts one (PREFECT_UI_API_URL, a port other than 4200)."""
    base = prefect_server.url.removesuffix("/api")
    assert not base.endswith(":4200")
    with urllib.request.urlopen(f"{base}/ui-settings", timeout=10) as response:
        settings = json.load(response)
    assert settings["api_url"] == prefect_server.url
    with urllib.request.urlopen(f"{base}/", timeout=10) as response:
        assert response.status == 200 and "text/html" in response.headers["content-type"]


def test_readme_server_command_names_the_ui_api_url_and_the_port() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Running on your Macs") :]
    start = next(line for line in section.splitlines() if "prefect server start" in line)
    assert "PREFECT_UI_API_URL=http://" in start and "--host 0.0.0.0" in start
    port = re.search(r"--port (\d+)", start).group(1)
    assert f"PREFECT_UI_API_URL=http://prefect.local:{port}/api" in start
    assert f"export PREFECT_API_URL=http://prefect.local:{port}/api" in section

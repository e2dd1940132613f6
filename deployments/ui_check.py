"""Look at a run in Prefect's UI, in a real browser: an optional check, run by hand.

    python -m deployments.ui_check OUT_DIR [--port 4299]

Starts a Prefect server as README's "Running on your Macs" does (a non-default port,
PREFECT_UI_API_URL), registers the deployments, runs one short pipeline (`finetune run`,
tiny model, local store), then saves headless-Chromium screenshots to OUT_DIR: the
dashboard, the run's artifacts, the loss curve, the training history, the bundle link and
the deployment's Custom run form. Needs Chromium (Debian: apt-get install chromium).
Everything lives in a temporary directory; nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from deployments.project import REPO

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1000",
    "--virtual-time-budget=15000",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("ui_check: no Chromium on PATH (Debian: apt-get install chromium)")


def wait_healthy(api: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("ui_check: the Prefect server exited")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"ui_check: {api} not healthy after {timeout:g} s")


def api_json(api: str, path: str, body: dict | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{api}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def screenshot(browser: str, url: str, out: Path, profile: Path) -> Path:
    profile.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"{out}: {url}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.ui_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for the screenshots")
    parser.add_argument("--port", type=int, default=4299)
    args = parser.parse_args(argv)
    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{args.port}"
    api = f"{base}/api"
    with tempfile.TemporaryDirectory(prefix="ui-check-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        server_env = {**env, "PREFECT_UI_API_URL": api}  # as the README says
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port)],
            env=server_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(api, server)
            client_env = {**env, "PREFECT_API_URL": api}
            deploy = [
                sys.executable,
                "-c",
                "from deployments.serve import *; [d.apply() for d in runner_deployments(load_project())]",
            ]
            subprocess.run(deploy, env=client_env, cwd=REPO, check=True, timeout=300)
            run = [
                sys.executable,
                "-m",
                "finetune.cli",
                "run",
                "--run-id",
                "ui-check",
                "--set",
                f"work_dir={root / 'work'}",
                "--set",
                f"storage.uri={root / 'store'}",
                "--set",
                "training.iters=30",
                "--set",
                "training.steps_per_eval=10",
                "--set",
                "training.steps_per_report=5",
                "--set",
                "evaluation.max_examples=4",
                "--set",
                "evaluation.primary_metric=val_loss",
            ]
            subprocess.run(run, env=client_env, cwd=REPO, check=True, timeout=900)
            flow_run = api_json(api, "/flow_runs/filter", {"limit": 10})
            flow_run = next(r for r in flow_run if r["state_type"] == "COMPLETED")
            artifacts = api_json(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
            by_key = {a["key"]: a for a in artifacts if a.get("key")}
            print("artifacts:", ", ".join(sorted(by_key)))
            (deployment,) = [d for d in api_json(api, "/deployments/filter", {}) if d["name"] == "finetune"]
            profile = root / "chromium"
            shots = [
                ("dashboard", f"{base}/dashboard"),
                ("run-artifacts", f"{base}/runs/flow-run/{flow_run['id']}?tab=Artifacts"),
                ("loss-curve", f"{base}/artifacts/artifact/{by_key['local-loss-curve']['id']}"),
                ("training-history", f"{base}/artifacts/artifact/{by_key['local-training-history']['id']}"),
                ("bundle", f"{base}/artifacts/artifact/{by_key['local-published-bundle']['id']}"),
                ("custom-run-form", f"{base}/deployments/deployment/{deployment['id']}/run"),
            ]
            for name, url in shots:
                screenshot(browser, url, args.out / f"{name}.png", profile / name)
            print("ui settings:", api_json(base, "/ui-settings")["api_url"])
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

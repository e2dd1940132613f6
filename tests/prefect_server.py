"""One real ``prefect server start`` per test session, for the tests that are about Prefect's API.

The server listens on 127.0.0.1 with its own temporary PREFECT_HOME (database, logs),
its UI on (told its API's URL, as the README says), and its scheduler off: schedules are stored and read back, but no run is
created from them behind a test's back. A fresh database needs its migrations, which
took 20-50 s on a loaded 2-core machine, so the wait is generous and the server is
shared. Fast unit tests call task ``.fn`` and need none of this.

    def test_x(prefect_server_api):                 # in-process client calls go to the server
        subprocess.run([...], env=prefect_server_api.env())   # CLI, workers: same server, same home

(conftest's ``prefect_api`` is Prefect's in-process test harness, for flows run in the test process.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

STARTUP_TIMEOUT = 240.0
T = TypeVar("T")


@dataclass
class PrefectServer:
    url: str  # http://127.0.0.1:PORT/api
    home: Path
    log: Path
    startup_seconds: float
    process: subprocess.Popen = field(repr=False)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client process (CLI, worker) talking to this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=self.url,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_CLI_PROMPT="false",
            # Clients never start an ephemeral server here; if one did, 20 s would be too short.
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        )
        env.update(extra)
        return env

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def drain_prefect_workers() -> None:
    """Send this process's queued Prefect logs and events while the server still answers.

    A flow run in the test process leaves them to background workers, which otherwise
    retry against the stopped server at interpreter exit (80 s here).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # never started
        APILogWorker.drain_all()
    EventsWorker.drain_all()


def start_server(home: Path, timeout: float = STARTUP_TIMEOUT) -> PrefectServer:
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        # As README's "Running on your Macs" starts it: on a port other than 4200, the UI told
        # where the API is (else it calls 127.0.0.1:4200).
        PREFECT_UI_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = PrefectServer(url, home, log, 0.0, process)
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() - started > timeout:
            _stop(process)
            raise RuntimeError(f"prefect server did not become healthy on {url}:\n{server.log_tail()}")
        time.sleep(0.5)
    server.startup_seconds = time.monotonic() - started
    return server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = start_server(tmp_path_factory.mktemp("prefect-home"))
    print(f"\nprefect server on {server.url}: healthy after {server.startup_seconds:.1f} s")
    try:
        yield server
    finally:
        drain_prefect_workers()
        _stop(server.process)


@pytest.fixture
def prefect_server_api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """The session's server, with this process's Prefect client pointed at it for the test."""
    with api_of(prefect_server) as server:
        yield server


@contextlib.contextmanager
def api_of(server: PrefectServer) -> Iterator[PrefectServer]:
    """This process's Prefect client calls go to ``server`` (a module-scoped fixture wraps this)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield server
        drain_prefect_workers()


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    """``condition()``'s first truthy value, polled every ``interval`` s; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value

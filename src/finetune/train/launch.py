"""Starting the ranks of a data-parallel training through ``mlx.launch``, and telling how they ended.

The process that holds the run (the CLI, or the Prefect worker) starts
``mlx.launch`` in its own process group; mlx.launch starts one rank per
hostfile entry (a local process for 127.0.0.1, ssh otherwise) and forwards
their output. mlx.launch always exits 0 and only logs ``Node with rank N exited
with code C``, so the parent reads those lines: the first failed rank kills the
whole group at once, and success means no rank failed and rank 0 wrote its
result. A rank that hangs without dying is ended by its peers' collective
watchdog (``distributed.Watchdog``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import Settings
from finetune.errors import ConfigError

LOCAL = "127.0.0.1"  # the one host name mlx.launch runs without ssh
DEFAULT_PORT = 32323  # mlx.launch's own default
_RANK_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Hostfile:
    path: Path
    hosts: list[dict[str, Any]]

    @property
    def local(self) -> bool:
        return all(h["ssh"] == LOCAL for h in self.hosts)


def read_hostfile(path: str | Path, backend: str) -> Hostfile:
    """Parse and check an mlx.launch hostfile; a problem is one line naming the file and the entry."""
    where = f"training.hosts {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: not a JSON hostfile ({exc})") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise ConfigError(f'{where}: expected a list of hosts, or {{"hosts": [...]}}, with at least one entry')
    for i, host in enumerate(hosts):
        if not isinstance(host, dict) or not isinstance(host.get("ssh"), str) or not host["ssh"]:
            raise ConfigError(f'{where}: host {i} needs "ssh": the name or address to ssh to (127.0.0.1: this machine)')
        ips = host.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) and _is_ip(ip) for ip in ips):
            raise ConfigError(f'{where}: host {i} ({host["ssh"]}): "ips" must be a list of IP addresses, got {ips!r}')
        if backend != "mpi" and not ips and (backend == "ring" or i == 0):
            raise ConfigError(
                f'{where}: host {i} ({host["ssh"]}) has no "ips": the {backend} backend connects to IP addresses, '
                "not host names (mlx#1210: names made it 10-25x slower)"
            )
    if not _is_this_machine(hosts[0]):
        raise ConfigError(
            f'{where}: host 0 ({hosts[0]["ssh"]}) must be this machine ("ssh": "127.0.0.1", with its own IP in "ips"): '
            "rank 0 writes the checkpoints and the adapter into the run directory here"
        )
    return Hostfile(Path(path), hosts)


def _is_this_machine(host: dict[str, Any]) -> bool:
    name = socket.gethostname()
    if host["ssh"] in (LOCAL, "localhost", name, name.split(".")[0], name.split(".")[0] + ".local"):
        return True
    for ip in host.get("ips", []):
        try:
            with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
                s.bind((ip, 0))  # only an address of this machine can be bound
            return True
        except OSError:
            continue
    return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def launcher() -> str:
    """The mlx.launch script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("mlx.launch")
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if found is None:
        raise ConfigError("training.hosts is set but mlx.launch is not installed (it comes with the mlx package)")
    return found


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free local ports (ring: one per rank)."""
    for _ in range(50):
        first = random.randint(20000, 60000 - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind((LOCAL, port))
        except OSError:
            continue
        return first
    raise ConfigError("no free local ports for the ring backend; set training.distributed_port")


def rank_command(settings: Settings, request: Path) -> list[str]:
    """The command the parent runs: one training process, or mlx.launch starting one per host."""
    child = [sys.executable, "-m", "finetune.train.child", str(request)]
    t = settings.training
    if t.hosts is None:
        return child
    hostfile = read_hostfile(t.hosts, t.distributed_backend)
    port = t.distributed_port or (free_ports(len(hostfile.hosts)) if hostfile.local else DEFAULT_PORT)
    if t.distributed_backend == "nccl" and hostfile.local:
        # With a hostfile mlx.launch gives every rank CUDA_VISIBLE_DEVICES=0; with -n it gives rank r GPU r.
        where = ["--hosts", LOCAL, "-n", str(len(hostfile.hosts))]
    else:
        where = ["--hostfile", str(hostfile.path)]
    env = ["--env", "PYTHONUNBUFFERED=1"]
    if hostfile.local and "OPENBLAS_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; each OpenBLAS would otherwise start a thread per core.
        env += ["--env", f"OPENBLAS_NUM_THREADS={max(1, (os.cpu_count() or 1) // len(hostfile.hosts))}"]
    if os.environ.get("PYTHONPATH"):
        env += ["--env", f"PYTHONPATH={os.environ['PYTHONPATH']}"]
    return [
        launcher(),
        "--backend",
        t.distributed_backend,
        *where,
        "--starting-port",
        str(port),
        *env,
        "--",
        *child,
        "--backend",
        t.distributed_backend,
        "--timeout",
        f"{t.distributed_timeout_seconds:g}",
    ]


def strip_ansi(line: str) -> str:
    """mlx.launch colours its warnings; logs and error messages get the plain text."""
    return _ANSI.sub("", line)


class RankWatch:
    """Reads mlx.launch's per-rank exit lines: which ranks failed, and how."""

    def __init__(self) -> None:
        self.failures: list[tuple[int, int | None]] = []  # (rank, exit code; None: mlx.launch killed it)

    def saw_failure(self, line: str) -> bool:
        """True when ``line`` reports the first rank that failed."""
        match = _RANK_EXIT.search(strip_ansi(line))
        code = int(match.group(2)) if match and match.group(2) is not None else None
        if match is None or code == 0:
            return False
        self.failures.append((int(match.group(1)), code))
        return len(self.failures) == 1

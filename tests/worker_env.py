"""A deploying clone with a git remote, and a clean worker: what prefect.yaml's build and pull steps need.

``deploying_clone`` commits this checkout's working tree (committed or not: the code under
test) into a fresh clone whose ``origin`` is a local bare repository, as a user's clone of
the project's remote would be. ``clean_worker_python`` is a virtual environment without
finetune: it sees the test venv's third-party packages (prefect, mlx, ...) through a path
entry, not its ``.pth`` files, so the editable install of this checkout stays invisible and
the flow run can only import what the pull step installed. ``process_worker`` runs a
``prefect worker`` on the pool from such an environment and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen

from finetune.train.blas import openblas_library

REPO = Path(__file__).resolve().parents[1]
GIT_ID = ["-c", "user.name=finetune tests", "-c", "user.email=tests@finetune.invalid"]


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *GIT_ID, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip()}")
    return done.stdout.strip()


def deploying_clone(root: Path, branch: str = "main") -> tuple[Path, Path]:
    """(clone, bare origin): the clone's HEAD holds this checkout's working tree and is pushed to origin."""
    origin, clone = root / "origin.git", root / "finetune"
    git(root, "init", "-q", "--bare", "-b", branch, str(origin))
    git(root, "init", "-q", "-b", branch, str(clone))
    files = git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():  # a deleted file still listed by --cached is not part of the tree
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "-m", "the working tree under test")
    git(clone, "remote", "add", "origin", str(origin))
    git(clone, "push", "-q", "-u", "origin", branch)
    return clone, origin


def clean_worker_python(root: Path) -> Path:
    """The interpreter of a fresh virtual environment that has prefect and the other dependencies, not finetune."""
    venv = root / "worker-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A bare path line: the shared site-packages joins sys.path, its .pth files (the editable finetune) do not run.
    Path(purelib, "shared-test-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    found = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('finetune'))"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    assert found == "None", f"the clean worker venv already sees finetune: {found}"
    return python


def worker_environment(server_env: Callable[..., dict[str, str]], home: Path, **extra: str) -> dict[str, str]:
    """A worker's environment: the server's, its own HOME, OpenBLAS where Debian has it, nothing of this checkout."""
    if openblas := openblas_library():
        extra["LD_PRELOAD"] = openblas  # faster MLX matmuls on Linux, as the README suggests
    return {k: v for k, v in server_env(HOME=str(home), **extra).items() if k != "PYTHONPATH"}


@contextlib.contextmanager
def process_worker(python: Path, env: dict[str, str], home: Path, log: Path, *options: str) -> Iterator[Popen]:
    """``prefect worker start --pool mac-mlx --type process --limit 1 OPTIONS`` in ``home``; stopped on exit."""
    command = [str(python), "-m", "prefect", "worker", "start", "--pool", "mac-mlx", "--type", "process"]
    with open(log, "wb") as out:
        process = Popen(
            [*command, "--limit", "1", *options],
            env=env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            # The worker shuts down on SIGINT; it ignored a plain SIGTERM here.
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

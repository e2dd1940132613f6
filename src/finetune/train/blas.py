"""The training process's environment per MLX backend: Debian's OpenBLAS on the CPU, graph size on CUDA.

The mlx-cpu wheel links the reference BLAS; preloading OpenBLAS into a fresh
process makes its matrix products an order of magnitude faster. Optional:
where the library is absent, nothing changes. A process whose MLX runs on a GPU
(the mlx-cuda wheel, or Metal) does its matrix products there: nothing is
preloaded into it. On CUDA, MLX records operations into CUDA graphs of
``MLX_MAX_OPS_PER_BUFFER`` operations; a LoRA step launches thousands of small
kernels, and the graph size sets how much host time each one costs.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
DISABLE_ENV = "FINETUNE_OPENBLAS"  # set to "off" to run with the wheel's BLAS
OPS_PER_GRAPH_ENV = "MLX_MAX_OPS_PER_BUFFER"
# benchmarks/results/h200-2026-12-02-b-step.jsonl (flat optimizer step): a step of the 0.5B shape took 46.5 ms
# at 50, 53.4 at 25, 61.4 at 100 (and 60.2 at 50, 66.0 at 200, 75.7 at 100 in an earlier process); the 8B shape
# 277 ms at 50 and 273 ms at 100. Before the flat step, MLX's default took 175 ms against 142 ms at 100.
CUDA_OPS_PER_GRAPH = "50"


def openblas_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "auto") == "off"


def mlx_backend() -> str:
    """The backend MLX computes on by default in this installation: ``cuda``, ``metal`` or ``cpu``."""
    import mlx.core as mx

    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


def openblas_library() -> str | None:
    """Path of Debian's OpenBLAS when it is present and wanted on this machine (Linux, MLX on the CPU)."""
    if platform.system() != "Linux" or openblas_disabled() or mlx_backend() != "cpu":
        return None
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def is_preloaded(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any("libopenblas" in part for part in env.get("LD_PRELOAD", "").split(":"))


def preload_env(env: dict[str, str] | None = None, enabled: bool = True) -> tuple[dict[str, str], str | None]:
    """A copy of ``env`` that preloads OpenBLAS in a child process, and the library used (or None)."""
    env = dict(os.environ if env is None else env)
    library = openblas_library() if enabled else None
    if library and not is_preloaded(env):
        env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    return env, library if library and is_preloaded(env) else None


def backend_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this backend's MLX knobs added where the user set none (on CUDA: operations per graph)."""
    if mlx_backend() == "cuda":
        env.setdefault(OPS_PER_GRAPH_ENV, CUDA_OPS_PER_GRAPH)
    return env


def reexec_with_openblas() -> None:
    """Restart this process with OpenBLAS preloaded, once; a no-op when absent or already done."""
    if is_preloaded() or openblas_library() is None or os.environ.get("FINETUNE_REEXEC") == "1":
        return
    env, _ = preload_env()
    env["FINETUNE_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

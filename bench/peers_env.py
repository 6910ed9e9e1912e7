"""The peers' virtual environments: built from pinned files, apart from the project's `.venv`.

Two environments, because the peers cannot share one: nvidia-pytriton 0.7.0 requires numpy < 2,
while Darts 0.48.1 needs shap, whose current releases require numpy >= 2.

- ``bench/.venv-peers/serving`` (``bench/requirements-peers.txt``): MLServer 1.7 with its MLflow
  runtime, the nvidia-pytriton wheel (for its bundled ``tritonserver`` and python backend),
  tritonclient, MLflow (``mlflow models serve``) and onnxruntime for the forecasting pyfunc.
- ``bench/.venv-peers/darts`` (``bench/requirements-darts.txt``): Darts with torch. torch is
  installed first and alone, so pip takes the CPU wheel it can find (a local one here) instead of
  resolving a CUDA build of several GB as a dependency of Darts; Darts then sees it installed.

Each environment is rebuilt when its requirements file changes (a stamp holds the file's hash).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOME = BENCH / ".venv-peers"
SERVING_REQUIREMENTS = BENCH / "requirements-peers.txt"
DARTS_REQUIREMENTS = BENCH / "requirements-darts.txt"
TORCH_PIN = "torch==2.13.0"


class EnvError(RuntimeError):
    """A peers' environment could not be built; the message says which step failed and why."""


def _base_python() -> str:
    # venv from inside a venv would chain to it; the base interpreter is the same Python 3.11.
    return getattr(sys, "_base_executable", None) or sys.executable


def _stamp(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def _run(args: list[str], log: Path, what: str) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        rc = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise EnvError(f"{what} failed (exit {rc}); the end of {log}:\n" + "\n".join(tail))


def ensure(name: str, requirements: Path, first: list[str] | None = None) -> Path:
    """The python of environment ``name`` with ``requirements`` installed (built if missing or stale).

    ``first`` is installed alone before the file (torch, see the module docstring)."""
    env = HOME / name
    python = env / "bin" / "python"
    stamp = env / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text() == _stamp(requirements):
        return python
    HOME.mkdir(parents=True, exist_ok=True)
    log = HOME / f"{name}-install.log"
    log.write_text("")
    print(f"building {env} from {requirements.name} (minutes, once; log: {log})", flush=True)
    _run([_base_python(), "-m", "venv", "--clear", str(env)], log, f"creating the {name} venv")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if first:
        _run([*pip, *first], log, f"installing {' '.join(first)} into the {name} venv")
    _run([*pip, "-r", str(requirements)], log, f"installing {requirements.name} into the {name} venv")
    stamp.write_text(_stamp(requirements))
    return python


def serving_python() -> Path:
    return ensure("serving", SERVING_REQUIREMENTS)


def darts_python() -> Path:
    return ensure("darts", DARTS_REQUIREMENTS, first=[TORCH_PIN])

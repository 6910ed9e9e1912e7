"""The serving image's requirement set, installed as the image installs it: a fresh venv from
requirements/serving.txt + constraints.txt on the image's Python (3.12, Ubuntu 24.04's), and
the server run from a copy of serving/ with prebuilt stubs and no protos/, as in the image.

No torch in it, and it serves a real model. Slow (a fresh install, ~1 GB, 2-3 minutes), so it is
marked `packaging`, left out of the default run and run by `.ci/run` (`make test-packaging`).
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.deploy_support import ROOT
from tests.serving_support import FREQ_MS, START_MS, Stream

pytestmark = pytest.mark.packaging

IMAGE_PYTHON = "3.12"  # python3 of the serving stage's base, nvidia/cuda:13.0.x-...-ubuntu24.04


def image_python() -> str:
    """An interpreter of the image's Python version if this machine has one, else this one."""
    found = [shutil.which(f"python{IMAGE_PYTHON}")]
    found += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{IMAGE_PYTHON}.*/bin/python{IMAGE_PYTHON}")))
    for candidate in filter(None, found):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return sys.executable


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("serving-venv") / "venv"
    subprocess.run([image_python(), "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [venv / "bin/pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check",
         "-r", ROOT / "requirements/serving.txt", "-c", ROOT / "requirements/constraints.txt"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-4000:]
    return venv


@pytest.fixture(scope="module")
def image_app(tmp_path_factory) -> Path:
    """/app of the serving image: serving/ with its generated stubs, and nothing else."""
    import serving.proto  # noqa: F401  (fails unless the dev checkout's stubs exist and are fresh)

    app = tmp_path_factory.mktemp("app")
    shutil.copytree(ROOT / "serving", app / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    assert (app / "serving/_proto/__init__.py").exists()
    return app


def venv_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_serving_requirements_install_without_torch(serving_venv):
    out = subprocess.run(
        [serving_venv / "bin/pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    names = {p["name"].lower() for p in json.loads(out.stdout)}
    assert "onnxruntime-gpu" in names and "grpcio" in names
    assert not [n for n in names if n.startswith("torch")], sorted(names)
    version = subprocess.run([serving_venv / "bin/python", "--version"], capture_output=True, text=True).stdout
    if image_python() != sys.executable:
        assert version.split()[1].startswith(IMAGE_PYTHON + ".")


def test_server_from_the_image_layout_serves_a_model_without_torch(serving_venv, image_app, tiny_model_dir):
    python = str(serving_venv / "bin/python")
    probe = "import importlib.util as u, serving.server, serving.healthcheck; print(u.find_spec('torch'))"
    imports = subprocess.run([python, "-c", probe], cwd=image_app, env=venv_env(), capture_output=True, text=True)
    assert imports.returncode == 0 and imports.stdout.strip() == "None", imports.stderr

    model_dir = tiny_model_dir("lstm")  # exported in the dev venv, served from the serving venv
    server = subprocess.Popen(
        [python, "-m", "serving", "--model-uri", str(model_dir), "--port", "0", "--metrics-port", "-1",
         "--device", "cpu"],
        cwd=image_app, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not (found := [m for line in list(lines) if (m := re.search(r"listening on ([\d.]+:\d+)", line))]):
            assert server.poll() is None and time.monotonic() < deadline, "\n".join(lines)
            time.sleep(0.1)
        target = found[0].group(1)
        health = subprocess.run(
            [python, "-m", "serving.healthcheck", "--target", target], cwd=image_app, env=venv_env(),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert health.returncode == 0, health.stderr

        from serving.proto import pb_grpc

        with grpc.insecure_channel(target) as channel:
            stream = Stream(pb_grpc.ForecasterStub(channel))
            (forecast,) = stream.send({"series_id": "s", "timestamp_ms": START_MS, "value": 10.0})
            (later,) = stream.send({"series_id": "s", "timestamp_ms": START_MS + FREQ_MS, "value": 11.0})
            stream.close()
        assert forecast.steps_seen == 1 and later.steps_seen == 2 and len(later.point) > 0

        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, "\n".join(lines)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)

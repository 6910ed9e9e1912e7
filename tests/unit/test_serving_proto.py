"""serving/proto.py imports the stubs `make protos` wrote and never writes them itself: stale or
missing stubs in a checkout fail the import with the command to run; an image (prebuilt stubs,
no protos/) imports them as they are."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import serving.proto  # noqa: F401  (the checkout's stubs exist and are fresh: the copies below start from them)
from serving import protogen


@pytest.fixture
def app(tmp_path) -> Path:
    """A copy of serving/ (with its stubs) and protos/, as in a checkout."""
    shutil.copytree(protogen.REPO_ROOT / "serving", tmp_path / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(protogen.PROTO_ROOT, tmp_path / "protos")
    return tmp_path


def import_proto(root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import serving.proto as p; print(p.SERVICE_NAME)"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)


def test_stubs_older_than_the_protos_fail_with_the_command_to_run(app):
    marker = app / "serving/_proto/__init__.py"
    built = marker.stat().st_mtime
    proto = next((app / "protos").rglob("*.proto"))
    os.utime(proto, (built + 10, built + 10))
    out = import_proto(app)
    assert out.returncode != 0
    assert "older than" in out.stderr and "run `make protos`" in out.stderr
    assert marker.stat().st_mtime == built  # nothing regenerated behind the user's back


def test_missing_stubs_fail_with_the_command_to_run(app):
    shutil.rmtree(app / "serving/_proto")
    out = import_proto(app)
    assert out.returncode != 0 and "run `make protos`" in out.stderr
    assert not (app / "serving/_proto").exists()


def test_an_image_without_protos_imports_its_prebuilt_stubs(app):
    shutil.rmtree(app / "protos")
    assert import_proto(app).stdout.strip() == "forecast.v1.Forecaster"

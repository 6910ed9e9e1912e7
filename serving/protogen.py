"""Generate the Python gRPC stubs from protos/ into the package serving/_proto/ (`make protos`).

protoc writes `from forecast.v1 import forecast_pb2`, an import that only works with the output
directory on sys.path. We rewrite it to `from serving._proto.forecast.v1 import ...` so the stubs are
an ordinary subpackage, while each .proto keeps its canonical name (`forecast/v1/forecast.proto`)
in the descriptor pool, which is what server reflection shows to clients.

The stubs are written to a temporary directory and swapped in with one rename, so concurrent
callers (parallel test processes) never see a half-written package.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "_proto"
PACKAGE = "serving._proto"

_IMPORT_RE = re.compile(r"^from (forecast(?:\.\w+)*) import (\w+_pb2)", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def stubs_are_stale() -> bool:
    """True when a .proto is newer than the generated package (or the package is missing)."""
    marker = OUT_DIR / "__init__.py"
    if not marker.exists():
        return True
    built = marker.stat().st_mtime
    return any(p.stat().st_mtime > built for p in proto_files())


def generate() -> Path:
    """Run grpc_tools.protoc over every .proto under protos/ and install the result as OUT_DIR."""
    from grpc_tools import protoc  # dev-only dependency: the serving image ships prebuilt stubs

    protos = proto_files()
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}")
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    OUT_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="_proto.", dir=OUT_DIR.parent))
    try:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for py in tmp.rglob("*.py"):
            text = py.read_text()
            py.write_text(_IMPORT_RE.sub(rf"from {PACKAGE}.\1 import \2", text))
        for directory in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
            (directory / "__init__.py").touch()
        old = None
        if OUT_DIR.exists():
            old = OUT_DIR.with_name(f"{OUT_DIR.name}.old.{tmp.name}")
            OUT_DIR.rename(old)
        tmp.rename(OUT_DIR)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return OUT_DIR


def main() -> int:
    out = generate()
    print(f"generated gRPC stubs for {len(proto_files())} proto file(s) into {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

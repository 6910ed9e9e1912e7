"""deploy/k8s (base and every overlay, rendered) and deploy/kserve, validated offline against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors) and, for the KServe
InferenceService, against KServe's own CRD schema; then what the manifests must mean for this
server: probes on its health service, the GPU request, draining time, secrets, non-root."""

import gzip
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from serving.cli import parser
from tests.deploy_support import ROOT, dockerfile_stages, render_kustomization, yaml_documents

K8S = ROOT / "deploy/k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/tls"]
LATEST = "1.37.0"
# The oldest API each variant is checked against: the base needs preStop `sleep` (1.30); the TLS
# overlay needs the gRPC probe's `mode` (1.37).
OLDEST = {"base": "1.30.0", "overlays/cpu": "1.30.0", "overlays/tls": LATEST}
# CONTRACT §5 and §8 flags that colleagues are adding to serving/cli.py; until they land, the
# manifests may use exactly these names (each takes one value) and nothing else unknown.
CONTRACT_FLAGS_PENDING = {"--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file", "--state-secret-file"}
SERVING = dockerfile_stages()["serving"]


def rendered(name: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render_kustomization(K8S / name)}


def validate_k8s(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}") from None


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_resource_validates_against_the_kubernetes_schemas(name):
    docs = rendered(name)
    assert {kind for kind, _ in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs.values():
        for version in sorted({OLDEST[name], LATEST}):
            validate_k8s(doc, version)


def test_validation_catches_a_misspelt_field():
    deployment = rendered("base")[("Deployment", "streamcast-serving")]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(AssertionError, match="readinesProbe"):
        validate_k8s(deployment, LATEST)


def test_every_file_under_deploy_k8s_is_rendered_by_a_kustomization():
    used = set()
    for name in KUSTOMIZATIONS:
        k = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        used.add(K8S / name / "kustomization.yaml")
        used |= {(K8S / name / r).resolve() for r in k.get("resources", []) if (K8S / name / r).is_file()}
        used |= {(K8S / name / p["path"]).resolve() for p in k.get("patches", [])}
    assert set(K8S.rglob("*.yaml")) == used


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here to compare the renderer with")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(name):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    assert theirs == rendered(name)


# --- what the manifests mean for this server ----------------------------------------------------


def server_argv(container: dict) -> list[str]:
    """The server's flags in the pod: the image's ENTRYPOINT flags, then the container's args
    (which replace the image's CMD), with $(VAR) expanded from the container's literal env."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    entrypoint = SERVING.last("ENTRYPOINT").exec_form()
    assert entrypoint[:3] == ["python", "-m", "serving"] and "command" not in container
    return entrypoint[3:] + args


def parse_server_args(argv: list[str]) -> tuple[object, dict[str, str]]:
    """(the parsed flags, every flag with a value by name): flags the server does not accept yet
    must be ones the contract names (CONTRACT_FLAGS_PENDING)."""
    args, unknown = parser().parse_known_args(argv)
    pending = dict(zip(unknown[::2], unknown[1::2]))
    assert len(unknown) % 2 == 0 and set(pending) <= CONTRACT_FLAGS_PENDING, f"unknown server flags: {unknown}"
    given = {a: b for a, b in itertools.pairwise(argv) if a.startswith("--") and not b.startswith("--")}
    return args, given


def flag(argv: list[str], name: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last one wins, as with argparse


def mounted_secret_file(pod: dict, container: dict, path: str) -> str:
    """The Secret a file path in the container comes from (asserts it is one)."""
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert "secret" in volume, f"{path} is on volume {volume['name']}, not a Secret"
            return volume["secret"]["secretName"]
    raise AssertionError(f"{path} is on no mounted volume")


def check_serving_pod(pod: dict, container: dict, device: str) -> None:
    """What every variant must hold for the server: flags it accepts, probes on its health
    service and port, draining time, the state secret, non-root and a read-only root."""
    argv = server_argv(container)
    args, pending = parse_server_args(argv)
    assert args.host == "0.0.0.0" and args.device == device
    assert args.model_uri == "models:/forecaster@production"
    grpc_port = args.port
    assert {p["containerPort"] for p in container["ports"]} >= {grpc_port}

    assert container["readinessProbe"]["grpc"] == {**container["readinessProbe"]["grpc"], "port": grpc_port,
                                                   "service": "forecast.v1.Forecaster"}  # fmt: skip
    assert container["startupProbe"]["grpc"]["service"] == "forecast.v1.Forecaster"
    assert container["livenessProbe"]["grpc"]["service"] == ""
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port

    # SIGTERM comes after preStop; the server then needs up to --grace-s for unary calls.
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"] + args.grace_s
    assert pod["terminationGracePeriodSeconds"] >= drain + 10

    (state,) = [e for e in container["env"] if e["name"] == "FORECAST_STATE_SECRET"]
    assert set(state["valueFrom"]) == {"secretKeyRef"}
    assert mounted_secret_file(pod, container, pending["--auth-token-file"]) == "streamcast-auth"

    user = int(SERVING.last("USER").args)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == user
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # model downloads go there

    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert container["image"] == f"streamcast-serving:{version}"  # what `make docker` tags


def pod_and_container(deployment: dict) -> tuple[dict, dict]:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_base_runs_on_a_gpu_with_everything_the_server_needs():
    docs = rendered("base")
    pod, container = pod_and_container(docs[("Deployment", "streamcast-serving")])
    check_serving_pod(pod, container, device="cuda")
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert "cpu" in resources["requests"]  # the autoscaler's utilisation is relative to it


def test_cpu_overlay_drops_the_gpu_and_serves_on_cpu():
    docs = rendered("overlays/cpu")
    deployment = docs[("Deployment", "streamcast-serving")]
    pod, container = pod_and_container(deployment)
    check_serving_pod(pod, container, device="cpu")
    assert "nvidia.com/gpu" not in json.dumps(deployment)
    assert "tolerations" not in pod


def test_tls_overlay_serves_the_certificate_from_a_secret_and_probes_over_tls():
    pod, container = pod_and_container(rendered("overlays/tls")[("Deployment", "streamcast-serving")])
    check_serving_pod(pod, container, device="cuda")
    _, pending = parse_server_args(server_argv(container))
    assert mounted_secret_file(pod, container, pending["--tls-cert"]) == "streamcast-tls"
    assert mounted_secret_file(pod, container, pending["--tls-key"]) == "streamcast-tls"
    assert pending["--tls-cert"].endswith("/tls.crt") and pending["--tls-key"].endswith("/tls.key")  # Secret keys
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["mode"] == "TLS"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_service_autoscaler_and_budget_point_at_the_deployment(name):
    docs = rendered(name)
    deployment = docs[("Deployment", "streamcast-serving")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs[("Service", "streamcast-serving")]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = docs[("PodDisruptionBudget", "streamcast-serving")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    _, container = pod_and_container(deployment)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(port_names)
    args, _ = parse_server_args(server_argv(container))
    assert port_names == {"grpc": args.port, "metrics": args.metrics_port}
    target = docs[("HorizontalPodAutoscaler", "streamcast-serving")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "streamcast-serving")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --- KServe -------------------------------------------------------------------------------------

KSERVE = ROOT / "deploy/kserve/inferenceservice.yaml"
KSERVE_SCHEMA = ROOT / "tests/data/kserve/inferenceservice-v1beta1.schema.json.gz"


def strict(schema):
    """A CRD schema that rejects unknown fields, as `kubectl apply --validate=strict` does
    (structural CRD schemas leave additionalProperties open and the API server prunes)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def k8s_definition_validator(name: str) -> jsonschema.Validator:
    """A validator for one Kubernetes API type (e.g. io.k8s.api.core.v1.Container), strict."""
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{LATEST}-local-strict"
    definitions = json.loads((base / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def kserve_errors(doc: dict) -> list[str]:
    schema = strict(json.loads(gzip.decompress(KSERVE_SCHEMA.read_bytes())))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    meta = k8s_definition_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    errors += [f"metadata.{'.'.join(map(str, e.path))}: {e.message}" for e in meta.iter_errors(doc["metadata"])]
    # The CRD embeds KServe's copy of the core types; the containers also meet today's.
    container = k8s_definition_validator("io.k8s.api.core.v1.Container")
    for i, c in enumerate(doc["spec"]["predictor"]["containers"]):
        errors += [f"containers.{i}.{'.'.join(map(str, e.path))}: {e.message}" for e in container.iter_errors(c)]
    return errors


def test_inference_service_validates_against_the_kserve_crd_and_kubernetes_schemas():
    assert sorted(KSERVE.parent.glob("*.y*ml")) == [KSERVE]  # nothing under deploy/kserve goes unchecked
    (doc,) = yaml_documents(KSERVE)
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert kserve_errors(doc) == []


def test_kserve_validation_catches_a_misspelt_field():
    (doc,) = yaml_documents(KSERVE)
    doc["spec"]["predictor"]["minReplica"] = 1
    doc["spec"]["predictor"]["containers"][0]["imagePullPolicy"] = 3
    errors = kserve_errors(doc)
    assert any("minReplica'" in e for e in errors) and any("imagePullPolicy" in e for e in errors), errors


def test_inference_service_runs_the_same_image_as_the_deployment():
    (doc,) = yaml_documents(KSERVE)
    predictor = doc["spec"]["predictor"]
    (container,) = predictor["containers"]
    check_serving_pod(predictor, container, device="cuda")
    assert [p["name"] for p in container["ports"]] == ["h2c"]  # KServe's name for a gRPC port
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    args, _ = parse_server_args(server_argv(container))
    assert doc["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
    _, deployment_container = pod_and_container(rendered("base")[("Deployment", "streamcast-serving")])
    assert container["image"] == deployment_container["image"]
    assert container["resources"] == deployment_container["resources"]

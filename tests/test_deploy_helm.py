"""The Helm chart: rendered offline by Helm's own engine for every values file in ci/, each
object validated (core kinds by kubernetes-validate --strict, the CRDs by our schemas), and the
rules that keep users' requests alive checked on what is rendered."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_chart import (
    CHART,
    DASHBOARD,
    VALUES_FILES,
    by_kind,
    one,
    render,
    render_file,
    render_raw,
    values,
)

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = Path(__file__).parent / "deploy_schemas"
CRD_SCHEMAS = {"ScaledObject": "scaledobject", "ServiceMonitor": "servicemonitor",
               "PrometheusRule": "prometheusrule"}
# the chart's minimum (Chart.yaml kubeVersion) and a current release
MIN_KUBERNETES = re.search(r'kubeVersion: ">=(\d+\.\d+\.\d+)',
                           (CHART / "Chart.yaml").read_text()).group(1)
KUBERNETES_VERSIONS = (MIN_KUBERNETES, "1.33.0")

ids = [p.name.removesuffix("-values.yaml") for p in VALUES_FILES]


def test_every_profile_has_a_values_file():
    assert set(ids) >= {"cpu", "gpu", "keda", "hpa", "scale-to-zero"}


@pytest.mark.parametrize("kube", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_helm_lint_strict(path, kube):
    report = helm_python.lint(CHART, values(path), strict=True, kube_version=f"v{kube}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    from referencing import Registry, Resource

    def load(name):
        return Resource.from_contents(json.loads((SCHEMAS / f"{name}.json").read_text()))

    schema = json.loads((SCHEMAS / f"{CRD_SCHEMAS[kind]}.json").read_text())
    registry = Registry().with_resources([("common", load("_common"))])
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("kube", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_every_object_validates(path, kube):
    """Core kinds against Kubernetes' OpenAPI schemas with unknown fields refused; the custom
    resources, which kubernetes-validate skips (it has no schema for them), against ours."""
    for obj in render_file(path):
        kind = obj["kind"]
        if kind in CRD_SCHEMAS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, kube, strict=True)
            _crd_validator(kind).validate(obj)
        else:
            kubernetes_validate.validate(obj, kube, strict=True)


def test_crd_schemas_refuse_what_the_api_server_refuses():
    """The schemas are not vacuous: a number in trigger metadata (KEDA's CRD wants strings), a
    misspelt field and a bad duration fail."""
    [obj] = [o for o in render_file(CHART / "ci" / "keda-values.yaml") if o["kind"] == "ScaledObject"]
    bad = json.loads(json.dumps(obj))
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 4
    assert not _crd_validator("ScaledObject").is_valid(bad)
    bad = json.loads(json.dumps(obj))
    bad["spec"]["minReplicas"] = 1
    assert not _crd_validator("ScaledObject").is_valid(bad)
    [monitor] = [o for o in render_file(CHART / "ci" / "cpu-values.yaml")
                 if o["kind"] == "ServiceMonitor"]
    monitor = json.loads(json.dumps(monitor))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not _crd_validator("ServiceMonitor").is_valid(monitor)


# -- what the objects say ----------------------------------------------------------------------


def _container(objects, name="pagedserve"):
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    [c] = [c for c in spec["containers"] if c["name"] == name]
    return c


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_upgrades_never_lower_capacity_and_pods_drain_in_time(path):
    objects = render_file(path)
    vals = values(path)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    container = _container(objects)
    args = container["args"]
    shutdown = int(args[args.index("--shutdown-timeout") + 1])
    assert shutdown == vals.get("server", {}).get("shutdownTimeout", 30)
    [sleep, seconds] = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + shutdown
    # probes: startup and liveness on /health, readiness on /ready
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "room to load a model"
    # HA: spread over nodes and zones, a disruption budget
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"] == deployment["spec"]["selector"]
    # /dev/shm in memory, not root, read-only root file system
    shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_gpu_request_equals_limit(path):
    objects = render_file(path)
    vals = values(path)
    resources = _container(objects)["resources"]
    gpu = vals.get("gpu", {}).get("resourceName", "nvidia.com/gpu")
    if vals.get("profile") == "gpu":
        count = vals.get("gpu", {}).get("count", 1)
        assert resources["requests"][gpu] == resources["limits"][gpu] == count
        assert "--device" in _container(objects)["args"]
    else:
        assert gpu not in resources.get("requests", {}) and gpu not in resources.get("limits", {})


def test_gpu_resource_name_is_configurable():
    objects = render({"profile": "gpu", "gpu": {"resourceName": "amd.com/gpu", "count": 2}})
    resources = _container(objects)["resources"]
    assert resources["requests"]["amd.com/gpu"] == resources["limits"]["amd.com/gpu"] == 2
    assert "nvidia.com/gpu" not in resources["limits"]


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_autoscaler_owns_the_replicas(path):
    objects = render_file(path)
    auto = values(path).get("autoscaling", {})
    deployment = one(objects, "Deployment")
    scaled, hpas = by_kind(objects, "ScaledObject"), by_kind(objects, "HorizontalPodAutoscaler")
    if not auto.get("enabled"):
        assert not scaled and not hpas and deployment["spec"]["replicas"] >= 1
        return
    # helm upgrade must not reset what the autoscaler chose
    assert "replicas" not in deployment["spec"]
    if auto.get("keda", {}).get("enabled", True):
        assert len(scaled) == 1 and not hpas
        spec = scaled[0]["spec"]
        assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert spec["maxReplicaCount"] == auto["maxReplicas"]
        waiting = spec["triggers"][0]
        assert waiting["metricType"] == "AverageValue"
        assert waiting["metadata"]["threshold"] == str(auto.get("targetRequestsWaitingPerReplica", 4))
        assert "activationThreshold" in waiting["metadata"]
        if auto.get("scaleToZero", {}).get("enabled"):
            assert spec["minReplicaCount"] == 0
            assert spec["triggers"][1]["metadata"]["query"] == auto["scaleToZero"]["wakeQuery"]
        else:
            assert spec["minReplicaCount"] == auto["minReplicas"] >= 1
    else:
        assert len(hpas) == 1 and not scaled
        [metric] = hpas[0]["spec"]["metrics"]
        assert metric["pods"]["target"] == {
            "type": "AverageValue", "averageValue": str(auto.get("targetRequestsWaitingPerReplica", 4))}


def test_api_key_comes_from_a_secret():
    for vals, secret in (({"apiKey": {"existingSecret": "mine", "secretKey": "k"}}, "mine"),
                         ({"apiKey": {"value": "s3cret"}}, "pagedserve-api-key")):
        objects = render(vals)
        [env] = [e for e in _container(objects)["env"] if e["name"] == "PAGEDSERVE_API_KEY"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == secret
        assert "--api-key" not in _container(objects)["args"], "a key in args shows in ps"
        secrets = by_kind(objects, "Secret")
        assert len(secrets) == (0 if secret == "mine" else 1)
    assert not [e for e in _container(render({}))["env"] if e["name"] == "PAGEDSERVE_API_KEY"]


def test_dashboard_configmap_carries_the_dashboard_file():
    objects = render_file(CHART / "ci" / "cpu-values.yaml")
    [cm] = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["pagedserve.json"]) == json.loads(DASHBOARD.read_text())
    assert (CHART / "dashboards" / "pagedserve-dashboard.json").resolve() == DASHBOARD.resolve()


def test_service_and_monitor_reach_the_pods():
    objects = render_file(CHART / "ci" / "cpu-values.yaml")
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "http" == _container(objects)["ports"][0]["name"]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("vals, message", [
    ({"lifecycle": {"terminationGracePeriodSeconds": 40}}, "terminationGracePeriodSeconds"),
    ({"lifecycle": {"preStopSleepSeconds": 30, "terminationGracePeriodSeconds": 60}},
     "terminationGracePeriodSeconds"),
    ({"autoscaling": {"enabled": True, "scaleToZero": {"enabled": True}}}, "wakeQuery"),
    ({"autoscaling": {"enabled": True, "keda": {"enabled": False},
                      "scaleToZero": {"enabled": True, "wakeQuery": "sum(x)"}}}, "KEDA"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
    ({"profile": "tpu"}, "profile"),
], ids=["grace-below-drain", "grace-equals-drain", "zero-without-wake", "zero-with-hpa",
        "min-over-max", "profile"])
def test_values_that_cannot_work_fail_rendering(vals, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render_raw(vals)


def test_grace_period_is_computed_from_drain():
    pod = one(render({"lifecycle": {"preStopSleepSeconds": 7, "exitMarginSeconds": 3},
                      "server": {"shutdownTimeout": 90}}), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 7 + 90 + 3


# -- the commands the pods run are pagedserve's --------------------------------------------------

def _parse_cli(argv: list[str]):
    """Parse a pod's arguments with pagedserve's own parser: every flag the chart passes must be
    one that command knows (argparse would also accept a unique prefix of one)."""
    from pagedserve.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[argv[0]]
    known = set(sub._option_string_actions)
    flags = {a for a in argv if a.startswith("--")}
    assert flags <= known, f"unknown {argv[0]} flags: {flags - known}"
    return parser.parse_args(argv)


@pytest.mark.parametrize("path", VALUES_FILES, ids=ids)
def test_pod_commands_parse_with_pagedserve_cli(path):
    objects = render_file(path)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = _container(objects)
    assert container["command"] == ["pagedserve"]
    args = _parse_cli(container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert args.port == container["ports"][0]["containerPort"]
    vals = values(path)
    assert args.model == vals.get("model", {}).get("name", "smollm2:135m")
    if vals.get("profile") == "gpu":
        assert args.device == "cuda"
    for init in pod.get("initContainers", []):
        assert init["command"] == ["pagedserve"]
        pull = _parse_cli(init["args"])
        assert pull.command == "pull" and pull.name == args.model


def test_gpu_knobs_reach_the_engine_config():
    from pagedserve.cli.serve import engine_config_from_args

    objects = render({"profile": "gpu",
                      "server": {"gpuMemoryUtilization": 0.8, "enforceEager": True}})
    config = engine_config_from_args(_parse_cli(_container(objects)["args"]))
    assert (config.device, config.gpu_memory_utilization, config.enforce_eager) == (
        "cuda", 0.8, True)


def test_init_container_fills_the_store_the_server_reads(tmp_path, smollm_gguf):
    """Run the rendered init container's command here: the model lands in $PAGEDSERVE_HOME under
    the name the server container is given."""
    objects = render({"model": {"name": "smol:q4", "pull": {"source": str(smollm_gguf)}}})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    home = tmp_path / "models"
    code = ("import sys; from pagedserve.cli import main; sys.exit(main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *init["args"]], check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "PAGEDSERVE_HOME": str(home),
                        "HF_HOME": str(home / ".huggingface"), "HF_HUB_OFFLINE": "1",
                        "HOME": str(tmp_path)},
                   cwd=Path(__file__).parent.parent)
    assert env["PAGEDSERVE_HOME"] == pod["containers"][0]["env"][0]["value"]
    resolved = subprocess.run(
        [sys.executable, "-c", "from pagedserve.registry import resolve; r = resolve('smol:q4');"
         "print(r.source)"], check=True, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PAGEDSERVE_HOME": str(home), "HOME": str(tmp_path)},
        cwd=Path(__file__).parent.parent)
    assert resolved.stdout.strip() == "pagedserve"

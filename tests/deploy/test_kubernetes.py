"""deploy/kubernetes (with its monitoring/ and router/; deploy/gateway's schemas too):
every core object valid against the Kubernetes API schemas (kubernetes-validate's
bundled ones, offline), custom resources checked for their shape, and the whole
consistent with the server it runs: settings the server accepts, ports that meet, a
grace period that covers the drain, engine threads from the CPU limit, the HPA's
metric one that exists, a router that finds one model's pods. (That the probe and
scrape paths answer: test_served_as_deployed.py and test_router.py, on live servers.)"""
import math
import re
import shutil
import subprocess

import pytest
import yaml

from deploy_manifests import (GATEWAY, KUBERNETES, KUSTOMIZATIONS, MONITORING, ROUTER, container_env, container_port,
                              containers, cpu_count, flag, flag_values, kustomization, model_servers, mount, objects,
                              of_kind, pod_labels, selects, volume)
from pyforge.config import ServerConfig, unknown_env
from pyforge.ipc.segment import ENGINE_STATS
from pyforge.serving.supervisor import STOP_GRACE

kubernetes_validate = pytest.importorskip("kubernetes_validate")

# preStop's `sleep` action is beta (on by default) from 1.30: the oldest release the manifests target
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                ("inference.networking.k8s.io/v1", "InferencePool"),
                ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective")}
MODEL_LOAD_SECONDS = 300        # the startup probe gives a model at least this long to load


@pytest.fixture(scope="module")
def docs():
    return objects(KUBERNETES)


@pytest.fixture(scope="module")
def servers(docs):
    found = model_servers(docs)
    assert len(found) >= 2, "a Deployment per model: the example has two"
    return found


def server_container(deployment):
    (container,) = [c for c in containers(deployment) if c["name"] == "pyforge"]
    return container


def server_config(deployment):
    """The ServerConfig `pyforge serve` builds from the container's environment."""
    env = container_env(server_container(deployment))
    assert unknown_env(env) == [], "every LLM_* variable names a setting"
    return ServerConfig.from_sources(None, env=env)


# -- schemas ---------------------------------------------------------------------------

@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda f: f.relative_to(f.parents[1]).as_posix())
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_api_schemas(folder, version):
    checked = 0
    for doc in objects(folder):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)     # raises on a wrong or unknown field
        checked += 1
    assert checked or folder == MONITORING


def test_a_wrong_field_is_caught_by_the_validator(servers):
    """The validation above can fail: a misspelt probe field is refused."""
    broken = yaml.safe_load(yaml.safe_dump(servers[0]))
    server_container(broken)["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda f: f.relative_to(f.parents[1]).as_posix())
def test_every_manifest_file_is_in_its_kustomization(folder):
    listed = set(kustomization(folder)["resources"])
    on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert listed == on_disk


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda f: f.relative_to(f.parents[1]).as_posix())
def test_kustomize_renders_what_the_tests_read(folder):
    rendered = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    names = lambda docs: sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    kustomized = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert names(kustomized) == names(objects(folder))
    images = lambda docs: sorted(c["image"] for d in docs for c in containers(d))
    assert images(kustomized) == images(objects(folder))


# -- the model servers -------------------------------------------------------------------

def test_each_model_has_its_own_labels_service_and_autoscaler(docs, servers):
    models = [pod_labels(d)["pyforge.dev/model"] for d in servers]
    assert len(set(models)) == len(models)
    for deployment in servers:
        assert deployment["spec"]["selector"]["matchLabels"] == pod_labels(deployment)
        assert server_config(deployment).served_model_name == pod_labels(deployment)["pyforge.dev/model"]
        chosen = [s for s in of_kind(docs, "Service") if selects(s["spec"]["selector"], pod_labels(deployment))]
        assert [s["metadata"]["name"] for s in chosen] == [deployment["metadata"]["name"]]
        other_pods = [pod_labels(d) for d in servers if d is not deployment]
        assert not any(selects(chosen[0]["spec"]["selector"], labels) for labels in other_pods)
        (hpa,) = [h for h in of_kind(docs, "HorizontalPodAutoscaler")
                  if h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_container_runs_pyforge_serve_with_settings_it_accepts(servers):
    for deployment in servers:
        container = server_container(deployment)
        assert container["command"] == ["pyforge", "serve"] and "args" not in container
        config = server_config(deployment)       # raises on a value the server would refuse
        assert config.model and config.host == "0.0.0.0"


def test_ports_meet(docs, servers):
    for deployment in servers:
        container, config = server_container(deployment), server_config(deployment)
        assert container_port(container, "http") == config.port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container_port(container, container[probe]["httpGet"]["port"]) == config.port
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == config.port
        (service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == deployment["metadata"]["name"]]
        (port,) = service["spec"]["ports"]
        assert port["name"] == "http" and container_port(container, port["targetPort"]) == config.port


def test_probes_are_the_health_routes_and_the_startup_probe_waits_for_the_model(servers):
    for deployment in servers:
        container = server_container(deployment)
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/health/live"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= MODEL_LOAD_SECONDS
        assert "initialDelaySeconds" not in container["livenessProbe"]      # the startup probe gates it


def test_the_grace_period_covers_pre_stop_and_the_drain(servers):
    for deployment in servers:
        pod, container = deployment["spec"]["template"]["spec"], server_container(deployment)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = server_config(deployment).drain_timeout
        assert pre_stop > 0
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + STOP_GRACE
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_engine_threads_follow_the_cpu_limit(servers):
    for deployment in servers:
        container = server_container(deployment)
        resources = container["resources"]
        limit = cpu_count(resources["limits"]["cpu"])
        assert limit == int(limit), "whole CPUs: threads are whole, and the static CPU manager pins only those"
        assert resources["requests"] == resources["limits"], "Guaranteed QoS"
        (threads,) = [v for v in container["env"] if v["name"] == "LLM_THREADS"]
        assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
        assert server_config(deployment).threads == limit


def test_the_hugging_face_cache_is_a_read_only_volume_and_offline(docs, servers):
    claims = {c["metadata"]["name"] for c in of_kind(docs, "PersistentVolumeClaim")}
    for deployment in servers:
        container = server_container(deployment)
        env = container_env(container)
        assert env["HF_HUB_OFFLINE"] == "1"
        cache = mount(container, env["HF_HOME"])
        assert cache is not None and cache["readOnly"] is True
        claim = volume(deployment, cache["name"])["persistentVolumeClaim"]
        assert claim["claimName"] in claims and claim["readOnly"] is True


def test_shared_memory_is_a_memory_volume(servers):
    """The engine <-> worker segment lives in /dev/shm (its size is checked against the
    live server in test_served_as_deployed.py)."""
    for deployment in servers:
        shm = mount(server_container(deployment), "/dev/shm")
        assert shm is not None
        assert volume(deployment, shm["name"])["emptyDir"]["medium"] == "Memory"


# -- monitoring and autoscaling ----------------------------------------------------------

def exported(name):
    """The Stat exported as pyforge:<name>, or None."""
    return next((s for s in ENGINE_STATS if s.exported_name == name), None)


def test_the_service_monitor_scrapes_every_model_service(docs):
    (monitor,) = objects(MONITORING)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = of_kind(docs, "Service")
    assert services and all(selects(selector, s["metadata"]["labels"]) for s in services)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert all(endpoint["port"] in [p["name"] for p in s["spec"]["ports"]] for s in services)
    for deployment in model_servers(docs):
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == endpoint["path"]


def test_the_autoscaler_metric_is_the_engine_queue_renamed_by_the_adapter(docs):
    adapter = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    series = re.match(r"[\w:]+", rule["seriesQuery"]).group(0)
    assert series.startswith("pyforge:")
    stat = exported(series[len("pyforge:"):])
    assert stat is not None and stat.kind == "gauge" and stat.name == "num_requests_waiting"
    # the adapter's rename (Go regexp ${1} -> Python \1)
    served = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == served
        assert metric["pods"]["target"]["type"] == "AverageValue"


# -- the router ---------------------------------------------------------------------------

def test_the_router_discovers_one_models_pods_on_their_port(docs):
    router = objects(ROUTER)
    (deployment,) = of_kind(router, "Deployment")
    (container,) = containers(deployment)
    args = container["args"]
    assert container["command"] == ["python", "-m", "sglang_router.launch_router"]
    assert "--service-discovery" in args and flag(args, "policy") == "cache_aware"
    selector = dict(item.split("=", 1) for item in flag_values(args, "selector"))
    (server,) = [d for d in model_servers(docs) if selects(selector, pod_labels(d))]
    pyforge = server_container(server)
    assert int(flag(args, "service-discovery-port")) == container_port(pyforge, "http")
    assert flag(args, "health-check-endpoint") == pyforge["readinessProbe"]["httpGet"]["path"]
    (service,) = of_kind(router, "Service")
    assert all(container_port(container, p["targetPort"]) == int(flag(args, "port")) for p in service["spec"]["ports"])
    (binding,) = of_kind(router, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": deployment["spec"]["template"]["spec"]["serviceAccountName"]}]
    (role,) = of_kind(router, "Role")
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in role["rules"])


def test_gateway_monitoring_and_router_folders_hold_only_their_own_objects():
    core = {(d["kind"], d["metadata"]["name"]) for d in objects(KUBERNETES)}
    for folder in (MONITORING, ROUTER, GATEWAY):
        assert not core & {(d["kind"], d["metadata"]["name"]) for d in objects(folder)}


def test_manifest_helpers_read_quantities_and_flags():
    assert cpu_count("500m") == 0.5 and cpu_count(4) == 4.0
    assert math.ceil(cpu_count("1500m")) == 2
    assert flag_values(["--a", "x=1", "y=2", "--b=3"], "a") == ["x=1", "y=2"] and flag(["--b=3"], "b") == "3"

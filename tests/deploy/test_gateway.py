"""deploy/gateway: the InferencePool and InferenceObjective (custom resources, so
checked for their shape here: kubernetes-validate has no schema for them) point at
the model servers of deploy/kubernetes and at the endpoint picker, and the EPP's
metric flags name metrics pyforge exports, of the type the EPP reads.
(Their values while requests queue: test_served_as_deployed.py.)"""
import pytest
import yaml

from deploy_manifests import (GATEWAY, KUBERNETES, container_port, containers, flag, model_servers, objects, of_kind,
                              pod_labels, selects)
from pyforge.ipc.segment import ENGINE_STATS

POOL_GROUP = "inference.networking.k8s.io"
# the EPP's metric flags -> (the vLLM metric it reads by default, the pyforge stat that means the same)
EPP_METRICS = {
    "total-queued-requests-metric": ("vllm:num_requests_waiting", "num_requests_waiting"),
    "total-running-requests-metric": ("vllm:num_requests_running", "num_requests_running"),
    "kv-cache-usage-percentage-metric": ("vllm:kv_cache_usage_perc", "kv_cache_usage_perc"),
}


@pytest.fixture(scope="module")
def gateway():
    return objects(GATEWAY)


@pytest.fixture(scope="module")
def pool(gateway):
    (pool,) = [d for d in gateway if d["kind"] == "InferencePool"]
    assert pool["apiVersion"] == f"{POOL_GROUP}/v1"
    return pool


@pytest.fixture(scope="module")
def epp(gateway):
    (deployment,) = of_kind(gateway, "Deployment")
    (container,) = containers(deployment)
    return deployment, container


def test_the_pool_selects_one_model_on_its_serving_port(pool):
    spec = pool["spec"]
    assert set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
    selector = spec["selector"]["matchLabels"]
    selected = [d for d in model_servers(objects(KUBERNETES)) if selects(selector, pod_labels(d))]
    assert len(selected) == 1, "a pool serves one model"
    (server,) = [c for c in containers(selected[0]) if c["name"] == "pyforge"]
    assert [p["number"] for p in spec["targetPorts"]] == [container_port(server, "http")]


def test_the_pool_names_the_endpoint_picker_service(gateway, pool, epp):
    ref = pool["spec"]["endpointPickerRef"]
    assert set(ref) <= {"name", "kind", "group", "port", "failureMode"}
    assert ref.get("kind", "Service") == "Service" and ref["failureMode"] in ("FailOpen", "FailClose")
    (service,) = [s for s in of_kind(gateway, "Service") if s["metadata"]["name"] == ref["name"]]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    deployment, container = epp
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    assert container_port(container, port["targetPort"]) == int(flag(container["args"], "grpc-port"))


def test_the_objective_refers_to_the_pool(gateway, pool):
    (objective,) = [d for d in gateway if d["kind"] == "InferenceObjective"]
    assert objective["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
    assert set(objective["spec"]) <= {"priority", "poolRef"}
    assert isinstance(objective["spec"]["priority"], int)
    assert objective["spec"]["poolRef"] == {"group": POOL_GROUP, "name": pool["metadata"]["name"]}


def test_the_epp_reads_pyforge_metrics_of_the_types_it_expects(epp, pool):
    deployment, container = epp
    args = container["args"]
    assert flag(args, "pool-name") == pool["metadata"]["name"]
    assert flag(args, "model-server-metrics-path") == "/metrics"
    stats = {f"pyforge:{s.exported_name}": s for s in ENGINE_STATS}
    for name, (vllm_name, stat_name) in EPP_METRICS.items():
        ours = flag(args, name)
        assert ours in stats, f"--{name}={ours} is not a metric pyforge exports"
        assert stats[ours].name == stat_name and stats[ours].kind == "gauge"
        assert vllm_name.split(":", 1)[1] == stat_name     # vLLM's name behind our prefix (STYLE.md 12)
    assert flag(args, "lora-info-metric") == "" and flag(args, "cache-info-metric") == ""


def test_the_epp_config_refers_only_to_plugins_it_declares(gateway, epp):
    deployment, container = epp
    (config_map,) = of_kind(gateway, "ConfigMap")
    path = flag(container["args"], "config-file")
    mounted = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mounted["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    config = yaml.safe_load(config_map["data"][path[len(mounted["mountPath"]) + 1:]])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= declared


def test_the_epp_may_watch_what_it_needs(gateway, epp):
    deployment, _ = epp
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    (binding,) = of_kind(gateway, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    (role,) = [r for r in of_kind(gateway, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"]]
    granted = {(group, resource) for rule in role["rules"] if {"get", "list", "watch"} <= set(rule["verbs"])
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {("", "pods"), (POOL_GROUP, "inferencepools"),
            ("inference.networking.x-k8s.io", "inferenceobjectives")} <= granted

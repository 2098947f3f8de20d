"""The manifests under deploy/ as the tests read them: each kustomization's objects
(its `resources`, in order, with its `images` applied), and small lookups over them.

Only what deploy/ uses of kustomize is applied (plain resource files and image
names); `kustomization()` refuses anything else, so a new kustomize feature in
deploy/ fails here instead of being read wrong."""
import math
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MONITORING = KUBERNETES / "monitoring"
ROUTER = KUBERNETES / "router"
GATEWAY = DEPLOY / "gateway"
KUSTOMIZATIONS = (KUBERNETES, MONITORING, ROUTER, GATEWAY)
_KNOWN_KEYS = {"apiVersion", "kind", "resources", "images"}


def kustomization(folder):
    """The kustomization.yaml of `folder`, checked to use only what this module applies."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
    unknown = set(spec) - _KNOWN_KEYS
    assert not unknown, f"{folder}: kustomization keys this reader does not apply: {sorted(unknown)}"
    return spec


def objects(folder):
    """Every object the kustomization in `folder` renders."""
    spec = kustomization(folder)
    images = {i["name"]: i for i in spec.get("images", ())}
    out = []
    for name in spec["resources"]:
        for doc in yaml.safe_load_all((folder / name).read_text()):
            if doc is not None:
                out.append(_with_images(doc, images))
    return out


def _with_images(doc, images):
    for container in containers(doc):
        image = images.get(container["image"])
        if image is not None:
            container["image"] = f"{image.get('newName', container['image'])}:{image['newTag']}"
    return doc


def containers(doc):
    template = doc.get("spec", {}).get("template", {})
    return template.get("spec", {}).get("containers", []) if doc.get("kind") == "Deployment" else []


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def model_servers(docs):
    """The pyforge Deployments (component model-server)."""
    return [d for d in of_kind(docs, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "model-server"]


def selects(selector, labels):
    """A matchLabels-style selector ({k: v}) against a label set."""
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"]["labels"]


def container_port(container, name_or_number):
    """The container port number a probe or Service names (by name or number)."""
    for port in container.get("ports", ()):
        if name_or_number in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    raise AssertionError(f"container {container['name']} has no port {name_or_number!r}")


def cpu_count(quantity):
    """A CPU quantity ("4", "500m", 2) in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_env(container):
    """The container's environment as the pod sees it: plain values, and the
    resourceFieldRef values the kubelet fills in (limits.cpu with divisor 1 is the
    limit rounded up to whole CPUs)."""
    env = {}
    for var in container.get("env", ()):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"].get("resourceFieldRef")
        assert ref is not None, f"{var['name']}: only plain values and resourceFieldRef are read here"
        assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1", ref
        env[var["name"]] = str(math.ceil(cpu_count(container["resources"]["limits"]["cpu"])))
    return env


def volume(deployment, name):
    return next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def mount(container, path):
    return next((m for m in container.get("volumeMounts", ()) if m["mountPath"] == path), None)


def flag_values(args, name):
    """The values after `--name` up to the next flag (`--name a b --other` -> [a, b])."""
    at = args.index(f"--{name}")
    values = []
    for arg in args[at + 1:]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def flag(args, name):
    """The value of --name=value among a container's args (None if absent)."""
    for arg in args:
        m = re.fullmatch(rf"--{re.escape(name)}=(.*)", arg)
        if m:
            return m.group(1)
    return None


_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def byte_count(quantity):
    """A memory quantity ("256Mi", "1Gi", "1000") in bytes (binary suffixes only)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(quantity))
    assert m, f"unsupported quantity {quantity!r}"
    return int(m.group(1)) * _BINARY.get(m.group(2), 1)

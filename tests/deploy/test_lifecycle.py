"""The pod lifecycle, played with real processes the way the kubelet plays it.

Everything that decides the outcome is read from the manifests under k8s/: which containers
run in which order, their command/args, their environment (ConfigMaps, Secret references,
the downward API, $(VAR) expansion, the image's ENV from container/Dockerfile), the probe
paths and ports, the hooks, the volume mounts and subPaths. Only what cannot exist here is
substituted: volumes become folders under tmp_path, the S3 endpoint and keys become a real
loopback `rclone serve s3`, fixed ports become free ports, and the Jupyter notebook becomes a
small process that writes files into its view of the volume. So when a manifest drifts
(a renamed env var, a probe on the wrong port, a subPath that no longer matches the synced
folder) these tests break.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.options import OPTIONS
from sidecar.locals3 import LocalS3, free_port
from tests.support.s3client import s3_client

from .k8s import (
    Manifest,
    all_containers,
    argv,
    dockerfile_final_env,
    find,
    is_native_sidecar,
    is_sidecar_image,
    load_manifests,
    pod_spec,
    probe_port,
    resolve_env,
)

MANIFESTS = load_manifests()
# Local stand-ins for the manifests' budgets: a loopback pull of a few MiB takes seconds, so
# waiting the full startupProbe budget (an hour) or grace period (11 min) would only hide a hang.
LOCAL_STARTUP_LIMIT = 60.0
LOCAL_GRACE_LIMIT = 120.0
ADDR_OPTIONS = ("SIDECAR_CONTROL_ADDR", "SIDECAR_PROBE_ADDR")
NOTEBOOK_MARKER = "notebook-ready"

# The "notebook": writes a session's worth of files into its view of the volume, then idles;
# on SIGTERM it writes one more file (as Jupyter saves on shutdown) unless told not to.
NOTEBOOK = r"""
import os, signal, sys, time
root, marker, save_on_stop = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

def write(rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)

def stop(signum, frame):
    if save_on_stop:
        write("saved-on-shutdown.txt", b"written while the notebook shut down\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
write("analysis.ipynb", b'{"cells": [], "nbformat": 4}\n')
for i in range(12):
    write(f"data/raw/sample-{i:02d}.csv", f"id,value\n{i},{i * i}\n".encode())
write("data/r\u00e9sum\u00e9 \u65e5\u672c.txt", "non-ASCII names survive\n".encode())
with open(os.path.join(root, "notes", "existing.txt"), "ab") as f:
    f.write(b"edited in the notebook\n")
write("models/weights.bin", os.urandom(40 * 1024 * 1024 + 123))  # > multipart threshold
write(".ipynb_checkpoints/analysis-checkpoint.ipynb", b"{}\n")  # excluded by default
os.replace(os.path.join(root, "analysis.ipynb"), os.path.join(root, "final.ipynb"))
open(marker, "w").close()
while True:
    time.sleep(0.1)
"""


def _needs_daemon() -> None:
    try:
        import sidecar.daemon.service  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the daemon (`sidecar serve`) is not available yet: {exc}")


class Kubelet:
    """Runs one pod's containers as local processes, in the kubelet's order."""

    def __init__(self, manifest: Manifest, pod_name: str, tmp: Path, s3: LocalS3) -> None:
        spec = pod_spec(manifest.doc)
        assert spec is not None, f"{manifest} has no pod template"
        self.manifest = manifest
        self.spec: dict[str, Any] = spec
        self.pod_name = pod_name
        self.tmp = tmp
        self.s3 = s3
        self.volumes: dict[str, Path] = {}
        for volume in spec.get("volumes", []):
            path = tmp / "volumes" / volume["name"]
            path.mkdir(parents=True)
            self.volumes[volume["name"]] = path
        self.ports: dict[int, int] = {}  # the pod's ports (shared by its containers) -> free
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.signalled: set[str] = set()  # the kubelet sends SIGTERM once per container
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.curl = shutil.which("curl")  # None: hooks' curl calls go through urllib

    # --- what the kubelet reads from a container spec -------------------------------------

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in all_containers(self.spec) if c["name"] == name)

    def mounts(self, container: dict[str, Any]) -> list[tuple[str, Path]]:
        """(mountPath, local folder), deepest first, subPath applied."""
        found = []
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in self.volumes, f"{mount['name']} is not a pod volume"
            local = self.volumes[mount["name"]] / mount.get("subPath", "")
            local.mkdir(parents=True, exist_ok=True)  # the kubelet creates subPaths
            found.append((mount["mountPath"].rstrip("/"), local))
        return sorted(found, key=lambda pair: -len(pair[0]))

    def local_path(self, container: dict[str, Any], path: str) -> str:
        for mount_path, local in self.mounts(container):
            if path == mount_path or path.startswith(mount_path + "/"):
                return str(local) + path[len(mount_path) :]
        return path

    def view(self, container_name: str, mount_path: str) -> Path:
        return Path(self.local_path(self.container(container_name), mount_path))

    def local_port(self, port: int) -> int:
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        if is_sidecar_image(container):
            env.update({k: v for k, v in dockerfile_final_env().items() if k != "PATH"})
        env.update(resolve_env(container, MANIFESTS, self.pod_name))
        if container.get("args", [])[:1] == ["serve"]:
            for key in ADDR_OPTIONS:
                option = next(o for o in OPTIONS if o.env == key)
                _host, _, port = env.get(key, option.default).rpartition(":")
                env[key] = f"127.0.0.1:{self.local_port(int(port))}"
        if "AWS_ENDPOINT_URL" in env:
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert key in env, f"{container['name']}: AWS_ENDPOINT_URL without {key}"
            env.update(self.s3.env())
        return {k: self.local_path(container, v) for k, v in env.items()}

    def local_argv(self, container: dict[str, Any], command: list[str]) -> list[str]:
        head, *rest = command
        rest = [self.local_path(container, arg) for arg in rest]
        if head == "sidecar":
            return [sys.executable, "-m", "sidecar", *rest]
        if head in ("python", "python3"):
            return [sys.executable, *rest]
        raise AssertionError(f"{container['name']}: no local stand-in for {head!r}")

    # --- running ------------------------------------------------------------------------

    def _popen(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "SIDECAR_BACKUP": "off",  # as the whole suite (tests/conftest.py)
            **env,
        }
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                command, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp
            )

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        return f"--- {name} log ---\n" + "\n".join(text.splitlines()[-lines:])

    def all_logs(self) -> str:
        return "\n".join(self.log_tail(p.stem) for p in sorted(self.logs.glob("*.log")))

    @staticmethod
    def _wait(process: subprocess.Popen[bytes], timeout: float) -> int:
        """Exit code within timeout; a process that overstays is killed (by its handle)."""
        try:
            return process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def run_to_completion(self, container: dict[str, Any], timeout: float = 60.0) -> None:
        env = self.env(container)
        command = self.local_argv(container, argv(container, env))
        code = self._wait(self._popen(container["name"], command, env), timeout)
        assert code == 0, f"{container['name']} exited {code}\n{self.log_tail(container['name'])}"

    def start(self, container: dict[str, Any]) -> subprocess.Popen[bytes]:
        env = self.env(container)
        command = self.local_argv(container, argv(container, env))
        process = self._popen(container["name"], command, env)
        self.processes[container["name"]] = process
        return process

    def probe(self, container: dict[str, Any], kind: str) -> int:
        probe = container[kind]
        path = probe["httpGet"]["path"]
        manifest_port = probe_port(container, probe)
        assert manifest_port in self.ports, (
            f"{container['name']}: {kind} on port {manifest_port}, but nothing in the pod "
            f"listens there (listening: {sorted(self.ports)})"
        )
        url = f"http://127.0.0.1:{self.ports[manifest_port]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_started(self, container: dict[str, Any]) -> None:
        """Poll the startupProbe as the kubelet does, until success."""
        probe = container["startupProbe"]
        budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
        deadline = time.monotonic() + min(budget, LOCAL_STARTUP_LIMIT)
        process = self.processes[container["name"]]
        while time.monotonic() < deadline:
            assert process.poll() is None, (
                f"{container['name']} exited {process.returncode} before its startupProbe "
                f"passed\n{self.all_logs()}"
            )
            if 200 <= self.probe(container, "startupProbe") < 400:
                return
            time.sleep(0.1)
        raise AssertionError(f"{container['name']}: startupProbe never passed\n{self.all_logs()}")

    def exec_hook(self, container: dict[str, Any], hook: str, timeout: float) -> None:
        command = container["lifecycle"][hook]["exec"]["command"]
        env = self.env(container)
        name = f"{container['name']}-{hook}"
        if command[0] == "curl":
            code = self._curl(name, command[1:], timeout)
        else:
            process = self._popen(name, self.local_argv(container, command), env)
            code = self._wait(process, timeout)
        assert code == 0, f"{name} exited {code}\n{self.all_logs()}"

    def _curl(self, name: str, args: list[str], timeout: float) -> int:
        """Run a hook's curl against the pod's local ports (with curl, or the same request
        through urllib where curl is missing)."""
        url_pattern = re.compile(r"^(https?://)?(localhost|127\.0\.0\.1)(:(\d+))?(/.*)?$")
        local_args, url, method, fail = [], "", "GET", False
        for index, arg in enumerate(args):
            match = url_pattern.match(arg)
            if match and args[index - 1 : index] != ["-X"]:
                port = int(match.group(4) or 80)
                assert port in self.ports, f"{name}: calls port {port}, nothing listens there"
                url = f"http://127.0.0.1:{self.ports[port]}{match.group(5) or '/'}"
                arg = url
            elif args[index - 1 : index] == ["-X"]:
                method = arg
            elif arg.startswith("-") and not arg.startswith("--") and "f" in arg:
                fail = True
            local_args.append(arg)
        assert url, f"{name}: no URL in {args}"
        if self.curl:
            command = [self.curl, "--max-time", str(timeout), *local_args]
            return self._wait(self._popen(name, command, {}), timeout + 5)
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                (self.logs / f"{name}.log").write_bytes(answer.read())
                return 0
        except urllib.error.HTTPError as exc:
            (self.logs / f"{name}.log").write_bytes(exc.read())
            return 22 if fail else 0

    def start_notebook(self, container: dict[str, Any], save_on_stop: bool) -> Path:
        """Stand-in for the Jupyter image: writes files into the notebook's mount."""
        (mount,) = container["volumeMounts"]
        root = self.view(container["name"], mount["mountPath"])
        marker = self.tmp / NOTEBOOK_MARKER
        command = [sys.executable, "-c", NOTEBOOK, str(root), str(marker), str(int(save_on_stop))]
        self.processes[container["name"]] = self._popen(container["name"], command, {})
        deadline = time.monotonic() + 60
        while not marker.exists():
            process = self.processes[container["name"]]
            assert process.poll() is None, self.log_tail(container["name"])
            assert time.monotonic() < deadline, "the notebook did not finish writing"
            time.sleep(0.05)
        return root

    def sigterm(self, name: str) -> None:
        process = self.processes[name]
        if name not in self.signalled and process.poll() is None:
            self.signalled.add(name)
            process.send_signal(signal.SIGTERM)

    def terminate(self, name: str) -> int:
        """SIGTERM (once), then wait for the exit within the pod's grace period."""
        self.sigterm(name)
        process = self.processes[name]
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        try:
            return process.wait(timeout=min(grace, LOCAL_GRACE_LIMIT))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"{name} outlived the grace period\n{self.all_logs()}") from None

    def cleanup(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _pod(manifest: Manifest, pod_name: str, tmp_path: Path, s3: LocalS3) -> Kubelet:
    return Kubelet(manifest, pod_name, tmp_path / "pod", s3)


def _remote(kubelet: Kubelet, container: dict[str, Any]) -> tuple[str, str]:
    remote = kubelet.env(container)["SIDECAR_REMOTE"]
    bucket, _, prefix = remote.removeprefix("s3://").partition("/")
    return bucket, prefix


def _bucket_files(s3: LocalS3, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_client(s3.endpoint, s3.access_key, s3.secret_key)
    found: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[item["Key"][len(prefix) :]] = body
    return found


def _put(s3: LocalS3, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    s3.make_bucket(bucket)
    client = s3_client(s3.endpoint, s3.access_key, s3.secret_key)
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + rel, Body=data)


def _folder_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".ipynb_checkpoints" not in p.parts
    }


def _init_containers(kubelet: Kubelet) -> list[dict[str, Any]]:
    """Run the init sequence: regular init containers to completion, native sidecars
    started and held until their startupProbe passes. Returns the native sidecars."""
    natives = []
    for container in kubelet.spec.get("initContainers", []):
        if is_native_sidecar(container):
            kubelet.start(container)
            kubelet.wait_started(container)
            natives.append(container)
        else:
            kubelet.run_to_completion(container)
    return natives


SEED = {"notes/existing.txt": b"from an earlier session\n", "README.md": b"# my work\n"}


def test_native_sidecar_notebook_lifecycle(tmp_path: Path, s3: LocalS3) -> None:
    _needs_daemon()
    manifest = find(MANIFESTS, "StatefulSet", "netvol-notebook")
    kubelet = _pod(manifest, f"{manifest.name}-0", tmp_path, s3)
    try:
        (sidecar,) = [c for c in kubelet.spec["initContainers"] if is_native_sidecar(c)]
        bucket, prefix = _remote(kubelet, sidecar)
        assert prefix.endswith(f"{kubelet.pod_name}/"), "each pod syncs its own prefix"
        _put(s3, bucket, prefix, SEED)

        # Start: init containers in order; the native sidecar holds the rest until ready.
        natives = _init_containers(kubelet)
        assert natives == [sidecar]
        (notebook,) = kubelet.spec["containers"]
        view = kubelet.view("notebook", notebook["volumeMounts"][0]["mountPath"])
        assert _folder_files(view) == SEED, "the notebook must start on a complete folder"
        assert kubelet.probe(sidecar, "livenessProbe") == 200

        kubelet.start_notebook(notebook, save_on_stop=True)

        # Stop: the notebook first; the sidecar's SIGTERM only after the notebook exited.
        assert kubelet.terminate("notebook") == 0
        expected = _folder_files(view)
        assert "saved-on-shutdown.txt" in expected
        code = kubelet.terminate(sidecar["name"])
        assert code == 0, f"sidecar exited {code}\n{kubelet.all_logs()}"

        stored = _bucket_files(s3, bucket, prefix)
        assert sorted(stored) == sorted(expected), kubelet.all_logs()
        assert all(stored[k] == expected[k] for k in expected), "content differs"
        assert not any(".ipynb_checkpoints" in key for key in stored)
    finally:
        kubelet.cleanup()


@pytest.mark.parametrize(
    "client,sigterm_during_prestop",
    [("curl", False), ("urllib", False), ("curl", True)],
    ids=["curl", "urllib", "sigterm-during-prestop"],
)
def test_legacy_notebook_lifecycle(
    tmp_path: Path, s3: LocalS3, client: str, sigterm_during_prestop: bool
) -> None:
    """The legacy pod. Regular containers are signalled in parallel: the kubelet runs the
    notebook's preStop while the sidecar (which has none) already has its SIGTERM. The
    sequential cases check the preStop alone pushes everything; the last one sends the
    sidecar's SIGTERM while the preStop's finalize is under way, as a real kubelet would."""
    _needs_daemon()
    manifest = find(MANIFESTS, "StatefulSet", "netvol-notebook-legacy")
    kubelet = _pod(manifest, f"{manifest.name}-0", tmp_path, s3)
    if client == "urllib":
        kubelet.curl = None
    elif kubelet.curl is None:
        pytest.skip("curl is not installed: the urllib case covers the preStop")
    try:
        assert not [c for c in kubelet.spec["initContainers"] if is_native_sidecar(c)]
        sidecar, notebook = kubelet.spec["containers"]
        bucket, prefix = _remote(kubelet, sidecar)
        _put(s3, bucket, prefix, SEED)
        _init_containers(kubelet)

        # Regular containers start in list order; each postStart hook must finish before the
        # next container starts, which is what holds the notebook back here.
        kubelet.start(sidecar)
        kubelet.exec_hook(sidecar, "postStart", timeout=LOCAL_STARTUP_LIMIT)
        kubelet.wait_started(sidecar)
        view = kubelet.view("notebook", notebook["volumeMounts"][0]["mountPath"])
        assert _folder_files(view) == SEED, "the notebook must start on a complete folder"

        kubelet.start_notebook(notebook, save_on_stop=False)
        expected = _folder_files(view)

        # Stop: the notebook's preStop pushes and waits; only then is everything signalled.
        grace = kubelet.spec["terminationGracePeriodSeconds"]
        timeout = min(grace, LOCAL_GRACE_LIMIT)
        if sigterm_during_prestop:
            with ThreadPoolExecutor(1) as pool:
                hook = pool.submit(kubelet.exec_hook, notebook, "preStop", timeout)
                time.sleep(0.2)
                kubelet.sigterm(sidecar["name"])
                hook.result()
        else:
            kubelet.exec_hook(notebook, "preStop", timeout=timeout)
        stored = _bucket_files(s3, bucket, prefix)
        assert sorted(stored) == sorted(expected), kubelet.all_logs()
        assert all(stored[k] == expected[k] for k in expected), "content differs"

        kubelet.sigterm("notebook")
        code = kubelet.terminate(sidecar["name"])
        assert code == 0, f"sidecar exited {code}\n{kubelet.all_logs()}"
        assert kubelet.terminate("notebook") == 0
        assert _bucket_files(s3, bucket, prefix) == expected
    finally:
        kubelet.cleanup()


def test_read_only_inference_replica_lifecycle(tmp_path: Path, s3: LocalS3) -> None:
    _needs_daemon()
    manifest = find(MANIFESTS, "Deployment", "netvol-inference-replica")
    kubelet = _pod(manifest, f"{manifest.name}-5d9c7-x2x8q", tmp_path, s3)
    try:
        (sidecar,) = [c for c in kubelet.spec["initContainers"] if is_native_sidecar(c)]
        bucket, prefix = _remote(kubelet, sidecar)
        model = {
            "config.json": b'{"layers": 2}\n',
            "weights/part-0.safetensors": os.urandom(3 * 1024 * 1024),
            "tokenizer/vocab.txt": b"a\nb\nc\n",
        }
        _put(s3, bucket, prefix, model)
        _init_containers(kubelet)

        server = kubelet.container("server")
        model_path = next(e["value"] for e in server["env"] if e["name"] == "MODEL_PATH")
        assert _folder_files(kubelet.view("server", model_path)) == model

        # A replica never pushes: a stray local file stays out of the bucket.
        (kubelet.view("server", model_path) / "stray.txt").write_text("local only\n")
        code = kubelet.terminate(sidecar["name"])
        assert code == 0, f"sidecar exited {code}\n{kubelet.all_logs()}"
        assert _bucket_files(s3, bucket, prefix) == model
    finally:
        kubelet.cleanup()


@pytest.mark.parametrize("kind,name", [("Job", "netvol-models-pull")])
def test_model_pull_job_fills_the_shared_volume(
    tmp_path: Path, s3: LocalS3, kind: str, name: str
) -> None:
    manifest = find(MANIFESTS, kind, name)
    kubelet = _pod(manifest, f"{name}-7xk2p", tmp_path, s3)
    try:
        (pull,) = kubelet.spec["containers"]
        bucket, prefix = _remote(kubelet, pull)
        model = {
            "config.json": b'{"layers": 2}\n',
            "weights/part-0.safetensors": os.urandom(2 * 1024 * 1024),
        }
        _put(s3, bucket, prefix, model)
        for _attempt in range(2):  # the second run (the CronJob's) finds nothing to do
            _init_containers(kubelet)
            kubelet.run_to_completion(pull)
        local_dir = kubelet.env(pull)["SIDECAR_LOCAL_DIR"]
        assert _folder_files(Path(local_dir)) == model

        deployment = find(MANIFESTS, "Deployment", "netvol-inference-pvc")
        server = pod_spec(deployment.doc)["containers"][0]  # type: ignore[index]
        model_path = next(e["value"] for e in server["env"] if e["name"] == "MODEL_PATH")
        (mount,) = server["volumeMounts"]
        relative = Path(model_path).relative_to(mount["mountPath"])
        claim = kubelet.volumes["models"]
        assert _folder_files(claim / relative) == model, "inference finds it at MODEL_PATH"
    finally:
        kubelet.cleanup()


class IndexedPod(Kubelet):
    """One pod of a Job: in an Indexed Job the kubelet sets JOB_COMPLETION_INDEX in its
    containers; its PersistentVolumeClaims are the shared (RWX) volumes under `rwx`."""

    def __init__(
        self, manifest: Manifest, index: int, attempt: int, tmp: Path, s3: LocalS3, rwx: Path
    ) -> None:
        name = f"{manifest.name}-{index}-try{attempt}"
        super().__init__(manifest, name, tmp / name, s3)
        self.index = index
        for volume in self.spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                self.volumes[volume["name"]] = rwx / volume["persistentVolumeClaim"]["claimName"]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        env = super().env(container)
        if self.manifest.doc["spec"].get("completionMode") == "Indexed":
            env["JOB_COMPLETION_INDEX"] = str(self.index)
        return env

    def summaries(self) -> list[dict[str, Any]]:
        """The JSON summaries the pull logged (SIDECAR_LOG_FORMAT=json), oldest first."""
        import json

        found = []
        for line in (self.logs / "pull.log").read_text(errors="replace").splitlines():
            if line.startswith("{") and '"summary"' in line:
                found.append(json.loads(line)["summary"])
        return found

    def pulled(self) -> int:
        (summary,) = self.summaries()
        assert summary["ok"], summary
        return int(summary["files_transferred"])


def test_indexed_model_pull_matches_one_pull(tmp_path: Path, s3: LocalS3) -> None:
    """The Indexed Job's N pods (one SIGKILLed mid-run and rerun, as the Job controller
    retries an index) fill the RWX volume exactly as the single-pod Job does; a second run
    moves nothing; a changed object is fetched by exactly one pod."""
    from sidecar.core.shard import shard_of

    indexed = find(MANIFESTS, "Job", "netvol-models-pull-indexed")
    single = find(MANIFESTS, "Job", "netvol-models-pull")
    count = indexed.doc["spec"]["completions"]
    assert count == 3
    rwx = tmp_path / "claims"
    reference = tmp_path / "reference-claims"
    pods: list[IndexedPod] = []

    def pod(index: int) -> IndexedPod:
        made = IndexedPod(indexed, index, len(pods), tmp_path / "pods", s3, rwx)
        pods.append(made)
        return made

    try:
        one = IndexedPod(single, 0, 0, tmp_path / "single", s3, reference)
        pods.append(one)
        (pull,) = one.spec["containers"]
        bucket, prefix = _remote(one, pull)
        # Many small files (so a kill lands mid-run) and a few multi-MiB ones.
        model = {f"tokenizer/piece-{i:04d}.json": os.urandom(2000 + i) for i in range(600)}
        model.update({f"weights/part-{i}.safetensors": os.urandom(3 * 1024**2) for i in range(4)})
        _put(s3, bucket, prefix, model)
        ours = {rel for rel in model if shard_of(rel, count) == 1}

        # The single-pod Job's result is what the shards must add up to.
        _init_containers(one)
        one.run_to_completion(pull)
        local_dir = Path(one.env(pull)["SIDECAR_LOCAL_DIR"])
        expected = _folder_files(local_dir)
        assert expected == model
        folder = rwx / local_dir.relative_to(reference)

        # All indexes at once; index 1 is killed (node lost, OOM) once some of its files are
        # in place, then rerun on a fresh pod. Index 1 pulls one file at a time here, so the
        # kill surely lands mid-run.
        first = [pod(i) for i in range(count)]
        for p in first:
            _init_containers(p)
        victim = first[1]
        (victim_pull,) = victim.spec["containers"]
        victim_pull = {
            **victim_pull,
            "env": [*victim_pull["env"], {"name": "SIDECAR_CONCURRENCY", "value": "1"}],
        }
        process = victim.start(victim_pull)
        with ThreadPoolExecutor(count) as pool:
            others = [
                pool.submit(p.run_to_completion, p.spec["containers"][0], 120)
                for p in first
                if p is not victim
            ]
            deadline = time.monotonic() + 60
            while sum((folder / rel).exists() for rel in ours) < 5:
                assert process.poll() is None, f"index 1 ended before the kill\n{victim.all_logs()}"
                assert time.monotonic() < deadline, victim.all_logs()
                time.sleep(0.005)
            process.kill()
            process.wait()
            at_kill = sum((folder / rel).exists() for rel in ours)
            assert at_kill < len(ours), "killed mid-run"
            for future in others:
                future.result()
        for p in first:
            if p is not victim:
                # Every object of its shard, and none of another's.
                assert p.pulled() == sum(shard_of(r, count) == p.index for r in model)
        retry = pod(1)
        _init_containers(retry)
        retry.run_to_completion(retry.spec["containers"][0], 120)
        assert retry.pulled() < len(ours), "the rerun resumed instead of starting over"
        assert _folder_files(folder) == expected, "the shards add up to the single pull"
        assert not [p for p in folder.rglob("*") if p.name.startswith(".netvol-tmp.")]

        def run_all() -> dict[int, int]:
            wave = [pod(i) for i in range(count)]
            with ThreadPoolExecutor(count) as pool:
                for p in wave:
                    _init_containers(p)
                list(pool.map(lambda p: p.run_to_completion(p.spec["containers"][0], 120), wave))
            return {p.index: p.pulled() for p in wave}

        assert run_all() == dict.fromkeys(range(count), 0), "a second run moves nothing"

        changed = "weights/part-2.safetensors"
        _put(s3, bucket, prefix, {changed: b"retrained"})
        assert run_all() == {i: int(i == shard_of(changed, count)) for i in range(count)}
        assert (folder / changed).read_bytes() == b"retrained"
    finally:
        for p in pods:
            p.cleanup()

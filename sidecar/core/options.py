"""The option table: every setting a user can make, once: flag, SIDECAR_* env twin, default,
unit, check and help.

Pure: `collect()` turns flag values and an environment mapping into parsed values and
`sync_config()` / `serve_config()` into one frozen config, raising OptionError (one message
style for every bad value) before anything starts. The configs' defaults are the rows'
defaults (`default_of`); the engine, the store, the transfers and the daemon take the parts
they need from the config (ClientSettings, transfer.Settings, Limits are views of it). No
other module reads a SIDECAR_* variable (tests/unit/test_option_table.py).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sidecar.core.backup import BackupMode, parse_backup_mode, parse_duration
from sidecar.core.filters import pattern_problem
from sidecar.core.parts import MAX_PART_SIZE, MIN_PART_SIZE
from sidecar.core.paths import (
    BadKey,
    check_mount_folder,
    check_volume_name,
    normalize_prefix,
)
from sidecar.core.shard import Shard, parse_count, parse_shard, resolve_shard
from sidecar.core.units import parse_size


class OptionError(ValueError):
    pass


def default_concurrency() -> int:
    # The most requests in flight; the budget starts at 64 and grows towards this while
    # throughput grows with it (sidecar/s3/retry.py). Requests are latency-bound, not
    # CPU-bound, so not per core: small files move at budget / RTT files per second. At 80 ms
    # RTT 16 in flight pulled 2,000 small files in 11 s, 64 in 3.4 s (s5cmd: 1.5-1.9 s).
    # Memory: each request in flight holds a connection (256 KiB staging buffer, only the
    # touched pages count); large bodies are bounded by the part pool, not by this.
    return 256


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text.rstrip("s"))
    if not value >= 0:  # also refuses nan
        raise ValueError(f"must not be negative, got {text!r}")
    return value


def _addressing_style(text: str) -> str:
    style = text.strip().lower()
    if style not in ("auto", "path", "virtual"):
        raise ValueError(f"must be auto, path or virtual, got {text!r}")
    return style


def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if not 0 <= value <= 100:
        raise ValueError(f"must be between 0 and 100, got {text!r}")
    return value


def _size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise ValueError(f"must be positive, got {text!r}")
    return value


def _part_size(text: str) -> int:
    """S3 refuses a part under 5 MiB (all but the last) or over 5 GiB: a bad value would
    fail every multipart upload at its first CompleteMultipartUpload, so it fails here."""
    value = parse_size(text)
    if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
        raise ValueError(f"must be between 5MiB and 5GiB (S3's part limits), got {text!r}")
    return value


def _timeout(text: str) -> float:
    value = _seconds(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {text!r}")
    return value


def _threads(text: str) -> int | None:
    """'auto' (None: the engine sizes it for the usable cores) or a thread count."""
    if text.strip().lower() == "auto":
        return None
    return _positive_int(text)


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"must be text or json, got {text!r}")
    return value


def _log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError(f"must be debug, info, warning or error, got {text!r}")
    return value


def _ready_when(text: str) -> str:
    value = text.strip().lower()
    if value not in ("all", "priority"):
        raise ValueError(f"must be all or priority, got {text!r}")
    return value


def _size_or_zero(text: str) -> int:
    return parse_size(text)


def _rate(text: str) -> int | None:
    """One direction of --bwlimit: bytes per second ('200MiB', '200MiB/s'); 0 or off: none."""
    part = text.strip().removesuffix("/s")
    if part.lower() in ("", "0", "off"):
        return None
    value = parse_size(part)
    if value < 1:
        raise ValueError(f"must be at least 1 byte per second, got {text!r}")
    return value


def _bwlimit(text: str) -> tuple[int | None, int | None]:
    """'64MiB' (downloads and uploads, each) or 'DOWN:UP' ('200MiB:50MiB', ':50MiB')."""
    down, sep, up = text.partition(":")
    if not sep:
        return _rate(down), _rate(down)
    return _rate(down), _rate(up)


def _per_second(text: str) -> float:
    value = float(text.strip().removesuffix("/s"))
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number, got {text!r}")
    return value


def _addr(text: str) -> str:
    _host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return text


def _globs(text: str) -> list[str]:
    globs = [part.strip() for part in text.split(",") if part.strip()]
    for glob in globs:
        problem = pattern_problem(glob)
        if problem is not None:
            raise ValueError(f"{glob!r}: {problem}")
    return globs


# S3's storage classes an object can be written in and read back without a restore:
# GLACIER and DEEP_ARCHIVE objects cannot be pulled until restored, so they are refused.
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
)


def _storage_class(text: str) -> str:
    value = text.strip().upper()
    if value in ("GLACIER", "DEEP_ARCHIVE"):
        raise ValueError(f"{value} objects cannot be pulled without a restore; use GLACIER_IR")
    if value not in STORAGE_CLASSES:
        raise ValueError(f"not an S3 storage class: {text!r} (one of {', '.join(STORAGE_CLASSES)})")
    return value


def _account_id(text: str) -> str:
    value = text.strip()
    if len(value) != 12 or not value.isascii() or not value.isdigit():
        raise ValueError(f"not a 12-digit AWS account id: {text!r}")
    return value


def _sse(text: str) -> str:
    value = {"aes256": "AES256", "aws:kms": "aws:kms"}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"must be AES256 or aws:kms, got {text!r}")
    return value


def _nonempty(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


@dataclass(frozen=True)
class Option:
    flag: str  # "--local-dir"
    # As a user would write it, parsed like any given value; None, [] or False: unset.
    default: Any
    parse: Callable[[str], Any]
    help: str
    # "sync" (pull/finalize --once, history/undo/restore, serve), "serve", "client" (verbs
    # that ask the daemon), "once" (pull/finalize --once only)
    scopes: frozenset[str]
    repeatable: bool = False  # flag may be given many times; env is comma-separated
    is_switch: bool = False  # flag takes no value
    unit: str = ""  # what a number counts (bytes, seconds...), shown in --help

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "SIDECAR_" + self.dest.upper()

    def help_text(self) -> str:
        """The --help line: what it does, its default and unit, its env twin."""
        shown = self.default if isinstance(self.default, str) else None
        facts = [f"default {shown}" if shown else "", self.unit]
        extra = "; ".join(fact for fact in facts if fact)
        return f"{self.help}" + (f" ({extra})" if extra else "") + f" [env {self.env}]"


SYNC = frozenset({"sync", "serve"})
SERVE = frozenset({"serve"})
CLIENT = frozenset({"client"})
ONCE = frozenset({"once"})

OPTIONS: tuple[Option, ...] = (
    Option("--remote", None, str, "s3://BUCKET[/PREFIX] holding the volume", SYNC),
    Option("--local-dir", None, str, "the local folder (block storage) to keep in sync", SYNC),
    Option(
        "--state-dir",
        None,
        str,
        "where BASE (the last agreed state) is kept; default: $XDG_STATE_HOME/netvol-sidecar "
        "(~/.local/state/netvol-sidecar); must be outside the synced folder",
        SYNC,
    ),
    Option("--volume", None, str, "volume name, for logs and metrics (1-50 of a-zA-Z0-9_.-)", SYNC),
    Option(
        "--concurrency",
        str(default_concurrency()),
        _positive_int,
        "the most S3 requests in flight across all files (the budget starts at 64 and grows "
        "to this while throughput grows): files moved at once, the ranges and parts of one "
        "file and HEADs all draw from it; connections kept open follow it",
        SYNC,
        unit="requests",
    ),
    Option(
        "--addressing-style",
        "auto",
        _addressing_style,
        "S3 addressing: auto (path style for a custom AWS_ENDPOINT_URL and for bucket names "
        "with dots, virtual-hosted on AWS), path, or virtual",
        SYNC,
    ),
    Option(
        "--part-size",
        "16MiB",
        _part_size,
        "part size of multipart uploads and ranged downloads, 5MiB to 5GiB; doubled as needed "
        "so no object needs more than 10,000 parts",
        SYNC,
        unit="bytes",
    ),
    Option(
        "--request-timeout",
        "30",
        _timeout,
        "seconds a request may go without a byte from the server before it is retried; a "
        "request also ends by its deadline: twice this plus its bytes at 64 KiB/s",
        SYNC,
        unit="seconds",
    ),
    Option(
        "--hash-threads",
        "auto",
        _threads,
        "threads that hash files and do the sync's blocking file work; auto: the usable "
        "cores (CPU affinity and cgroup quota) + 2, at most 32",
        SYNC,
        unit="threads",
    ),
    Option(
        "--multipart-threshold",
        "32MiB",
        _size,
        "files at least this big move in parallel parts",
        SYNC,
        unit="bytes",
    ),
    Option("--include", [], _globs, "only sync paths matching this glob (repeatable)", SYNC, True),
    Option("--exclude", [], _globs, "never sync paths matching this glob (repeatable)", SYNC, True),
    Option(
        "--max-delete-percent",
        "50",
        _percent,
        "stop before deleting more than this share of the other side",
        SYNC,
        unit="percent",
    ),
    Option(
        "--force-delete",
        False,
        _bool,
        "allow deleting past --max-delete-percent",
        SYNC,
        is_switch=True,
    ),
    Option(
        "--lock-timeout",
        "300",
        _seconds,
        "seconds to wait for another sync of the same state or folder to end (0: fail at "
        "once, naming it; inf: wait as long as it takes)",
        SYNC,
        unit="seconds",
    ),
    Option(
        "--shard",
        None,
        parse_shard,
        "I/N: sync only the paths whose hash falls in shard I of N, with its own BASE "
        "(default: JOB_COMPLETION_INDEX of an Indexed Job, with --shard-count)",
        SYNC,
    ),
    Option(
        "--shard-count",
        None,
        parse_count,
        "N when the shard index comes from JOB_COMPLETION_INDEX (the Job's completions)",
        SYNC,
    ),
    Option(
        "--bwlimit",
        None,
        _bwlimit,
        "bytes per second for all transfers of this process, e.g. 200MiB (downloads and "
        "uploads each), or DOWN:UP (200MiB:50MiB; 0 or empty: no limit that way)",
        SYNC,
        unit="bytes per second",
    ),
    Option(
        "--max-requests-per-second",
        None,
        _per_second,
        "S3 requests per second for this process (listing pages, HEADs, GETs, PUTs, parts...)",
        SYNC,
        unit="requests per second",
    ),
    Option(
        "--backup",
        "auto",
        parse_backup_mode,
        "keep what a sync replaces or deletes: copy (under .netvol/backup/ in the bucket), "
        "versions (the bucket's object versions), auto (versions where the bucket is "
        "versioned, else copy) or off; pulls keep local files in the state folder",
        SYNC,
    ),
    Option(
        "--backup-retention",
        "7d",
        parse_duration,
        "how long backups and history are kept (e.g. 7d, 12h); expired ones are removed at "
        "the end of a sync",
        SYNC,
        unit="duration: 7d, 12h, 30m or seconds",
    ),
    Option(
        "--storage-class",
        None,
        _storage_class,
        "S3 storage class of the objects written (STANDARD, STANDARD_IA, INTELLIGENT_TIERING...)",
        SYNC,
    ),
    Option(
        "--requester-pays",
        False,
        _bool,
        "the requester pays for the requests and transfers (x-amz-request-payer)",
        SYNC,
        is_switch=True,
    ),
    Option(
        "--expected-bucket-owner",
        None,
        _account_id,
        "the bucket owner's 12-digit account id: requests fail (403) if another account owns it",
        SYNC,
    ),
    Option(
        "--sse",
        None,
        _sse,
        "server-side encryption of the objects written: AES256 (SSE-S3) or aws:kms (SSE-KMS)",
        SYNC,
    ),
    Option(
        "--sse-kms-key-id",
        None,
        _nonempty,
        "with --sse aws:kms: the KMS key id or ARN (default: the account's aws/s3 key)",
        SYNC,
    ),
    Option(
        "--sse-c-key-file",
        None,
        _nonempty,
        "SSE-C: file holding the 256-bit key (32 raw bytes or base64), re-read when it "
        "changes; the key is sent on every object request and never logged",
        SYNC,
    ),
    Option(
        "--no-sign-request",
        False,
        _bool,
        "public bucket: send requests unsigned, look up no credentials; pull only",
        SYNC,
        is_switch=True,
    ),
    Option(
        "--log-format",
        "text",
        _log_format,
        "text or json (one JSON object per line)",
        SYNC | CLIENT,
    ),
    Option("--log-level", "info", _log_level, "debug, info, warning or error", SYNC | CLIENT),
    Option(
        "--control-addr", "127.0.0.1:8080", _addr, "control API (pull/finalize), loopback", SERVE
    ),
    Option(
        "--probe-addr", "0.0.0.0:8081", _addr, "probes, /status and /metrics (read-only)", SERVE
    ),
    Option(
        "--shutdown-timeout",
        "300",
        _seconds,
        "time allowed for the final finalize after SIGTERM",
        SERVE,
        unit="seconds",
    ),
    Option("--auto-sync", False, _bool, "push changes after they settle", SERVE, is_switch=True),
    Option(
        "--auto-sync-debounce", "2", _seconds, "quiet before an auto push", SERVE, unit="seconds"
    ),
    Option(
        "--auto-sync-max-delay",
        "30",
        _seconds,
        "longest wait for quiet under writes",
        SERVE,
        unit="seconds",
    ),
    Option(
        "--read-only",
        False,
        _bool,
        "pull only; refuse finalize (inference replicas)",
        SERVE,
        is_switch=True,
    ),
    Option(
        "--ready-when",
        "all",
        _ready_when,
        "all: ready once the initial pull is done; priority: ready once the priority set is "
        "local (see --priority-max-size, --priority), the rest pulled in the background",
        SERVE,
    ),
    Option(
        "--priority-max-size",
        "8MiB",
        _size_or_zero,
        "with --ready-when priority: files up to this size are in the priority set",
        SERVE,
        unit="bytes",
    ),
    Option(
        "--priority",
        [],
        _globs,
        "with --ready-when priority: gitignore-style pattern of paths in the priority set "
        "whatever their size; !pattern: never, and last (repeatable; .syncpriority adds more)",
        SERVE,
        True,
    ),
    Option(
        "--summary-json",
        False,
        _bool,
        "after the summary line, print the sync's summary as one JSON object",
        ONCE,
        is_switch=True,
    ),
    Option(
        "--control-url", "http://127.0.0.1:8080", str, "where the daemon's control API is", CLIENT
    ),
)


_BY_DEST = {option.dest: option for option in OPTIONS}


def _parse_one(option: Option, raw: Any) -> Any:
    if raw is None or isinstance(raw, bool):
        return raw
    if option.repeatable:
        items = raw if isinstance(raw, list) else [raw]
        return [glob for item in items for glob in option.parse(item)]
    return option.parse(raw)


def _value(values: Mapping[str, Any], dest: str) -> Any:
    """A collected value; its row's default where the caller collected no such value."""
    if dest in values:
        return values[dest]
    option = _BY_DEST[dest]
    return _parse_one(option, option.default)


def default_of(flag: str) -> Any:
    """A row's default, parsed: the one place a default is written is its row."""
    return _value({}, flag.lstrip("-").replace("-", "_"))


_NO_LIMIT: tuple[int | None, int | None] = (None, None)


@dataclass(frozen=True)
class SyncConfig:
    """What one sync engine needs: the (remote, folder) pair and every sync option, parsed.

    --concurrency means one thing, requests in flight (the store's budget); the other counts
    are derived from it here, not set apart (see `files_in_flight`)."""

    bucket: str
    prefix: str  # normalized: '' or ends with '/'
    local_dir: Path
    state_dir: Path
    concurrency: int = default_of("--concurrency")
    part_size: int = default_of("--part-size")
    multipart_threshold: int = default_of("--multipart-threshold")
    include: tuple[str, ...] = tuple(default_of("--include"))
    exclude: tuple[str, ...] = tuple(default_of("--exclude"))
    max_delete_fraction: float = default_of("--max-delete-percent") / 100
    force_delete: bool = default_of("--force-delete")
    volume: str | None = default_of("--volume")
    lock_timeout: float = default_of("--lock-timeout")
    shard: Shard | None = None  # --shard, --shard-count and JOB_COMPLETION_INDEX
    bwlimit_down: int | None = (default_of("--bwlimit") or _NO_LIMIT)[0]  # bytes/s; None: none
    bwlimit_up: int | None = (default_of("--bwlimit") or _NO_LIMIT)[1]
    max_requests_per_second: float | None = default_of("--max-requests-per-second")
    addressing_style: str = default_of("--addressing-style")
    request_timeout: float = default_of("--request-timeout")  # seconds of silence
    hash_threads: int | None = default_of("--hash-threads")  # None: sized for the cores
    backup: BackupMode = default_of("--backup")  # noqa: RUF009 - an enum member, immutable
    backup_retention: float = default_of("--backup-retention")  # seconds
    storage_class: str | None = default_of("--storage-class")
    requester_pays: bool = default_of("--requester-pays")
    expected_bucket_owner: str | None = default_of("--expected-bucket-owner")
    sse: str | None = default_of("--sse")  # "AES256" or "aws:kms"
    sse_kms_key_id: str | None = default_of("--sse-kms-key-id")
    sse_c_key_file: Path | None = None  # --sse-c-key-file, absolute
    no_sign_request: bool = default_of("--no-sign-request")  # pull only: finalize refuses

    @property
    def remote_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def files_in_flight(self) -> int:
        """Files a sync moves at once: as many as requests in flight, as a moving file holds
        at least one request slot (more would only queue for slots; fewer would leave slots
        idle on small files, which take one request each)."""
        return self.concurrency


@dataclass(frozen=True)
class ServeConfig:
    sync: SyncConfig
    control_addr: str = default_of("--control-addr")
    probe_addr: str = default_of("--probe-addr")
    shutdown_timeout: float = default_of("--shutdown-timeout")
    auto_sync: bool = default_of("--auto-sync")
    auto_sync_debounce: float = default_of("--auto-sync-debounce")
    auto_sync_max_delay: float = default_of("--auto-sync-max-delay")
    read_only: bool = default_of("--read-only")
    ready_when: str = default_of("--ready-when")  # or "priority" (issue 13)
    priority_max_size: int = default_of("--priority-max-size")
    priority: tuple[str, ...] = tuple(default_of("--priority"))


def collect(flag_values: Mapping[str, Any], env: Mapping[str, str], scope: str) -> dict[str, Any]:
    """Flag beats env beats default. Returns parsed values keyed by Option.dest."""
    return {
        option.dest: _resolve(option, flag_values.get(option.dest), env)
        for option in OPTIONS
        if scope in option.scopes
    }


def env_value(flag: str, env: Mapping[str, str]) -> Any:
    """One option from its env twin or its default, for a program with no flags of its own
    (the Jupyter extension's control URL)."""
    return _resolve(_BY_DEST[flag.lstrip("-").replace("-", "_")], None, env)


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """SIDECAR_* variables no row reads (a typo in a manifest would otherwise be ignored
    without a word), each with the closest row's name when there is one."""
    known = {option.env.removeprefix("SIDECAR_") for option in OPTIONS}
    notes = []
    for name in sorted(env):
        suffix = name.removeprefix("SIDECAR_")
        if name.startswith("SIDECAR_") and suffix not in known:
            from difflib import get_close_matches  # a misspelt variable only

            close = get_close_matches(suffix, known, n=1, cutoff=0.75)
            hint = f" (did you mean SIDECAR_{close[0]}?)" if close else ""
            notes.append(f"{name} is not an option{hint}")
    return notes


def _resolve(option: Option, raw: Any, env: Mapping[str, str]) -> Any:
    source = option.flag
    if raw in (None, [], False) and option.env in env:
        raw, source = env[option.env], option.env
    if raw in (None, []) or (raw is False and option.is_switch):
        raw, source = option.default, "default"
    try:
        return _parse_one(option, raw)
    except ValueError as exc:
        raise OptionError(f"{option.flag} ({option.env}) from {source}: {exc}") from None


def parse_remote(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise OptionError(f"--remote (SIDECAR_REMOTE): {url!r} must look like s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise OptionError(f"--remote (SIDECAR_REMOTE): {url!r} has no bucket name")
    try:
        return bucket, normalize_prefix(prefix)
    except BadKey as exc:
        raise OptionError(f"--remote (SIDECAR_REMOTE): {exc}") from None


def default_state_root(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "/tmp")) / ".local" / "state")
    return Path(base) / "netvol-sidecar"


def _absolute(flag: str, path: str, cwd: str | None) -> Path:
    """os.path.abspath without asking the process: relative paths are taken from `cwd`."""
    if not posixpath.isabs(path):
        if cwd is None:
            option = _BY_DEST[flag.lstrip("-").replace("-", "_")]
            raise OptionError(f"{flag} ({option.env}): {path!r} must be an absolute path")
        path = posixpath.join(cwd, path)
    return Path(posixpath.normpath(path))


def sync_config(
    values: Mapping[str, Any], env: Mapping[str, str], cwd: str | None = None
) -> SyncConfig:
    """`cwd`: the working folder relative paths are taken from (the CLI's); None: paths
    must be absolute."""
    if not values.get("remote"):
        raise OptionError("--remote (SIDECAR_REMOTE) is required, e.g. s3://my-volume/")
    if not values.get("local_dir"):
        raise OptionError("--local-dir (SIDECAR_LOCAL_DIR) is required, e.g. /workspace/data")
    bucket, prefix = parse_remote(values["remote"])
    local_dir = _absolute("--local-dir", values["local_dir"], cwd)
    try:
        check_mount_folder(str(local_dir))
        if values.get("volume"):
            check_volume_name(values["volume"])
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    state_dir = _absolute(
        "--state-dir", str(values.get("state_dir") or default_state_root(env)), cwd
    )
    if state_dir == local_dir or local_dir in state_dir.parents:
        raise OptionError(
            f"--state-dir (SIDECAR_STATE_DIR) {state_dir} is inside the synced folder "
            f"{local_dir}; put it outside so the state is never synced"
        )
    try:
        shard = resolve_shard(values.get("shard"), values.get("shard_count"), env)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    _check_encryption(values)
    value = partial(_value, values)
    sse_c_key_file = value("sse_c_key_file")
    bwlimit_down, bwlimit_up = value("bwlimit") or _NO_LIMIT
    return SyncConfig(
        bucket=bucket,
        prefix=prefix,
        local_dir=local_dir,
        state_dir=state_dir,
        concurrency=value("concurrency"),
        part_size=value("part_size"),
        multipart_threshold=value("multipart_threshold"),
        include=tuple(value("include")),
        exclude=tuple(value("exclude")),
        max_delete_fraction=value("max_delete_percent") / 100,
        force_delete=bool(value("force_delete")),
        volume=value("volume"),
        lock_timeout=value("lock_timeout"),
        shard=shard,
        bwlimit_down=bwlimit_down,
        bwlimit_up=bwlimit_up,
        max_requests_per_second=value("max_requests_per_second"),
        addressing_style=value("addressing_style"),
        request_timeout=value("request_timeout"),
        hash_threads=value("hash_threads"),
        backup=value("backup"),
        backup_retention=value("backup_retention"),
        storage_class=value("storage_class"),
        requester_pays=bool(value("requester_pays")),
        expected_bucket_owner=value("expected_bucket_owner"),
        sse=value("sse"),
        sse_kms_key_id=value("sse_kms_key_id"),
        sse_c_key_file=_absolute("--sse-c-key-file", sse_c_key_file, cwd)
        if sse_c_key_file
        else None,
        no_sign_request=bool(value("no_sign_request")),
    )


def _check_encryption(values: Mapping[str, Any]) -> None:
    """The combinations S3 would refuse on every request, refused before the first one."""
    if values.get("sse_kms_key_id") and values.get("sse") != "aws:kms":
        raise OptionError(
            "--sse-kms-key-id (SIDECAR_SSE_KMS_KEY_ID) needs --sse aws:kms (SIDECAR_SSE)"
        )
    if values.get("sse") and values.get("sse_c_key_file"):
        raise OptionError(
            "--sse (SIDECAR_SSE) and --sse-c-key-file (SIDECAR_SSE_C_KEY_FILE) exclude each "
            "other: an object has one server-side encryption"
        )
    if values.get("no_sign_request") and values.get("requester_pays"):
        raise OptionError(
            "--requester-pays (SIDECAR_REQUESTER_PAYS) needs signed requests: S3 refuses it "
            "with --no-sign-request (SIDECAR_NO_SIGN_REQUEST)"
        )


def serve_config(
    values: Mapping[str, Any], env: Mapping[str, str], cwd: str | None = None
) -> ServeConfig:
    value = partial(_value, values)
    debounce = value("auto_sync_debounce")
    max_delay = value("auto_sync_max_delay")
    if max_delay < debounce:
        raise OptionError(
            f"--auto-sync-max-delay ({max_delay}s) must be at least --auto-sync-debounce "
            f"({debounce}s)"
        )
    return ServeConfig(
        sync=sync_config(values, env, cwd),
        control_addr=value("control_addr"),
        probe_addr=value("probe_addr"),
        shutdown_timeout=value("shutdown_timeout"),
        auto_sync=bool(value("auto_sync")),
        auto_sync_debounce=debounce,
        auto_sync_max_delay=max_delay,
        # Unsigned requests cannot write: a public bucket's daemon is read-only.
        read_only=bool(value("read_only")) or bool(value("no_sign_request")),
        ready_when=value("ready_when"),
        priority_max_size=value("priority_max_size"),
        priority=tuple(value("priority")),
    )

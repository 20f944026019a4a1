from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.core.options import (
    OPTIONS,
    OptionError,
    collect,
    parse_remote,
    serve_config,
    sync_config,
)


def test_every_flag_has_an_env_twin_and_help() -> None:
    for option in OPTIONS:
        assert option.env == "SIDECAR_" + option.flag[2:].replace("-", "_").upper()
        assert option.help


def test_flag_beats_env_beats_default() -> None:
    env = {"SIDECAR_CONCURRENCY": "7", "SIDECAR_PART_SIZE": "8MiB"}
    values = collect({"concurrency": "9"}, env, "sync")
    assert values["concurrency"] == 9
    assert values["part_size"] == 8 * 1024**2
    assert values["multipart_threshold"] == 32 * 1024**2


def test_bad_values_name_flag_env_and_source() -> None:
    with pytest.raises(OptionError, match=r"--concurrency \(SIDECAR_CONCURRENCY\) from SIDECAR"):
        collect({}, {"SIDECAR_CONCURRENCY": "lots"}, "sync")
    with pytest.raises(OptionError, match="--part-size"):
        collect({"part_size": "big"}, {}, "sync")
    with pytest.raises(OptionError, match="boolean"):
        collect({}, {"SIDECAR_FORCE_DELETE": "maybe"}, "sync")
    with pytest.raises(OptionError, match="HOST:PORT"):
        collect({"control_addr": "8080"}, {}, "serve")


def test_env_lists_are_comma_separated_and_flags_repeat() -> None:
    values = collect({"exclude": ["*.a", "*.b,*.c"]}, {}, "sync")
    assert values["exclude"] == ["*.a", "*.b", "*.c"]
    values = collect({}, {"SIDECAR_EXCLUDE": "x/, *.tmp"}, "sync")
    assert values["exclude"] == ["x/", "*.tmp"]


def test_remote_urls() -> None:
    assert parse_remote("s3://vol") == ("vol", "")
    assert parse_remote("s3://vol/a/b/") == ("vol", "a/b/")
    for bad in ("vol/a", "s3://", "s3://vol/../x", "https://vol"):
        with pytest.raises(OptionError, match="SIDECAR_REMOTE"):
            parse_remote(bad)


def test_sync_config_requires_remote_and_folder(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--remote"):
        sync_config(collect({}, {}, "sync"), {})
    with pytest.raises(OptionError, match="--local-dir"):
        sync_config(collect({"remote": "s3://v"}, {}, "sync"), {})


def test_state_dir_inside_folder_is_refused(tmp_path: Path) -> None:
    values = collect(
        {"remote": "s3://v", "local_dir": str(tmp_path), "state_dir": str(tmp_path / "s")},
        {},
        "sync",
    )
    with pytest.raises(OptionError, match="inside the synced folder"):
        sync_config(values, {})


def test_state_dir_defaults_outside_folder(tmp_path: Path) -> None:
    values = collect({"remote": "s3://v/p", "local_dir": str(tmp_path / "w")}, {}, "sync")
    config = sync_config(values, {"HOME": "/home/jovyan"})
    assert config.state_dir == Path("/home/jovyan/.local/state/netvol-sidecar")
    assert config.prefix == "p/" and config.bucket == "v"


def test_volume_and_folder_names_validated_as_the_platform_does(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="volume name"):
        sync_config(
            collect({"remote": "s3://v", "local_dir": "/w", "volume": "bad name"}, {}, "sync"), {}
        )
    with pytest.raises(OptionError, match="folder"):
        sync_config(collect({"remote": "s3://v", "local_dir": "/w/with space"}, {}, "sync"), {})


def test_serve_config_checks_auto_sync_windows() -> None:
    values = collect(
        {
            "remote": "s3://v",
            "local_dir": "/w",
            "auto_sync_debounce": "10",
            "auto_sync_max_delay": "5",
        },
        {},
        "serve",
    )
    with pytest.raises(OptionError, match="max-delay"):
        serve_config(values, {})


def test_globs_git_would_refuse_are_bad_options_naming_the_flag() -> None:
    with pytest.raises(OptionError, match=r"--exclude \(SIDECAR_EXCLUDE\).*not a valid pattern"):
        collect({"exclude": ["*.tmp", "\\"]}, {}, "sync")
    with pytest.raises(OptionError, match=r"--include \(SIDECAR_INCLUDE\) from SIDECAR_INCLUDE"):
        collect({}, {"SIDECAR_INCLUDE": "models/,\\"}, "sync")


def test_lock_timeout_defaults_to_five_minutes_and_takes_0_and_inf(tmp_path: Path) -> None:
    base = {"remote": "s3://b/p", "local_dir": str(tmp_path / "d")}
    values = {**collect({}, {}, "sync"), **base}
    assert sync_config(values, {}).lock_timeout == 300.0
    for text, seconds in (("0", 0.0), ("90s", 90.0), ("inf", float("inf"))):
        values = {**collect({}, {"SIDECAR_LOCK_TIMEOUT": text}, "sync"), **base}
        assert sync_config(values, {}).lock_timeout == seconds
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(OptionError, match=r"--lock-timeout \(SIDECAR_LOCK_TIMEOUT\)"):
            collect({"lock_timeout": bad}, {}, "sync")


def test_bucket_options_are_validated_up_front(tmp_path: Path) -> None:
    base = {"remote": "s3://b/", "local_dir": str(tmp_path / "d")}
    values = collect(
        {**base, "storage_class": "standard_ia", "expected_bucket_owner": "123456789012"},
        {"SIDECAR_SSE": "aws:kms", "SIDECAR_SSE_KMS_KEY_ID": "alias/k"},
        "sync",
    )
    cfg = sync_config(values, {})
    assert (cfg.storage_class, cfg.sse, cfg.sse_kms_key_id) == ("STANDARD_IA", "aws:kms", "alias/k")
    assert cfg.expected_bucket_owner == "123456789012"
    with pytest.raises(OptionError, match=r"--storage-class .*not an S3 storage class"):
        collect({"storage_class": "COLD"}, {}, "sync")
    with pytest.raises(OptionError, match="restore"):
        collect({}, {"SIDECAR_STORAGE_CLASS": "DEEP_ARCHIVE"}, "sync")
    for bad in ("12345678901", "1234567890123", "12345678901x"):
        with pytest.raises(OptionError, match=r"SIDECAR_EXPECTED_BUCKET_OWNER.*12-digit"):
            collect({"expected_bucket_owner": bad}, {}, "sync")
    with pytest.raises(OptionError, match="AES256 or aws:kms"):
        collect({"sse": "aws:kms:dsse"}, {}, "sync")
    with pytest.raises(OptionError, match=r"--sse-kms-key-id .*needs --sse aws:kms"):
        sync_config(collect({**base, "sse": "AES256", "sse_kms_key_id": "k"}, {}, "sync"), {})
    with pytest.raises(OptionError, match="exclude each other"):
        sync_config(collect({**base, "sse": "AES256", "sse_c_key_file": "/k"}, {}, "sync"), {})
    with pytest.raises(OptionError, match=r"--requester-pays .*--no-sign-request"):
        values = collect(
            {**base}, {"SIDECAR_REQUESTER_PAYS": "1", "SIDECAR_NO_SIGN_REQUEST": "1"}, "sync"
        )
        sync_config(values, {})


def test_no_sign_request_makes_the_daemon_read_only(tmp_path: Path) -> None:
    flags = {"remote": "s3://b/", "local_dir": str(tmp_path / "d"), "no_sign_request": True}
    assert serve_config(collect(flags, {}, "serve"), {}).read_only


@pytest.mark.parametrize("text", ["1MiB", "4MiB", "5242879", "6GiB"])
def test_part_size_outside_s3_limits_is_refused_naming_the_option(text: str) -> None:
    """S3 refuses parts under 5 MiB (but the last) or over 5 GiB: found at start, not at the
    first multipart upload's completion."""
    with pytest.raises(OptionError, match=r"--part-size \(SIDECAR_PART_SIZE\).*5MiB and 5GiB"):
        collect({"part_size": text}, {}, "sync")
    with pytest.raises(OptionError, match=r"--part-size .*from SIDECAR_PART_SIZE"):
        collect({}, {"SIDECAR_PART_SIZE": text}, "sync")


def test_part_size_takes_s3_limits_themselves() -> None:
    assert collect({"part_size": "5MiB"}, {}, "sync")["part_size"] == 5 * 1024**2
    assert collect({"part_size": "5GiB"}, {}, "sync")["part_size"] == 5 * 1024**3


def test_request_timeout_comes_from_the_table(tmp_path: Path) -> None:
    base = {"remote": "s3://b/", "local_dir": str(tmp_path / "d")}
    assert sync_config(collect(base, {}, "sync"), {}).request_timeout == 30.0
    values = collect(base, {"SIDECAR_REQUEST_TIMEOUT": "1"}, "sync")
    assert sync_config(values, {}).request_timeout == 1.0
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(OptionError, match=r"--request-timeout \(SIDECAR_REQUEST_TIMEOUT\)"):
            collect({}, {"SIDECAR_REQUEST_TIMEOUT": bad}, "sync")


def test_summary_json_is_a_switch_of_once_syncs() -> None:
    assert collect({}, {}, "once")["summary_json"] is False
    assert collect({}, {"SIDECAR_SUMMARY_JSON": "1"}, "once")["summary_json"] is True
    assert collect({"summary_json": True}, {}, "once")["summary_json"] is True
    with pytest.raises(OptionError, match=r"--summary-json \(SIDECAR_SUMMARY_JSON\)"):
        collect({}, {"SIDECAR_SUMMARY_JSON": "maybe"}, "once")

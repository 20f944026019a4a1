"""The daemon's whole life against SeaweedFS, the test server closest to AWS (issue 11 item 2):
`-N` ETags in listings, 206 for the ranged GETs of a large pull, 412 for conditional writes.
The other daemon tests run on rclone (its quirks) or moto; tests/integration/test_s3_servers.py
says what each server answers."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from tests.support.daemon_support import StartDaemon, http_json

MiB = 1 << 20


def test_initial_pull_edits_and_final_push_on_seaweedfs(
    seaweed_s3: Any, start_daemon: StartDaemon
) -> None:
    bucket = seaweed_s3.new_bucket()
    s3 = seaweed_s3.client()
    model = os.urandom(12 * MiB)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="models/m.bin")["UploadId"]
    parts = [
        {"PartNumber": n, "ETag": s3.upload_part(
            Bucket=bucket, Key="models/m.bin", UploadId=upload, PartNumber=n,
            Body=model[at : at + 5 * MiB],
        )["ETag"]}
        for n, at in enumerate(range(0, len(model), 5 * MiB), 1)
    ]  # fmt: skip
    s3.complete_multipart_upload(
        Bucket=bucket, Key="models/m.bin", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"v1")
    daemon = start_daemon(seaweed_s3, "--part-size", "5MiB", bucket=bucket)
    daemon.wait_ready()
    local: Path = daemon.local_dir
    assert (local / "models/m.bin").read_bytes() == model  # ranged GETs (206), verified
    again = http_json("POST", daemon.control + "/pull")[1]
    assert again["files_transferred"] == 0, again  # the `-N` ETag is known: nothing moves

    s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"theirs")  # another writer
    (local / "notes.txt").write_bytes(b"mine")
    (local / "results").mkdir()
    result = os.urandom(7 * MiB)
    (local / "results/out.bin").write_bytes(result)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()

    def body(key: str) -> bytes:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    assert body("results/out.bin") == result
    assert body("notes.txt") == b"mine"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    (kept,) = [k for k in keys if ".conflict-" in k]
    assert body(kept) == b"theirs"
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")

"""Where a bucket's requests go (issue 10): --addressing-style auto|path|virtual, dotted
bucket names path-style, and a redirect to another region explained, not a bare 301."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar.core.options import OptionError, collect, sync_config
from sidecar.s3 import ClientSettings, ObjectStore, S3Error
from sidecar.s3.endpoint import Address, resolve_address
from sidecar.s3.errors import http_error
from tests.integration.test_http11 import answer, endpoint_env, read_request, serving

__all__ = ["endpoint_env"]  # the fixture, used by name

AWS = "s3.eu-west-1.amazonaws.com"


@pytest.mark.parametrize(
    ("bucket", "endpoint", "style", "expected"),
    [
        # AWS: virtual-hosted unless the name cannot be a host label under *.s3's certificate.
        ("bkt", None, "auto", Address("https", f"bkt.{AWS}", 443, f"bkt.{AWS}", "")),
        ("my.bucket", None, "auto", Address("https", AWS, 443, AWS, "/my.bucket")),
        ("bkt", None, "path", Address("https", AWS, 443, AWS, "/bkt")),
        (
            "my.bucket",
            None,
            "virtual",
            Address("https", f"my.bucket.{AWS}", 443, f"my.bucket.{AWS}", ""),
        ),
        # Custom endpoints: path style unless asked; default ports are not in Host.
        (
            "bkt",
            "http://127.0.0.1:9000",
            "auto",
            Address("http", "127.0.0.1", 9000, "127.0.0.1:9000", "/bkt"),
        ),
        (
            "bkt",
            "https://minio.example:443",
            "auto",
            Address("https", "minio.example", 443, "minio.example", "/bkt"),
        ),
        (
            "bkt",
            "https://minio.example",
            "virtual",
            Address("https", "bkt.minio.example", 443, "bkt.minio.example", ""),
        ),
        (
            "bkt",
            "http://minio.example:9000",
            "virtual",
            Address("http", "bkt.minio.example", 9000, "bkt.minio.example:9000", ""),
        ),
    ],
)
def test_addresses(bucket: str, endpoint: str | None, style: str, expected: Address) -> None:
    assert resolve_address(bucket, endpoint, "eu-west-1", style) == expected


def test_a_bad_endpoint_is_fatal_and_named() -> None:
    with pytest.raises(S3Error, match="not an http:// or https:// URL") as caught:
        resolve_address("bkt", "ftp://x", "us-east-1", "auto")
    assert caught.value.fatal


def test_addressing_style_flag_and_env_twin(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = {"remote": "s3://bkt/p", "local_dir": str(tmp_path / "l")}
    env = {"SIDECAR_ADDRESSING_STYLE": "virtual"}
    assert sync_config({**collect({}, env, "sync"), **base}, env).addressing_style == "virtual"
    flags = collect({"addressing_style": "PATH"}, env, "sync")
    assert sync_config({**flags, **base}, env).addressing_style == "path"
    assert sync_config({**collect({}, {}, "sync"), **base}, {}).addressing_style == "auto"
    with pytest.raises(OptionError, match="SIDECAR_ADDRESSING_STYLE"):
        collect({}, {"SIDECAR_ADDRESSING_STYLE": "dns"}, "sync")


def test_a_redirect_names_the_buckets_region() -> None:
    moved = (
        b"<Error><Code>PermanentRedirect</Code><Message>The bucket you are attempting to "
        b"access must be addressed using the specified endpoint.</Message>"
        b"<Endpoint>bkt.s3.eu-west-1.amazonaws.com</Endpoint></Error>"
    )
    error = http_error("bkt", 301, moved, {"x-amz-bucket-region": "eu-west-1"})
    assert error.fatal and "set AWS_REGION=eu-west-1" in str(error)
    error = http_error("bkt", 301, moved, {})  # no region said: where it points
    assert error.fatal and "bkt.s3.eu-west-1.amazonaws.com" in str(error)
    malformed = (
        b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region 'us-east-1' is "
        b"wrong; expecting 'ap-south-1'</Message><Region>ap-south-1</Region></Error>"
    )
    assert "AWS_REGION=ap-south-1" in str(http_error("k", 400, malformed, {}))
    assert not http_error("k", 307, b"<Error><Code>TemporaryRedirect</Code></Error>").fatal


def _signed_region(head: bytes) -> str:
    """The region a scripted server's request was signed for (its credential scope)."""
    return head.split(b"Credential=", 1)[1].split(b"/")[2].decode()


def redirecting(home: str, moved: bytes, status: int = 301, extra: str = "") -> object:
    """A server for a bucket in region `home`: requests signed for another region get
    `status` with body `moved`; requests signed for `home` get an object or an empty page."""

    async def handler(reader, writer, server):
        while (head := await read_request(reader, server)) is not None:
            if _signed_region(head) != home:
                body = b"" if head.startswith(b"HEAD") else moved
                writer.write(answer(status, body, extra))
            elif b"list-type=2" in head:
                writer.write(
                    answer(200, b"<ListBucketResult><KeyCount>0</KeyCount></ListBucketResult>")
                )
            else:
                writer.write(
                    answer(
                        200, b"", 'ETag: "abc"\r\nLast-Modified: Thu, 03 Dec 2026 10:00:00 GMT\r\n'
                    )
                )
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    ("status", "body", "extra"),
    [
        # HEAD: no body, the region in the header (what AWS sends).
        (301, b"", "x-amz-bucket-region: eu-central-1\r\n"),
        # A 301 PermanentRedirect that names only the endpoint.
        (
            301,
            b"<Error><Code>PermanentRedirect</Code><Message>use the endpoint</Message>"
            b"<Endpoint>bkt.s3.eu-central-1.amazonaws.com</Endpoint><Bucket>bkt</Bucket></Error>",
            "",
        ),
        # A 307 TemporaryRedirect (a new bucket) with its regional endpoint.
        (
            307,
            b"<Error><Code>TemporaryRedirect</Code><Message>redirect</Message>"
            b"<Endpoint>bkt.s3-eu-central-1.amazonaws.com</Endpoint></Error>",
            "Location: http://bkt.s3-eu-central-1.amazonaws.com/k\r\n",
        ),
        # The signature's region refused, the right one named in the body.
        (
            400,
            b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>wrong region"
            b"</Message><Region>eu-central-1</Region></Error>",
            "",
        ),
    ],
)
async def test_a_redirect_to_the_buckets_region_is_followed_once_re_signed(
    endpoint_env: Callable[[int], None], status: int, body: bytes, extra: str
) -> None:
    """Issue 10 item 5: as the SDKs do, the request is signed again for the region the
    answer names and sent once more; every later request is signed for it at once."""
    async with serving(redirecting("eu-central-1", body, status, extra)) as (server, port):
        endpoint_env(port)
        async with ObjectStore("bkt", ClientSettings(concurrency=2)) as store:
            async for page in store.list("vol/"):
                assert page == []
            info = await store.head("k")
            assert info.etag == "abc"
        regions = [_signed_region(head) for head, _body in server.requests]
        # The listing signed for us-east-1 (moved), again for eu-central-1, then the HEAD.
        assert regions == ["us-east-1", "eu-central-1", "eu-central-1"], regions


async def test_a_head_redirected_twice_fails_by_name(
    endpoint_env: Callable[[int], None],
) -> None:
    """A HEAD answer has no body: the region comes from x-amz-bucket-region. Followed once;
    when the bucket's region redirects again, the error names the region, not retried."""

    async def handler(reader, writer, server):
        while await read_request(reader, server) is not None:
            writer.write(answer(301, b"", "x-amz-bucket-region: eu-central-1\r\n"))
            await writer.drain()

    async with serving(handler) as (server, port):
        endpoint_env(port)
        async with ObjectStore("bkt", ClientSettings(concurrency=2)) as store:
            with pytest.raises(S3Error, match="region eu-central-1") as caught:
                await store.head("k")
        assert caught.value.fatal
        regions = [_signed_region(head) for head, _body in server.requests]
        assert regions == ["us-east-1", "eu-central-1"], regions


async def test_a_redirect_that_names_no_region_is_not_followed_and_says_where(
    endpoint_env: Callable[[int], None],
) -> None:
    moved = (
        b"<Error><Code>PermanentRedirect</Code><Message>elsewhere</Message>"
        b"<Endpoint>s3.example.net</Endpoint></Error>"
    )

    async def handler(reader, writer, server):
        while await read_request(reader, server) is not None:
            writer.write(answer(301, moved))
            await writer.drain()

    async with serving(handler) as (server, port):
        endpoint_env(port)
        async with ObjectStore("bkt", ClientSettings(concurrency=2)) as store:
            with pytest.raises(
                S3Error, match=r"redirects this bucket to s3\.example\.net"
            ) as caught:
                await store.delete("k")
        assert caught.value.fatal and len(server.requests) == 1


async def test_following_a_region_on_aws_moves_to_its_regional_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a custom endpoint the redirect also moves the address (as botocore's
    endpoint re-resolution does): bkt.s3.REGION.amazonaws.com. Once per store."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    async with ObjectStore("bkt", ClientSettings(concurrency=2)) as store:
        assert store._pool is not None and store._pool.host == "bkt.s3.us-east-1.amazonaws.com"
        assert store._follow_region("eu-west-3")
        assert store._pool.host == store._host == "bkt.s3.eu-west-3.amazonaws.com"
        assert (await store._current_signer()).region == "eu-west-3"
        assert store._follow_region("eu-west-3")  # where we are: sign for it and resend
        assert not store._follow_region("ap-south-1")  # a second move: not followed

"""S3Error, the one error type of the package, and what a failure means: fatal (keys,
bucket), retryable (throttling, 5xx, timeouts, resets), a precondition that failed.

Every failure of the HTTP client is an OSError or a TimeoutError (HTTP_TRANSIENT), every
error answer an S3 error document: both are mapped here, so callers see one kind of error
naming the key.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping

from sidecar.s3.http11 import ConnectError

FATAL_CODES = {
    "InvalidAccessKeyId": "the access key is not known to the server (check AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key is wrong (check AWS_SECRET_ACCESS_KEY)",
    "AccessDenied": "access denied (check the keys' permissions on the bucket)",
    "ExpiredToken": "the credentials have expired",
    "InvalidToken": "the session token is invalid",
    "NoSuchBucket": "the bucket does not exist",
}
PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
NOT_IMPLEMENTED_CODES = {"NotImplemented", "501"}
# What is worth another try (sidecar/s3/retry.py asks S3Error.retryable): botocore's
# standard-mode lists. Throttling also shrinks the in-flight budget (S3Error.throttled); S3
# says 503 (SlowDown, or a bare 503 on a HEAD, which has no body) when it wants less.
THROTTLE_CODES = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
}
THROTTLE_STATUSES = {429, 503}
RETRY_STATUSES = {429, 500, 502, 503, 504}
RETRY_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    *THROTTLE_CODES,
}


class S3Error(Exception):
    def __init__(
        self,
        key: str,
        code: str,
        message: str,
        fatal: bool = False,
        *,
        status: int = 0,
        transient: bool = False,
    ) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.code = code
        self.message = message
        self.fatal = fatal
        self.status = status  # the HTTP status of an error answer; 0: no answer
        # The exchange broke (reset, timeout, cut body, no connection), so no answer
        # says what the server thinks: another try may go through.
        self.transient = transient
        # The answer came to a retry: an earlier attempt may have been applied by the server
        # with its answer lost (a reset), so a 412 may be our own write.
        self.retried = False
        # A redirect (or a 400 naming the region) said the bucket is in this region.
        self.region: str | None = None

    @property
    def precondition_failed(self) -> bool:
        return self.code in PRECONDITION_CODES

    @property
    def not_found(self) -> bool:
        return self.code in ("NoSuchKey", "404", "NotFound")

    @property
    def throttled(self) -> bool:
        """The server asks for fewer requests (503 SlowDown, 429, a throttling code)."""
        return self.code in THROTTLE_CODES or self.status in THROTTLE_STATUSES

    @property
    def retryable(self) -> bool:
        return self.transient or self.status in RETRY_STATUSES or self.code in RETRY_CODES


def error_from(key: str, exc: BaseException) -> S3Error:
    """The S3Error for a failure of the HTTP client (no answer, or a broken one): worth
    another try (transient), except for a certificate nobody trusts (ConnectError.permanent).
    No connection at all is fatal once the retries are spent."""
    transient = not getattr(exc, "permanent", False)
    if isinstance(exc, ConnectError):
        return S3Error(
            key,
            "Unreachable",
            f"cannot reach the S3 endpoint: {exc}",
            fatal=True,
            transient=transient,
        )
    if isinstance(exc, asyncio.TimeoutError):
        why = f" ({exc})" if str(exc) else ""
        return S3Error(key, "Timeout", f"the server did not answer in time{why}", transient=True)
    name = type(exc).__name__
    return S3Error(key, name, str(exc) or name, transient=transient)


HTTP_TRANSIENT = (OSError, asyncio.TimeoutError)  # http11 raises only these
STATUS_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NotFound",
    409: "ConditionalRequestConflict",
    412: "PreconditionFailed",
    501: "NotImplemented",
}
_XML_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
_XML_REGION = re.compile(rb"<Region>([^<]*)</Region>")
_XML_ENDPOINT = re.compile(rb"<Endpoint>([^<]*)</Endpoint>")
# The region in an AWS endpoint: bkt.s3.eu-west-1.amazonaws.com, s3-eu-west-1..., dualstack.
_ENDPOINT_REGION = re.compile(
    r"(?:^|\.)s3[.-](?:dualstack\.)?([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\."
)
REDIRECT_CODES = {"PermanentRedirect", "TemporaryRedirect"}


def http_error(
    key: str, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> S3Error:
    """An S3Error from an HTTP error answer (HEAD answers carry no body: use the status)."""
    found = _XML_CODE.search(body)
    code = found.group(1).decode() if found else STATUS_CODES.get(status, str(status))
    found = _XML_MESSAGE.search(body)
    message = found.group(1).decode(errors="replace") if found else code
    if code in FATAL_CODES:
        return S3Error(
            key, code, f"{FATAL_CODES[code]} ({code}: {message})", fatal=True, status=status
        )
    headers = headers or {}
    wrong_region = code == "AuthorizationHeaderMalformed" and _XML_REGION.search(body)
    if status in (301, 302, 307) or code in REDIRECT_CODES or wrong_region:
        error = _redirect_error(key, status, code, body, headers)
        error.region = bucket_region(body, headers)
        return error
    error = S3Error(key, code, f"{code} (HTTP {status}): {message}", status=status)
    if status == 400:  # a HEAD signed for the wrong region: no body, but the region header
        error.region = headers.get("x-amz-bucket-region") or None
    return error


def bucket_region(body: bytes, headers: Mapping[str, str]) -> str | None:
    """The bucket's region as a wrong-region answer says it, where botocore looks: the
    x-amz-bucket-region header, the error's <Region>, else the host of its <Endpoint>."""
    region = headers.get("x-amz-bucket-region")
    if region:
        return region
    if found := _XML_REGION.search(body):
        return found.group(1).decode(errors="replace").strip() or None
    if found := _XML_ENDPOINT.search(body):
        host = found.group(1).decode(errors="replace").strip().lower()
        if named := _ENDPOINT_REGION.search(host):
            return named.group(1)
    return None


def _redirect_error(
    key: str, status: int, code: str, body: bytes, headers: Mapping[str, str]
) -> S3Error:
    """S3 redirects instead of serving a bucket of another region (301 PermanentRedirect,
    or 400 AuthorizationHeaderMalformed naming the region) and, for a few minutes after a
    bucket is created, to its regional endpoint (307). Say which region, not a bare 301."""
    region = headers.get("x-amz-bucket-region")
    if not region and (found := _XML_REGION.search(body)):
        region = found.group(1).decode(errors="replace")
    if region:
        return S3Error(
            key,
            code,
            f"the bucket is in region {region}: set AWS_REGION={region} ({code}, HTTP {status})",
            fatal=True,
        )
    found = _XML_ENDPOINT.search(body)
    where = f" to {found.group(1).decode(errors='replace')}" if found else ""
    if status == 307:  # temporary (a new bucket's DNS): worth another try
        return S3Error(key, code, f"the server redirects{where} for now ({code}, HTTP 307)")
    return S3Error(
        key,
        code,
        f"the server redirects this bucket{where} ({code}, HTTP {status}): check AWS_REGION "
        "and AWS_ENDPOINT_URL",
        fatal=True,
    )

"""Everything that speaks S3, and the only package that does (tests/engine/test_s3_fence.py).

The rest of the sidecar sees the bucket through this package's public face: ObjectStore
(list, head, get, put, multipart, copy, delete), what it returns (ObjectInfo, Written), its
one error type (S3Error), its settings, and the object-metadata names. The signer
(`sigv4`), the HTTP/1.1 client (`http11`) and botocore/aiobotocore stay inside.
"""

from sidecar.s3.store import (
    META_HASH,
    META_MODE,
    META_MTIME,
    ClientSettings,
    ObjectInfo,
    ObjectStore,
    S3Error,
    Written,
    backoff,
    credentials_fingerprint,
)

__all__ = [
    "META_HASH",
    "META_MODE",
    "META_MTIME",
    "ClientSettings",
    "ObjectInfo",
    "ObjectStore",
    "S3Error",
    "Written",
    "backoff",
    "credentials_fingerprint",
]

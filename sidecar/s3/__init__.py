"""Everything that speaks S3, and the only package that does (tests/unit/test_s3_fence.py).

The rest of the sidecar sees the bucket through this package's public face: ObjectStore
(list, head, get, put, multipart, copy, delete) and Store, the Protocol of those operations
the engine is typed against, what it returns (ObjectInfo, Written), its
one error type (S3Error), its settings, and the object-metadata format (labels_for,
read_labels). Inside: the signer (sigv4), the HTTP/1.1 client (http11), endpoint and
the files credentials come from (endpoint), errors (errors), the retry policy and the
in-flight budget (retry), listing parsing (listing), the XML of the rare operations
(answers), and botocore as the credentials provider only, imported lazily by one module
(credentials).
"""

from sidecar.s3.bucket_options import BucketOptions, SseCKey
from sidecar.s3.endpoint import credentials_fingerprint
from sidecar.s3.errors import S3Error
from sidecar.s3.metadata import (
    META_HASH,
    META_MODE,
    META_MTIME,
    Labels,
    labels_for,
    read_labels,
)
from sidecar.s3.objects import ObjectInfo, ObjectVersion, Written
from sidecar.s3.protocol import Store
from sidecar.s3.store import ClientSettings, ObjectStore, connect_ahead

__all__ = [
    "META_HASH",
    "META_MODE",
    "META_MTIME",
    "BucketOptions",
    "ClientSettings",
    "Labels",
    "ObjectInfo",
    "ObjectStore",
    "ObjectVersion",
    "S3Error",
    "SseCKey",
    "Store",
    "Written",
    "connect_ahead",
    "credentials_fingerprint",
    "labels_for",
    "read_labels",
]

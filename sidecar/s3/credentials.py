"""Where the keys come from: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY as they are, else
botocore's provider chain (shared files and profiles, web identity / IRSA, ECS, instance
metadata), refreshed before it expires.

The only module of the package that imports botocore, and lazily: a sync with its keys in
the environment (the common case in a pod: a Secret as env) never pays its ~0.3 s import.
botocore's providers block (files, HTTP to the metadata services): they run in a thread,
once at start and when botocore wants to refresh, never on the hot path.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from sidecar.s3.errors import S3Error

if TYPE_CHECKING:  # the import stays lazy at run time (see above)
    from botocore.credentials import Credentials as Provided

Frozen = tuple[str, str, str | None]  # access key, secret key, session token
# botocore refreshes temporary credentials this long before they expire (its advisory
# timeout): only then is the provider called again, in a thread.
_REFRESH_BEFORE_SECONDS = 15 * 60


class Credentials:
    """The credentials of one store. `name` is what errors are about (the bucket)."""

    def __init__(self, name: str) -> None:
        self.name = name
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        # A process's environment does not change: read it once.
        self._env: Frozen | None = (
            (key, secret, os.environ.get("AWS_SESSION_TOKEN") or None) if key and secret else None
        )
        self._provided: Provided | None = None  # maybe RefreshableCredentials

    async def frozen(self) -> Frozen:
        if self._env is not None:
            return self._env
        if self._provided is None:
            self._provided = await self._from_provider_chain()
        provided = self._provided
        needs_refresh = getattr(provided, "refresh_needed", None)
        try:
            if needs_refresh is not None and needs_refresh(_REFRESH_BEFORE_SECONDS):
                frozen = await asyncio.to_thread(provided.get_frozen_credentials)
            else:
                frozen = provided.get_frozen_credentials()
        except Exception as exc:  # botocore's provider errors, whatever their class
            raise self._failed(exc) from exc
        if frozen.access_key is None or frozen.secret_key is None:
            raise self._none_found()  # botocore's types allow it; its providers never do
        return frozen.access_key, frozen.secret_key, frozen.token

    async def _from_provider_chain(self) -> Provided:
        def load() -> Provided | None:
            from botocore.session import get_session

            return get_session().get_credentials()

        try:
            provided = await asyncio.to_thread(load)
        except Exception as exc:  # a broken profile, an unreadable token file...
            raise self._failed(exc) from exc
        if provided is None:
            raise self._none_found()
        return provided

    def _none_found(self) -> S3Error:
        return S3Error(
            self.name,
            "NoCredentials",
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_SHARED_CREDENTIALS_FILE)",
            fatal=True,
        )

    def _failed(self, exc: Exception) -> S3Error:
        return S3Error(
            self.name,
            "NoCredentials",
            f"cannot get S3 credentials: {exc or type(exc).__name__}",
            fatal=True,
        )

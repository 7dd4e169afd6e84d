"""Sessions in the cache and the database, read from the cache without a thread hop.

Django's `cached_db` engine: a session is written to both, read from the cache, and
survives a cache that was emptied. Async code (every API request) reads it through
platform_site.shared_cache, on the event loop; a miss reads the database in the
request's own thread. Signing out deletes the session on the server, unlike signed
cookies, which stay valid until they expire.

A cache that does not answer is a cache that holds nothing: the database serves alone
(Django's engine lets some cache errors through, which would make every request a 500
while Redis is down).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.sessions.backends.cached_db import SessionStore as CachedDBStore
from django.core.cache import caches
from django.core.cache.backends.base import BaseCache

from platform_site import shared_cache


class SessionStore(CachedDBStore):
    _cache: Any  # Django's cache, behind _Forgiving

    def __init__(self, session_key: str | None = None) -> None:
        super().__init__(session_key)
        self._cache = _Forgiving(caches[settings.SESSION_CACHE_ALIAS])

    async def aload(self) -> dict[str, Any]:
        key = await self.acache_key()
        data = await shared_cache.aget(key, alias=settings.SESSION_CACHE_ALIAS)
        if data is not None:
            return data  # type: ignore[no-any-return]
        return await sync_to_async(self.load)()


class _Forgiving:
    """The cache calls Django's engine makes, each a miss or a no-op when the cache fails."""

    def __init__(self, cache: BaseCache) -> None:
        self.cache = cache

    def get(self, key: str, default: Any = None) -> Any:
        return self._try("get", key, default, failed=default)

    def set(self, key: str, value: Any, timeout: Any = None) -> None:
        self._try("set", key, value, timeout)

    def delete(self, key: str) -> None:
        self._try("delete", key)

    def __contains__(self, key: str) -> bool:
        return bool(self._try("has_key", key, failed=False))

    async def aget(self, key: str, default: Any = None) -> Any:
        return await shared_cache.aget(key, default, alias=settings.SESSION_CACHE_ALIAS)

    async def aset(self, key: str, value: Any, timeout: Any = None) -> None:
        await sync_to_async(self.set)(key, value, timeout)

    async def adelete(self, key: str) -> None:
        await sync_to_async(self.delete)(key)

    def _try(self, method: str, *args: Any, failed: Any = None) -> Any:
        try:
            return getattr(self.cache, method)(*args)
        except Exception as error:
            shared_cache.warn(self.cache, error)
            return failed

"""One home for the engine's Redis client set-up.

Every stream reader and writer of the engine (:class:`engine.transport.redis_streams.RedisStreams`,
and through it the doorbell transport and the event log) connects through
:func:`connect`, so timeouts, retries and connection names are the same
everywhere. It lives apart from both so that neither imports the other for it.
"""

from __future__ import annotations

import re

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: The longest a blocking stream read waits. It must end well before the socket
#: timeout, or redis-py reports a timeout for what is only a quiet stream.
MAX_BLOCK_SECONDS = 2.0
_SOCKET_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 2.0


def connect(url: str, client_name: str) -> tuple[redis.Redis, str]:
    """A Redis client set up the way every engine stream reader needs, and where it points."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=_SOCKET_TIMEOUT,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        # One quick retry replaces a pooled connection Redis closed; more
        # would stall a worker loop while Redis is down.
        retry=Retry(NoBackoff(), 1),
        # Answers in RESP2's shapes, whatever the URL asks for.
        protocol=2,
        # Names the process in CLIENT LIST; Redis allows no spaces there.
        client_name=re.sub(r"[^\w.:@-]", "_", client_name)[:200],
    )
    kwargs = client.connection_pool.connection_kwargs
    where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    return client, where

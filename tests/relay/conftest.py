"""Fixtures shared by the relay's tests."""

from .redis_server import own_redis_server, redis_server, store_url

__all__ = ["own_redis_server", "redis_server", "store_url"]

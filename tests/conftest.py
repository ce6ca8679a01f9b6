import pytest

import kvcache
# Shared helpers live in helpers.py; SHAPE and rows are also importable from here,
# where they used to be defined.
from helpers import SHAPE, rows  # noqa: F401
# The Redis fixtures (real redis-server processes), for every test file.
from redis_servers import (  # noqa: F401
    _redis_cluster_session, redis_cluster, redis_cluster_fresh, redis_server, redis_server_auth,
    redis_unix_server)


@pytest.fixture
def cache():
    c = kvcache.TieredKVCache(max_seq_len=32, **SHAPE)
    yield c
    c.close()

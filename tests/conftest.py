import pytest

import kvcache
# Shared helpers live in helpers.py; SHAPE and rows are also importable from here,
# where they used to be defined.
from helpers import SHAPE, rows  # noqa: F401


@pytest.fixture
def cache():
    c = kvcache.TieredKVCache(max_seq_len=32, **SHAPE)
    yield c
    c.close()

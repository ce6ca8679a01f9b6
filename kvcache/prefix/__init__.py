"""The prefix store: KV blocks keyed by the prompt that produced them.

:func:`prefix_hashes` computes the keys (docs/format.md, "Prefix keys");
:class:`PrefixStore` holds the records (docs/format.md, "Prefix records") in
RAM and on disk, saves them out of a cache and loads them into one.
"""
from kvcache.prefix.keys import prefix_hashes
from kvcache.prefix.store import PrefixStore

__all__ = ["prefix_hashes", "PrefixStore"]

"""Two hosts share one Redis (issue #14, item 4): a prefix one process prefilled
is reused by another, which computes only the rest of the prompt.

Two fresh interpreters (prefix_remote_worker.py), with different
PYTHONHASHSEED values and each its own RAM tier and ``disk_dir``, share only
a real redis-server (or a real 3-master Redis Cluster).  The first prefills a
prompt on test_transformers_prefix's tiny random Llama into a TieredCache
and saves its prefix; the second loads it into its own cache and generates.
The references are independent of the store: DynamicCache's greedy tokens
and KV of the whole prompt (computed by the second process itself), a
forward hook counting the positions the model was fed, the record files of
the first process's disk tier (each Redis value must be one of them, byte
for byte) and the keys computed here with ``kvcache.prefix_hashes``.
"""
import json
import os

import pytest

from helpers import run_python

pytest.importorskip("torch")
pytest.importorskip("transformers")

import kvcache  # noqa: E402
import prefix_remote_worker as w  # noqa: E402
from kvcache.integrations.transformers import model_shape  # noqa: E402
from test_transformers_prefix import B, CONFIG, MODEL, NEW, PROMPT  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prefix_remote_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kvcache.__file__)))
STORED = w.STORED
BLOCKS = STORED // B


def host(command, url, disk_dir, hash_seed):
    """Run one host (a fresh interpreter importing the kvcache under test): its JSON report."""
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p)
    out = run_python(WORKER, command, url, disk_dir, env=env, timeout=300).stdout
    return json.loads(out)


def expected_keys():
    """The Redis keys of the prompt's full blocks, from the key spec alone (docs/format.md §7)."""
    from transformers import LlamaConfig
    n_layers, n_kv_heads, head_dim = model_shape(LlamaConfig(**CONFIG))
    hashes = kvcache.prefix_hashes(w.prompt()[0, :STORED].tolist(), model=MODEL, n_layers=n_layers,
                                   n_kv_heads=n_kv_heads, head_dim=head_dim, block_tokens=B,
                                   dtype="float32")
    return [b"kvcache:v1:" + h.hex().encode() for h in hashes]


def redis_contents(server):
    """{key: value} of every key on the server, and the number of masters holding some (a
    cluster: every master read directly, not through the store's client)."""
    nodes = getattr(server, "nodes", [server])
    contents, holding = {}, 0
    for node in nodes:
        c = node.client()
        keys = c.keys("*")
        holding += bool(keys)
        contents.update((k, c.get(k)) for k in keys)
    return contents, holding


@pytest.mark.parametrize("servers", ["redis_server", "redis_cluster"])
def test_second_host_reuses_the_first_hosts_prefix(servers, request, tmp_path):
    server = request.getfixturevalue(servers)
    disk1, disk2 = tmp_path / "host1", tmp_path / "host2"

    first = host("save", server.url, disk1, hash_seed=1)
    assert first["file"].startswith(ROOT)  # the kvcache under test
    assert first["saved"] == BLOCKS
    assert first["stats"]["records_saved_remote"] == BLOCKS

    # What reached Redis: one key per block, named by the key spec, each value
    # the record the first host also wrote to its own disk tier, byte for byte.
    contents, holding = redis_contents(server)
    keys = expected_keys()
    assert sorted(contents) == sorted(keys)
    for key in keys:
        with open(disk1 / (key[len(b"kvcache:v1:"):].decode() + ".kvp"), "rb") as f:
            assert contents[key] == f.read()
    if servers == "redis_cluster":
        assert holding > 1  # the blocks are spread over the masters (no hash tag)

    second = host("load", server.url, disk2, hash_seed=2)
    assert second["hash"] != first["hash"]  # really another hash seed
    assert second["file"].startswith(ROOT)
    assert second["before"]["records_ram"] == second["before"]["records_disk"] == 0  # empty locally
    assert second["loaded"] == STORED
    # The loaded KV is what the first host's prefill computed, and DynamicCache's.
    assert second["kv"] == first["kv"] == second["dynamic_kv"]
    # The model computed only the suffix, then one position per new token...
    assert second["fed"][0] == PROMPT - STORED
    assert sum(second["fed"]) == PROMPT - STORED + NEW - 1
    assert second["reference_fed"][0] == PROMPT
    # ...and generated DynamicCache's tokens.
    assert second["tokens"] == second["reference"]
    assert len(second["tokens"]) == PROMPT + NEW
    # Every hit came from Redis: none from the second host's own (empty) tiers.
    s = second["stats"]
    assert s["hit_tokens_remote"] == STORED
    assert s["hit_tokens_ram"] == 0 and s["hit_tokens_disk"] == 0
    assert s["integrity_failures"] == 0 and s["remote_errors"] == 0
    assert s["bytes_read_remote"] == sum(len(contents[k]) for k in keys)

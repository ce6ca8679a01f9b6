"""Eviction policies: for each, an access pattern and exactly which blocks stay in RAM."""
import numpy as np
import pytest

from helpers import SHAPE, fill, rows, tiered

L = SHAPE["n_layers"]
B = 4  # block_tokens; hot_tokens=16 is 4 slots


def make(policy, **kw):
    return tiered(**{"block_tokens": B, "eviction_policy": policy, **kw})


def hot(c, layer=0):
    return c._hot_tier()._debug_hot_blocks(layer)


def read_block(c, b, layer=0):
    c.get(layer, b * B, b * B + B)


@pytest.mark.parametrize("policy", ["lru", "adaptive", "h2o"])
def test_pure_appends_send_the_oldest_block_cold(policy):
    with make(policy, recent_tokens=4) as c:
        fill(c, 40)
        assert hot(c) == [6, 7, 8, 9]


def test_lru_keeps_a_block_that_was_read():
    with make("lru") as c:
        fill(c, 16)
        read_block(c, 0)
        fill(c, 1)          # block 4 needs a slot: block 1 is now the least recent
        assert hot(c) == [0, 2, 3, 4]


def test_adaptive_keeps_the_frequently_read_block_lru_does_not():
    def pattern(c):
        fill(c, 16)                  # tick 1: blocks 0..3
        for _ in range(3):
            read_block(c, 1)          # block 1: 3 gets, but long ago
        for b in (0, 2, 3):
            read_block(c, b)          # one recent get each
        fill(c, 1)                   # block 4 needs a slot
        return hot(c)

    with make("lru") as c:
        assert pattern(c) == [0, 2, 3, 4]          # block 1 was least recent
    with make("adaptive") as c:
        assert pattern(c) == [1, 2, 3, 4]          # frequency keeps block 1; block 0 goes
    with make("adaptive", adaptive_frequency_weight=0.0) as c:
        assert pattern(c) == [0, 2, 3, 4]          # recency alone: LRU again


def test_adaptive_recency_still_counts():
    with make("adaptive", adaptive_frequency_weight=1.0, adaptive_recency_weight=1.0) as c:
        fill(c, 16)
        read_block(c, 1)              # tick 2: block 1 score 1 + 2 = 3
        for _ in range(5):
            read_block(c, 2)          # ticks 3..7: block 2 score 5 + 7 = 12
        read_block(c, 3)              # tick 8: block 3 score 1 + 8 = 9
        fill(c, 1)                   # block 0 (score 1) goes
        assert hot(c) == [1, 2, 3, 4]
        fill(c, 4)                   # block 5: block 1 (3) goes
        assert hot(c) == [2, 3, 4, 5]


@pytest.mark.parametrize("policy", ["lru", "adaptive", "h2o"])
def test_sink_blocks_stay_in_ram_under_every_policy(policy):
    with make(policy, sink_tokens=3, recent_tokens=4) as c:
        fill(c, 40)
        assert hot(c) == [0, 7, 8, 9]
        for b in range(10):
            read_block(c, b)  # reads never push the sink out either
        fill(c, 20)
        assert 0 in hot(c)
        assert c.get(0, 0, 3)[0].tobytes() == rows(40, layers=L, seed=0)[0, :3].tobytes()


def test_h2o_sends_the_lowest_attention_mass_cold_outside_the_recent_window():
    with make("h2o", recent_tokens=4) as c:
        fill(c, 16)
        mass = np.zeros(16, np.float32)
        mass[0:4] = 5.0 / 4      # block 0: 5
        mass[4:8] = 0.1 / 4      # block 1: 0.1
        mass[8:12] = 10.0 / 4    # block 2: 10
        mass[12:16] = 0.0        # block 3: 0, but in the recent window (positions 13..16)
        c.update_scores(0, mass)
        fill(c, 1)              # block 4 needs a slot
        assert hot(c) == [0, 2, 3, 4]
        fill(c, 4)              # block 5: the window covers blocks 4, 5; block 3 (0) goes
        assert hot(c) == [0, 2, 4, 5]


def test_h2o_reduces_full_attention_weights_over_heads_and_queries():
    with make("h2o", recent_tokens=4) as c:
        fill(c, 16)
        attn = np.zeros((2, 3, 16), np.float32)  # [heads, queries, positions]
        attn[1, 2, 0:4] = 1.0    # block 0: 4
        attn[0, 0, 4:8] = 0.5    # block 1: 2
        attn[:, :, 8:12] = 0.25  # block 2: 6 entries x 4 positions x 0.25 = 6
        c.update_scores(0, attn)
        fill(c, 1)
        assert hot(c) == [0, 2, 3, 4]   # block 1 has the least mass
        # another layer got no scores: all zero, the oldest goes
        assert hot(c, 1) == [1, 2, 3, 4]


def test_h2o_scores_must_fit_the_stored_positions():
    with make("h2o") as c:
        fill(c, 5)
        with pytest.raises(ValueError, match="at most 5 positions"):
            c.update_scores(0, np.ones(6, np.float32))
        with pytest.raises(TypeError, match="float32"):
            c.update_scores(0, np.ones(5))
        with pytest.raises(ValueError, match="expected shape"):
            c.update_scores(0, np.ones((5, 5), np.float32))

/* kvc_stats.h - lock-free statistics: C11 atomic counters, relaxed order.
 * Each counter is exact under concurrency (fetch_add never loses an update);
 * a snapshot of several counters is not one instant, which stats() documents. */
#ifndef KVC_STATS_H
#define KVC_STATS_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

enum kvc_stat_id {
    KVC_STAT_TOKENS_STORED = 0,  /* token rows written, summed over layers */
    KVC_STAT_BYTES_STORED,       /* key + value bytes written */
    KVC_STAT_TOKENS_READ,        /* token rows returned by get(), over layers */
    KVC_STAT_BYTES_READ,
    KVC_STAT_HOT_HITS,           /* rows of those served from RAM */
    KVC_STAT_COLD_HITS,          /* rows of those served from the cold tier */
    KVC_STAT_EVICTIONS,          /* rows moved out of RAM to the cold tier */
    KVC_STAT_EVICTION_BLOCKS,    /* blocks moved out of RAM */
    KVC_STAT_PROMOTIONS,         /* rows brought back to RAM from the cold tier */
    KVC_STAT_PROMOTION_BLOCKS,
    KVC_STAT_BYTES_TO_COLD,      /* bytes written to the cold files */
    KVC_STAT_BYTES_FROM_COLD,    /* bytes read from the cold files (copies and checks) */
    KVC_STAT_COLD_BYTES,         /* gauge: token bytes the cold files hold for stored positions */
    KVC_STAT_ROWS_HELD,          /* gauge (internal): positions stored, summed over layers */
    KVC_N_STATS
};

typedef struct kvc_stats {
    _Atomic uint64_t c[KVC_N_STATS];
} kvc_stats;

static inline kvc_stats *kvc_stats_new(void)
{
    kvc_stats *s = (kvc_stats *)calloc(1, sizeof(kvc_stats));
    if (s) for (int i = 0; i < KVC_N_STATS; i++) atomic_init(&s->c[i], 0);
    return s;
}

static inline void kvc_stats_free(kvc_stats *s) { free(s); }

static inline void kvc_stats_add(kvc_stats *s, int which, uint64_t n)
{
    atomic_fetch_add_explicit(&s->c[which], n, memory_order_relaxed);
}

static inline void kvc_stats_sub(kvc_stats *s, int which, uint64_t n)
{
    atomic_fetch_sub_explicit(&s->c[which], n, memory_order_relaxed);
}

/* Adds n to a counter unless the result would exceed limit: 1 if added.
 * Reserves disk budget for a store before it writes anything. */
static inline int kvc_stats_reserve(kvc_stats *s, int which, uint64_t n, uint64_t limit)
{
    uint64_t cur = atomic_load_explicit(&s->c[which], memory_order_relaxed);
    do {
        if (n > limit || cur > limit - n) return 0;
    } while (!atomic_compare_exchange_weak_explicit(&s->c[which], &cur, cur + n,
                                                    memory_order_relaxed, memory_order_relaxed));
    return 1;
}

static inline uint64_t kvc_stats_get(const kvc_stats *s, int which)
{
    return atomic_load_explicit(&((kvc_stats *)s)->c[which], memory_order_relaxed);
}

#endif /* KVC_STATS_H */

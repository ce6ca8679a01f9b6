/* kvc_pool.h - a tiny fork-safe thread pool for store_layers.
 *
 * kvc_pool_run() runs fn(ctx, i) for i in [0, n_tasks) on the calling thread
 * plus up to threads-1 pool workers, and returns when every task has ended.
 * Workers start on first use and sleep between jobs.  One job runs at a time:
 * a caller that finds the pool busy runs its tasks alone instead of waiting.
 * After fork() the child starts with an empty pool (pthread_atfork), which is
 * why this exists instead of OpenMP: GNU OpenMP hangs in a forked child.
 */
#ifndef KVC_POOL_H
#define KVC_POOL_H

#include <stddef.h>

#define KVC_POOL_MAX_WORKERS 64

typedef void (*kvc_task_fn)(void *ctx, size_t i);

/* Returns the number of threads that could take part (1 = caller alone). */
int kvc_pool_run(int threads, size_t n_tasks, kvc_task_fn fn, void *ctx);

#endif /* KVC_POOL_H */

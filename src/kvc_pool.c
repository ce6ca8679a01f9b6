/* A tiny fork-safe thread pool; see include/kvc_pool.h for the contract.
 *
 * A job is (fn, ctx, n_tasks) and a shared counter `next`: every participant
 * claims task indices with an atomic fetch-add until they run out, so the
 * work balances itself and a worker that wakes late simply finds nothing.
 * `users` counts workers inside the job; the caller closes the job and waits
 * for users == 0 before returning, so no worker touches a finished job. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include "kvc_pool.h"

static struct {
    pthread_mutex_t run;   /* one job at a time */
    pthread_mutex_t mu;    /* guards everything below except `next` */
    pthread_cond_t wake, done;
    int n_workers, want, open, users;
    unsigned long gen;
    kvc_task_fn fn;
    void *ctx;
    size_t n_tasks;
    _Atomic size_t next;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
       PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, NULL, NULL, 0, 0};

static pthread_once_t kvc_pool_once = PTHREAD_ONCE_INIT;

static void kvc_pool_drain(kvc_task_fn fn, void *ctx, size_t n)
{
    size_t i;
    while ((i = atomic_fetch_add_explicit(&P.next, 1, memory_order_relaxed)) < n) fn(ctx, i);
}

static void *kvc_pool_worker(void *arg)
{
    int id = (int)(size_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (!P.open || P.gen == seen || id >= P.want) {
            if (P.open) seen = P.gen; /* not wanted for this job */
            pthread_cond_wait(&P.wake, &P.mu);
        }
        seen = P.gen;
        kvc_task_fn fn = P.fn;
        void *ctx = P.ctx;
        size_t n = P.n_tasks;
        P.users++;
        pthread_mutex_unlock(&P.mu);
        kvc_pool_drain(fn, ctx, n);
        pthread_mutex_lock(&P.mu);
        if (--P.users == 0) pthread_cond_signal(&P.done);
    }
    return NULL;
}

static void kvc_pool_prepare(void) { pthread_mutex_lock(&P.run); pthread_mutex_lock(&P.mu); }
static void kvc_pool_parent(void) { pthread_mutex_unlock(&P.mu); pthread_mutex_unlock(&P.run); }

/* The child has no workers: start from a clean state. */
static void kvc_pool_child(void)
{
    pthread_mutex_init(&P.run, NULL);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.done, NULL);
    P.n_workers = P.want = P.open = P.users = 0;
}

static void kvc_pool_register(void) { pthread_atfork(kvc_pool_prepare, kvc_pool_parent, kvc_pool_child); }

int kvc_pool_run(int threads, size_t n_tasks, kvc_task_fn fn, void *ctx)
{
    int helpers = threads - 1;
    if (n_tasks == 0) return 1;
    if (helpers > KVC_POOL_MAX_WORKERS) helpers = KVC_POOL_MAX_WORKERS;
    if ((size_t)helpers > n_tasks - 1) helpers = (int)(n_tasks - 1);
    if (helpers <= 0 || pthread_mutex_trylock(&P.run) != 0) {
        for (size_t i = 0; i < n_tasks; i++) fn(ctx, i);
        return 1;
    }
    pthread_once(&kvc_pool_once, kvc_pool_register);
    pthread_mutex_lock(&P.mu);
    while (P.n_workers < helpers) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, kvc_pool_worker, (void *)(size_t)P.n_workers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with the workers we have */
        P.n_workers++;
    }
    if (helpers > P.n_workers) helpers = P.n_workers;
    P.fn = fn;
    P.ctx = ctx;
    P.n_tasks = n_tasks;
    P.want = helpers;
    atomic_store(&P.next, 0);
    P.open = 1;
    P.gen++;
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);

    kvc_pool_drain(fn, ctx, n_tasks);

    pthread_mutex_lock(&P.mu);
    P.open = 0;
    while (P.users > 0) pthread_cond_wait(&P.done, &P.mu);
    pthread_mutex_unlock(&P.mu);
    pthread_mutex_unlock(&P.run);
    return helpers + 1;
}

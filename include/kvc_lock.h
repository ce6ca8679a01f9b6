/* kvc_lock.h - the per-layer lock: a plain mutex, taken without the GIL. */
#ifndef KVC_LOCK_H
#define KVC_LOCK_H

#include <pthread.h>

typedef pthread_mutex_t kvc_lock;

static inline int kvc_lock_init(kvc_lock *l) { return pthread_mutex_init(l, NULL); }
static inline void kvc_lock_destroy(kvc_lock *l) { pthread_mutex_destroy(l); }
static inline void kvc_lock_acquire(kvc_lock *l) { pthread_mutex_lock(l); }
static inline void kvc_lock_release(kvc_lock *l) { pthread_mutex_unlock(l); }

#endif /* KVC_LOCK_H */

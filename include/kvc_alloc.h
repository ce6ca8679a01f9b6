/* kvc_alloc.h - the one allocator of kvcache: zeroed, aligned, base kept.
 *
 * kvc_alloc(size, align) returns zero-filled memory aligned to `align` (a power
 * of two, at least 16).  A small header just below the returned pointer keeps
 * the base pointer and the mapping size, so kvc_free() needs only the pointer.
 * Large blocks come from anonymous mmap: the kernel's zero pages make them
 * free to create, pages are committed on first touch (kvc_prefault() moves
 * that cost out of the store path) and transparent huge pages are requested.
 * Live bytes and blocks are counted so that tests can prove every block is
 * freed exactly once.
 *
 * Built with AddressSanitizer (KVCACHE_SANITIZE=address), every block comes
 * from calloc, which ASan tracks (it cannot see into an anonymous mapping),
 * and the alignment slack before the header and after the caller's `size`
 * bytes is poisoned: a read or write one byte past a block is reported.
 */
#ifndef KVC_ALLOC_H
#define KVC_ALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define KVC_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVC_ASAN 1
#endif
#endif

#ifdef KVC_ASAN
#include <sanitizer/asan_interface.h>
#define KVC_MMAP_THRESHOLD SIZE_MAX /* calloc only: ASan tracks its blocks */
#else
#define ASAN_POISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#define KVC_MMAP_THRESHOLD ((size_t)1 << 20)
#endif

typedef struct kvc_alloc_header {
    void *base;
    size_t mapped;   /* bytes mapped from `base`, 0 when from calloc */
    size_t size;     /* bytes the caller asked for */
    uint64_t magic;
} kvc_alloc_header;

#define KVC_ALLOC_MAGIC 0x6b76632d616c6c6fULL /* "kvc-allo" */

static _Atomic int64_t kvc_alloc_live_bytes_ = 0;
static _Atomic int64_t kvc_alloc_live_blocks_ = 0;

static inline int64_t kvc_alloc_live_bytes(void) { return atomic_load(&kvc_alloc_live_bytes_); }
static inline int64_t kvc_alloc_live_blocks(void) { return atomic_load(&kvc_alloc_live_blocks_); }

static inline void *kvc_alloc(size_t size, size_t align)
{
    if (align < sizeof(kvc_alloc_header)) align = sizeof(kvc_alloc_header);
    if ((align & (align - 1)) != 0) return NULL;
    size_t extra = align + sizeof(kvc_alloc_header);
    if (size > SIZE_MAX - extra) return NULL;
    size_t total = size + extra, mapped = 0;
    void *base;
    if (size >= KVC_MMAP_THRESHOLD) {
        base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED) return NULL;
        mapped = total;
#ifdef MADV_HUGEPAGE
        (void)madvise(base, total, MADV_HUGEPAGE);
#endif
    } else {
        base = calloc(1, total);
        if (base == NULL) return NULL;
    }
    uintptr_t p = ((uintptr_t)base + sizeof(kvc_alloc_header) + align - 1) & ~(uintptr_t)(align - 1);
    kvc_alloc_header *h = (kvc_alloc_header *)p - 1;
    h->base = base;
    h->mapped = mapped;
    h->size = size;
    h->magic = KVC_ALLOC_MAGIC;
    ASAN_POISON_MEMORY_REGION(base, (size_t)((char *)h - (char *)base));
    ASAN_POISON_MEMORY_REGION((char *)p + size, total - (size_t)((char *)p + size - (char *)base));
    atomic_fetch_add(&kvc_alloc_live_bytes_, (int64_t)size);
    atomic_fetch_add(&kvc_alloc_live_blocks_, 1);
    return (void *)p;
}

/* Commit every page now (writes zeros, which the memory already holds). */
static inline void kvc_prefault(void *ptr, size_t size)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t step = page > 0 ? (size_t)page : 4096;
    volatile unsigned char *c = (volatile unsigned char *)ptr;
    for (size_t off = 0; off < size; off += step) c[off] = 0;
}

static inline void kvc_free(void *ptr)
{
    if (ptr == NULL) return;
    kvc_alloc_header *h = (kvc_alloc_header *)ptr - 1;
    if (h->magic != KVC_ALLOC_MAGIC) abort(); /* not ours, or freed twice */
    h->magic = 0;
    atomic_fetch_sub(&kvc_alloc_live_bytes_, (int64_t)h->size);
    atomic_fetch_sub(&kvc_alloc_live_blocks_, 1);
    if (h->mapped) munmap(h->base, h->mapped);
    else free(h->base); /* ASan frees a block with poisoned slack as any other */
}

#endif /* KVC_ALLOC_H */

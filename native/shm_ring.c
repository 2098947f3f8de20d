/* Message ring in shared memory: framing, writer lock, futex waits.
 * Layout and protocol: shm_ring.h. */
#define _GNU_SOURCE
#include "shm_ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

_Static_assert(sizeof(pf_ring_header) == PF_RING_HEADER_SIZE, "ring header is 4 cache lines");
_Static_assert(offsetof(pf_ring_header, tail) == 64, "tail on its own line");
_Static_assert(offsetof(pf_ring_header, head) == 128, "head on its own line");
_Static_assert(sizeof(_Atomic uint32_t) == 4, "futex words are 32-bit");
/* A lock-based atomic would keep its lock in this process, not in the shared
 * memory: across processes only lock-free atomics work. */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_LLONG_LOCK_FREE == 2, "need lock-free atomics");

/* Waiters spin this long before sleeping: about what the FUTEX_WAKE a sleeper
 * costs its waker, so a reader that is only just ahead of a steady writer
 * catches the next message without a wake-up. Longer spins cost more than
 * they save on the serving machine: its few cores are shared by the engine,
 * the HTTP workers and their clients, the engine writes a worker one message
 * per step (the reader is not just ahead but a step ahead), and every
 * microsecond a reader spins is taken from one of them (a 50 us spin per
 * empty ring cost a single stream ~15% of its tokens/s). */
#define SPIN_NS 5000u

#define FRAME_FLAGS (PF_FRAME_START | PF_FRAME_END)

static uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

uint64_t pf_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* -- our pid, cached: glibc no longer caches getpid(), and the lock takes it
 * on every put. A fork clears the cache so a child never poses as its parent. */

static _Atomic uint32_t cached_pid;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void forget_pid(void) { atomic_store_explicit(&cached_pid, 0, memory_order_relaxed); }
static void install_atfork(void) { pthread_atfork(NULL, NULL, forget_pid); }

static uint32_t my_pid(void)
{
    uint32_t pid = atomic_load_explicit(&cached_pid, memory_order_relaxed);
    if (pid == 0) {
        pthread_once(&atfork_once, install_atfork);
        pid = (uint32_t)getpid();
        atomic_store_explicit(&cached_pid, pid, memory_order_relaxed);
    }
    return pid;
}

/* -- futexes: shared (no FUTEX_PRIVATE_FLAG), the waiters are other processes */

/* Sleep while *word == expected, at most until deadline and at most one
 * PF_WAIT_SLICE_NS: a slice ending early returns PF_RING_INTR, like a signal,
 * so the caller gets to run its signal handlers and then waits on. */
static int futex_wait(_Atomic uint32_t *word, uint32_t expected, uint64_t deadline)
{
    uint64_t now = pf_now_ns();
    if (now >= deadline)
        return PF_RING_TIMEOUT;
    int sliced = deadline - now > PF_WAIT_SLICE_NS;
    uint64_t wait = sliced ? PF_WAIT_SLICE_NS : deadline - now;
    struct timespec rel = {(time_t)(wait / 1000000000u), (long)(wait % 1000000000u)};
    if (syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &rel, NULL, 0) == 0)
        return PF_RING_OK;
    if (errno == ETIMEDOUT)
        return sliced ? PF_RING_INTR : PF_RING_TIMEOUT;
    if (errno == EINTR)
        return PF_RING_INTR;
    return PF_RING_OK;  /* EAGAIN: the word moved on before we slept; re-check */
}

static void futex_wake(_Atomic uint32_t *word, int n)
{
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* -- waiting for a condition (data to read, space to write) */

typedef int (*ready_fn)(pf_ring *r, uint64_t need);

/* The consumer: anything past head? Re-reads tail only when the view is used up. */
static int has_data(pf_ring *r, uint64_t need)
{
    (void)need;
    uint64_t head = atomic_load_explicit(&r->hdr->head, memory_order_relaxed);  /* ours */
    if (r->seen_tail != head)
        return 1;
    r->seen_tail = atomic_load(&r->hdr->tail);
    return r->seen_tail != head;
}

/* A producer under the lock: need bytes free? Re-reads head only when short. */
static int has_space(pf_ring *r, uint64_t need)
{
    uint64_t tail = atomic_load_explicit(&r->hdr->tail, memory_order_relaxed);  /* ours */
    if (tail - r->seen_head <= r->capacity - need)
        return 1;
    r->seen_head = atomic_load(&r->hdr->head);
    uint64_t used = tail - r->seen_head;
    return used > r->capacity || r->capacity - used >= need;  /* corrupt: let the caller see it */
}

/* Poll ready() for up to SPIN_NS; 1 if it came true. */
static int spin(pf_ring *r, ready_fn ready, uint64_t arg)
{
    uint64_t end = pf_now_ns() + SPIN_NS;
    do {
        for (int i = 0; i < 16; i++) {  /* a clock read per 16 pauses */
            if (ready(r, arg))
                return 1;
            cpu_relax();
        }
    } while (pf_now_ns() < end);
    return 0;
}

/* Spin a little, then sleep on seq. The waiter reads seq before checking and
 * registers before re-checking; a signaler publishes, then reads the waiter
 * count and bumps seq (all seq_cst). So either the re-check sees the new
 * state, or the signaler sees us and the bumped seq fails or ends our wait. */
static int wait_for(pf_ring *r, ready_fn ready, uint64_t need,
                    _Atomic uint32_t *seq, _Atomic uint32_t *waiters, uint64_t deadline)
{
    if (ready(r, need))
        return PF_RING_OK;
    if (deadline == PF_NO_WAIT)
        return PF_RING_TIMEOUT;
    if (spin(r, ready, need))
        return PF_RING_OK;
    for (;;) {
        uint32_t s = atomic_load(seq);
        if (ready(r, need))
            return PF_RING_OK;
        atomic_fetch_add(waiters, 1);
        int rc = ready(r, need) ? PF_RING_OK : futex_wait(seq, s, deadline);
        atomic_fetch_sub(waiters, 1);
        if (rc != PF_RING_OK)
            return ready(r, need) ? PF_RING_OK : rc;
    }
}

static void wake_waiters(_Atomic uint32_t *seq, _Atomic uint32_t *waiters)
{
    if (atomic_load(waiters) != 0) {
        atomic_fetch_add(seq, 1);
        futex_wake(seq, INT_MAX);
    }
}

/* -- copies into and out of the data area; n <= capacity, may wrap once */

static void copy_in(const pf_ring *r, uint64_t pos, const void *src, uint64_t n)
{
    uint64_t at = pos & r->mask, first = r->capacity - at;
    if (n <= first) {
        memcpy(r->data + at, src, n);
    } else {
        memcpy(r->data + at, src, first);
        memcpy(r->data, (const unsigned char *)src + first, n - first);
    }
}

static void copy_out(const pf_ring *r, uint64_t pos, void *dst, uint64_t n)
{
    uint64_t at = pos & r->mask, first = r->capacity - at;
    if (n <= first) {
        memcpy(dst, r->data + at, n);
    } else {
        memcpy(dst, r->data + at, first);
        memcpy((unsigned char *)dst + first, r->data, n - first);
    }
}

/* -- attach / format */

uint64_t pf_ring_capacity_for(uint64_t region_size)
{
    if (region_size < PF_RING_HEADER_SIZE + PF_RING_MIN_CAPACITY)
        return 0;
    uint64_t cap = PF_RING_MAX_CAPACITY;
    while (cap > region_size - PF_RING_HEADER_SIZE)
        cap >>= 1;
    return cap;
}

int pf_ring_init(pf_ring *r, void *base, uint64_t region_size, int format)
{
    uint64_t cap = pf_ring_capacity_for(region_size);
    if (base == NULL || ((uintptr_t)base & 63u) || cap == 0)
        return PF_RING_EINVAL;
    r->hdr = (pf_ring_header *)base;
    r->data = (unsigned char *)base + PF_RING_HEADER_SIZE;
    r->capacity = cap;
    r->mask = cap - 1;
    pf_ring_header *h = r->hdr;
    if (format) {
        memset((void *)h, 0, sizeof *h);
        h->version = PF_RING_VERSION;
        h->capacity = cap;
        atomic_store(&h->magic, PF_RING_MAGIC);  /* last: attachers see a whole header */
    } else if (atomic_load(&h->magic) != PF_RING_MAGIC || h->version != PF_RING_VERSION || h->capacity != cap) {
        return PF_RING_EBADHDR;
    }
    r->seen_head = 0;                            /* stale low: re-read on first need */
    r->seen_tail = atomic_load(&h->head);        /* "nothing seen yet" for a consumer */
    return PF_RING_OK;
}

/* -- writer lock */

static int holder_dead(uint32_t word)
{
    pid_t pid = (pid_t)(word & ~PF_LOCK_WAITERS);
    /* a zombie still answers kill(): it counts as alive until reaped */
    return pid > 0 && kill(pid, 0) == -1 && errno == ESRCH;
}

static int try_lock(pf_ring *r, uint64_t me)
{
    uint32_t v = 0;
    return atomic_load_explicit(&r->hdr->lock, memory_order_relaxed) == 0 &&
           atomic_compare_exchange_strong(&r->hdr->lock, &v, (uint32_t)me);
}

int pf_ring_lock(pf_ring *r, uint64_t deadline)
{
    _Atomic uint32_t *lock = &r->hdr->lock;
    uint32_t me = my_pid(), v;
    if (try_lock(r, me) || (deadline != PF_NO_WAIT && spin(r, try_lock, me)))
        return PF_RING_OK;
    for (;;) {  /* with PF_NO_WAIT once, so that a dead holder is still taken over */
        v = atomic_load(lock);
        if (v == 0) {
            /* keep the waiters bit: others may still sleep, our unlock wakes one */
            if (atomic_compare_exchange_strong(lock, &v, me | PF_LOCK_WAITERS))
                return PF_RING_OK;
            continue;
        }
        if (!(v & PF_LOCK_WAITERS)) {
            if (!atomic_compare_exchange_strong(lock, &v, v | PF_LOCK_WAITERS))
                continue;
            v |= PF_LOCK_WAITERS;
        }
        if (holder_dead(v)) {
            if (atomic_compare_exchange_strong(lock, &v, me | PF_LOCK_WAITERS))
                return PF_RING_OK;
            continue;
        }
        int rc = futex_wait(lock, v, deadline);
        if (rc == PF_RING_TIMEOUT || rc == PF_RING_INTR)
            return rc;
    }
}

void pf_ring_unlock(pf_ring *r)
{
    if (atomic_exchange(&r->hdr->lock, 0) & PF_LOCK_WAITERS)
        futex_wake(&r->hdr->lock, 1);
}

/* -- producer */

uint64_t pf_ring_max_fragment(const pf_ring *r)
{
    /* half the ring per frame: the writer fills one half while the reader
     * empties the other */
    return r->capacity / 2 - PF_FRAME_HEADER - sizeof(uint64_t);
}

int pf_ring_write_frame(pf_ring *r, uint32_t flags, uint64_t total,
                        const void *data, uint64_t len, uint64_t deadline)
{
    pf_ring_header *h = r->hdr;
    uint32_t prefix = (flags & FRAME_FLAGS) == PF_FRAME_START ? sizeof(uint64_t) : 0;
    uint64_t payload = prefix + len;
    uint64_t size = PF_FRAME_HEADER + align8(payload);
    if ((flags & ~FRAME_FLAGS) || size > r->capacity)
        return PF_RING_EINVAL;
    int rc = wait_for(r, has_space, size, &h->space_seq, &h->writers_waiting, deadline);
    if (rc != PF_RING_OK)
        return rc;
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_relaxed);  /* ours: we hold the lock */
    if (tail - r->seen_head > r->capacity - size || (tail & 7u))
        return PF_RING_CORRUPT;
    uint32_t frame[2] = {(uint32_t)payload, PF_FRAME_TAG << 16 | flags};
    copy_in(r, tail, frame, sizeof frame);
    if (prefix)
        copy_in(r, tail + PF_FRAME_HEADER, &total, sizeof total);
    copy_in(r, tail + PF_FRAME_HEADER + prefix, data, len);
    atomic_store(&h->tail, tail + size);  /* seq_cst: ordered before the waiters load */
    wake_waiters(&h->data_seq, &h->readers_waiting);
    return PF_RING_OK;
}

/* -- consumer */

int pf_ring_wait_readable(pf_ring *r, uint64_t deadline)
{
    pf_ring_header *h = r->hdr;
    return wait_for(r, has_data, 0, &h->data_seq, &h->readers_waiting, deadline);
}

int pf_ring_peek(pf_ring *r, pf_frame *f)
{
    if (!has_data(r, 0))
        return PF_RING_EMPTY;
    uint64_t head = atomic_load_explicit(&r->hdr->head, memory_order_relaxed);  /* ours: one consumer */
    uint64_t avail = r->seen_tail - head;      /* frames up to seen_tail are complete */
    if (avail > r->capacity || avail < PF_FRAME_HEADER || (head & 7u))
        return PF_RING_CORRUPT;
    uint32_t frame[2];
    copy_out(r, head, frame, sizeof frame);
    uint32_t len = frame[0], flags = frame[1];
    if ((flags >> 16) != PF_FRAME_TAG || (flags & 0xffffu & ~FRAME_FLAGS))
        return PF_RING_CORRUPT;
    f->pos = head;
    f->size = PF_FRAME_HEADER + align8(len);
    f->flags = flags & FRAME_FLAGS;
    f->data_off = 0;
    f->data_len = f->total = len;
    if (f->size > avail)
        return PF_RING_CORRUPT;
    if (f->flags == PF_FRAME_START) {
        if (len < sizeof(uint64_t))
            return PF_RING_CORRUPT;
        copy_out(r, head + PF_FRAME_HEADER, &f->total, sizeof f->total);
        f->data_off = sizeof(uint64_t);
        f->data_len = len - sizeof(uint64_t);
    }
    return PF_RING_OK;
}

void pf_ring_read(const pf_ring *r, const pf_frame *f, void *dst)
{
    copy_out(r, f->pos + PF_FRAME_HEADER + f->data_off, dst, f->data_len);
}

void pf_ring_consume(const pf_ring *r, const pf_frame *f)
{
    pf_ring_header *h = r->hdr;
    atomic_store(&h->head, f->pos + f->size);  /* seq_cst: ordered before the waiters load */
    wake_waiters(&h->space_seq, &h->writers_waiting);
}

int pf_ring_used(const pf_ring *r, uint64_t *used)
{
    *used = atomic_load(&r->hdr->tail) - atomic_load(&r->hdr->head);
    return *used > r->capacity ? PF_RING_CORRUPT : PF_RING_OK;
}

/* -- atomic words in shared memory; callers check bounds and alignment */

int pf_shm_cas_u32(void *p, uint32_t expected, uint32_t desired)
{
    return atomic_compare_exchange_strong((_Atomic uint32_t *)p, &expected, desired);
}

uint32_t pf_shm_load_u32(const void *p) { return atomic_load((_Atomic uint32_t *)p); }
void pf_shm_store_u32(void *p, uint32_t v) { atomic_store((_Atomic uint32_t *)p, v); }
int64_t pf_shm_load_i64(const void *p) { return atomic_load((_Atomic int64_t *)p); }
void pf_shm_store_i64(void *p, int64_t v) { atomic_store((_Atomic int64_t *)p, v); }
int64_t pf_shm_add_i64(void *p, int64_t v) { return atomic_fetch_add((_Atomic int64_t *)p, v) + v; }

static double bits_to_f64(uint64_t u) { double d; memcpy(&d, &u, sizeof d); return d; }
static uint64_t f64_to_bits(double d) { uint64_t u; memcpy(&u, &d, sizeof u); return u; }

double pf_shm_load_f64(const void *p) { return bits_to_f64(atomic_load((_Atomic uint64_t *)p)); }
void pf_shm_store_f64(void *p, double v) { atomic_store((_Atomic uint64_t *)p, f64_to_bits(v)); }

double pf_shm_add_f64(void *p, double v)
{
    _Atomic uint64_t *word = (_Atomic uint64_t *)p;
    uint64_t old = atomic_load(word);
    double sum;
    do {
        sum = bits_to_f64(old) + v;
    } while (!atomic_compare_exchange_weak(word, &old, f64_to_bits(sum)));
    return sum;
}

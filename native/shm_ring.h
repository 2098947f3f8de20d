/* A message ring in shared memory, used across processes.
 *
 * The caller maps the memory (POSIX shm, mmap) and hands us a region:
 *
 *   region = [ pf_ring_header: 256 bytes ][ data: capacity bytes ]
 *
 * capacity is a power of two in [PF_RING_MIN_CAPACITY, PF_RING_MAX_CAPACITY]. Cursors
 * count bytes forever (64-bit, never wrap in practice); a byte's place in the
 * data area is cursor & (capacity - 1).
 *
 *   head  read cursor, written only by the one consumer
 *   tail  write cursor, written only by the producer holding the lock
 *   used = tail - head  (0 .. capacity)
 *
 * Frames, 8-byte aligned, a payload of any length that may wrap the end:
 *
 *   [ u32 len | u32 flags ][ payload: len bytes ][ pad to 8 ]
 *
 *   flags = PF_FRAME_TAG << 16 | START? | END?
 *   START|END  a whole message
 *   START      first fragment of a long message: payload = u64 total + bytes
 *   (none)     middle fragment
 *   END        last fragment
 *
 * A message whose frame fits the capacity goes whole (waiting for space);
 * longer ones go as fragments of at most capacity/2, so writer and reader
 * overlap. The writer lock is held across all fragments of a message, so
 * fragments of different producers never interleave.
 *
 * Writer lock (multi-producer): a u32 holding the holder's pid, with
 * PF_LOCK_WAITERS set while someone sleeps on it. A waiter that finds the
 * holder's pid gone (kill(pid, 0) == ESRCH) takes the lock over: a worker
 * killed mid-put must not wedge the server. The reader drops the dead
 * writer's half message when the next START arrives.
 *
 * Waking: two 32-bit futex sequence words, shared (not _PRIVATE) futexes
 * since waiters live in other processes.
 *   data_seq   bumped by a producer after publishing, when readers_waiting
 *   space_seq  bumped by the consumer after freeing space, when writers_waiting
 * A waiter spins briefly (5 us), registers in the waiters count, re-checks,
 * then FUTEX_WAITs on the seq value it read before checking, so a wake
 * between its check and its sleep is never lost. Signalers pay a syscall only
 * when someone waits. The lock's waiters sleep on the lock word itself.
 *
 * Blocking calls take an absolute CLOCK_MONOTONIC deadline (PF_NO_DEADLINE:
 * none; PF_NO_WAIT: try once) and sleep at most PF_WAIT_SLICE_NS at a time,
 * returning PF_RING_INTR in between so a caller can run signal handlers.
 *
 * Robustness: bounds come from the process-local pf_ring (computed from the
 * region size at attach), never from shared memory; every offset is masked,
 * and frame lengths and cursors are validated (PF_RING_CORRUPT) before use.
 */
#ifndef PYFORGE_SHM_RING_H
#define PYFORGE_SHM_RING_H

#include <stdatomic.h>
#include <stdint.h>

#define PF_RING_MAGIC 0x47525046u            /* "PFRG" */
#define PF_RING_VERSION 1u
#define PF_RING_HEADER_SIZE 256u
#define PF_RING_MIN_CAPACITY 64u
#define PF_RING_MAX_CAPACITY (1u << 30)
#define PF_FRAME_HEADER 8u

#define PF_FRAME_TAG 0x5246u                 /* "FR": cheap check on every frame */
#define PF_FRAME_START 1u
#define PF_FRAME_END 2u

#define PF_LOCK_WAITERS 0x80000000u          /* pids stay below 2^22 on Linux */

#define PF_NO_DEADLINE UINT64_MAX            /* deadlines: CLOCK_MONOTONIC ns */
#define PF_NO_WAIT 0u                        /* deadline: try once, no spin, no sleep */
#define PF_WAIT_SLICE_NS 200000000u          /* longest sleep before PF_RING_INTR */

enum {
    PF_RING_OK = 0,
    PF_RING_EMPTY = 1,       /* nothing to read */
    PF_RING_TIMEOUT = 2,     /* deadline passed */
    PF_RING_INTR = 3,        /* a signal or a wait slice: check signals, call again */
    PF_RING_CORRUPT = -1,    /* cursors or a frame are impossible */
    PF_RING_EINVAL = -2,     /* bad region (size, alignment) */
    PF_RING_EBADHDR = -3,    /* attach: not a formatted ring of this capacity */
};

/* The shared header, one cache line per role, so that the hot path of a put
 * or a get touches the other side's line only to publish or to see news. */
typedef struct {
    /* line 0: identity (written once by format) and the producers' lock; no
     * consumer reads it, so an uncontended lock stays in the writer's cache */
    _Alignas(64) _Atomic uint32_t magic;  /* stored last by format */
    uint32_t version;
    uint64_t capacity;
    _Atomic uint32_t lock;               /* holder pid | PF_LOCK_WAITERS, 0: free */
    /* line 1: written by the lock holder, read by the consumer */
    _Alignas(64) _Atomic uint64_t tail;
    /* line 2: written by the consumer, read by producers short of space */
    _Alignas(64) _Atomic uint64_t head;
    /* line 3: sleepers; written only around a sleep, so reading the waiter
     * counts on every put / get stays a cache hit */
    _Alignas(64) _Atomic uint32_t readers_waiting;
    _Atomic uint32_t writers_waiting;
    _Atomic uint32_t data_seq;           /* futex: readers sleep here */
    _Atomic uint32_t space_seq;          /* futex: writers sleep here */
} pf_ring_header;

/* Process-local handle: where the region is mapped here, its bounds, and the
 * other side's cursor as last seen. Cursors only grow, so a stale view only
 * underestimates what is there; it is re-read when it falls short, which
 * keeps the other side's cache line out of the common path. */
typedef struct {
    pf_ring_header *hdr;
    unsigned char *data;
    uint64_t capacity;
    uint64_t mask;
    uint64_t seen_head;      /* producers' view of head (under the lock) */
    uint64_t seen_tail;      /* the consumer's view of tail */
} pf_ring;

/* A frame found by pf_ring_peek: data_len bytes of message at data_off. */
typedef struct {
    uint64_t pos;            /* cursor of the frame header */
    uint64_t size;           /* whole frame, header and padding included */
    uint32_t flags;          /* PF_FRAME_START / PF_FRAME_END */
    uint32_t data_off;       /* 8 in a fragmented START frame (the total), else 0 */
    uint64_t data_len;
    uint64_t total;          /* message length, read from a fragmented START */
} pf_frame;

uint64_t pf_now_ns(void);
uint64_t pf_ring_capacity_for(uint64_t region_size);   /* 0 if too small */

/* Attach to (format=0) or format (format=1) the region at base. */
int pf_ring_init(pf_ring *r, void *base, uint64_t region_size, int format);

/* Producers. */
int pf_ring_lock(pf_ring *r, uint64_t deadline);
void pf_ring_unlock(pf_ring *r);
uint64_t pf_ring_max_fragment(const pf_ring *r);        /* data bytes per fragment */
int pf_ring_write_frame(pf_ring *r, uint32_t flags, uint64_t total,
                        const void *data, uint64_t len, uint64_t deadline);

/* The consumer. */
int pf_ring_wait_readable(pf_ring *r, uint64_t deadline);
int pf_ring_peek(pf_ring *r, pf_frame *f);
void pf_ring_read(const pf_ring *r, const pf_frame *f, void *dst);
void pf_ring_consume(const pf_ring *r, const pf_frame *f);
int pf_ring_used(const pf_ring *r, uint64_t *used);

/* Atomic words in shared memory (segment header, slots, stats). */
int pf_shm_cas_u32(void *p, uint32_t expected, uint32_t desired);
uint32_t pf_shm_load_u32(const void *p);
void pf_shm_store_u32(void *p, uint32_t v);
int64_t pf_shm_load_i64(const void *p);
void pf_shm_store_i64(void *p, int64_t v);
int64_t pf_shm_add_i64(void *p, int64_t v);
double pf_shm_load_f64(const void *p);
void pf_shm_store_f64(void *p, double v);
double pf_shm_add_f64(void *p, double v);

#endif

/* The IPC contract between pyforge's HTTP workers and its engine, for C.
 *
 * Python's side: pyforge/ipc/segment.py (the segment) and pyforge/ipc/records.py
 * (the records), which this header restates byte for byte; the ring itself is
 * shm_ring.h. tests/serving/c_client.c attaches to a live engine with it,
 * submits a request and reads its tokens (tests/serving/test_c_client.py).
 *
 * The segment: one POSIX shared-memory object, /dev/shm/<name>, little-endian.
 *
 *   0                 header (one page), below
 *   PAGE              worker slots, PF_SLOT_BYTES each: u32 pid (0: free) | u32 - | u64 claims
 *   page-aligned      request ring: shm_ring region of request_ring_bytes data bytes
 *   page-aligned      one response ring per slot, each region rounded up to a page
 *   then              stats (pyforge/ipc/segment.py's ENGINE_STATS, WORKER_STATS)
 *
 * Rings: every worker (any thread) writes the request ring under its writer
 * lock, the engine alone reads it; the engine alone writes a slot's response
 * ring, the worker process holding the slot alone reads it.
 *
 * A worker: CAS its pid into a free slot's pid word (or a dead process's),
 * bump the slot's claims, make request ids as PF_REQUEST_ID(slot, n) with n
 * starting at (claims & 0xFFFF) << 32, write SUBMIT / ABORT messages (one
 * record each) to the request ring, and read batches of records (one or more
 * back to back) from its slot's ring. A request's replies, in ring order:
 * ADMITTED, (PROMPT_LOGPROBS* when it asked for them), TOKENS* (an embedding
 * request, SUBMIT with PF_EXT_POOLING: one EMBEDDING instead), then one FINISH
 * or ERROR; a refused request gets its
 * ERROR alone. After an ABORT the FINISH (reason abort) still comes.
 * Submit only while engine status is READY; the engine writes its facts
 * (max_model_len, vocab_size, the end-of-generation ids, hidden_size) before READY.
 */
#ifndef PYFORGE_IPC_H
#define PYFORGE_IPC_H

#include <assert.h>
#include <stdint.h>

#include "shm_ring.h"

/* -- the segment header ------------------------------------------------- */
#define PF_SEG_MAGIC "PYFORGE"          /* 8 bytes with its NUL */
#define PF_SEG_VERSION 3u
#define PF_MAX_EOS_IDS 32u
#define PF_PAGE 4096u
#define PF_SLOT_BYTES 64u

enum {                                   /* byte offsets in the header */
    PF_SEG_OFF_MAGIC = 0,                /* char[8] */
    PF_SEG_OFF_VERSION = 8,              /* u32 */
    PF_SEG_OFF_N_WORKERS = 12,           /* u32: slots */
    PF_SEG_OFF_REQUEST_RING_BYTES = 16,  /* u64: data bytes of the request ring */
    PF_SEG_OFF_RESPONSE_RING_BYTES = 24, /* u64: data bytes of each response ring */
    PF_SEG_OFF_CREATOR_PID = 32,         /* u32 */
    PF_SEG_OFF_STATS_LAYOUT = 36,        /* u32: crc32 of the stats field list */
    PF_SEG_OFF_ENGINE_STATUS = 40,       /* u32, atomic: pf_engine_status */
    PF_SEG_OFF_ENGINE_PID = 44,          /* u32, atomic */
    PF_SEG_OFF_HEARTBEAT = 48,           /* i64, atomic: bumped every engine loop */
    PF_SEG_OFF_MAX_MODEL_LEN = 56,       /* u32: the engine's context length */
    PF_SEG_OFF_VOCAB_SIZE = 60,          /* u32 */
    PF_SEG_OFF_N_EOS = 64,               /* u32: end-of-generation ids that follow */
    PF_SEG_OFF_EOS_IDS = 68,             /* u32[PF_MAX_EOS_IDS]: they end a request (finish reason stop) */
    PF_SEG_OFF_HIDDEN_SIZE = 196,        /* u32: an EMBEDDING's length */
};

enum pf_engine_status { PF_ENGINE_STARTING = 0, PF_ENGINE_READY = 1, PF_ENGINE_DRAINING = 2, PF_ENGINE_STOPPED = 3 };

enum { PF_SLOT_OFF_PID = 0, PF_SLOT_OFF_CLAIMS = 8 };

static inline uint64_t pf_align(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }
static inline uint64_t pf_ring_region(uint64_t data_bytes) { return PF_RING_HEADER_SIZE + data_bytes; }
static inline uint64_t pf_seg_slot(uint32_t slot) { return PF_PAGE + (uint64_t)PF_SLOT_BYTES * slot; }
static inline uint64_t pf_seg_request_ring(uint32_t n_workers) {
    return pf_align(PF_PAGE + (uint64_t)PF_SLOT_BYTES * n_workers, PF_PAGE);
}
static inline uint64_t pf_seg_response_ring(uint32_t n_workers, uint64_t request_bytes, uint64_t response_bytes,
                                            uint32_t slot) {
    uint64_t first = pf_align(pf_seg_request_ring(n_workers) + pf_ring_region(request_bytes), PF_PAGE);
    return first + slot * pf_align(pf_ring_region(response_bytes), PF_PAGE);
}

/* -- records: a 12-byte header, then the body of its type ------------------ */
#define PF_SLOT_SHIFT 48
#define PF_REQUEST_ID(slot, n) (((uint64_t)(slot) << PF_SLOT_SHIFT) | ((n) & ((1ull << PF_SLOT_SHIFT) - 1)))

enum pf_record_type {
    PF_REC_SUBMIT = 1,      /* worker -> engine */
    PF_REC_ABORT = 2,       /* worker -> engine: the header alone */
    PF_REC_TOKENS = 3,      /* engine -> worker */
    PF_REC_FINISH = 4,
    PF_REC_ERROR = 5,
    PF_REC_ADMITTED = 6,    /* the header alone */
    PF_REC_PROMPT_LOGPROBS = 7,  /* engine -> worker: the TOKENS layout, has = 3 */
    PF_REC_EMBEDDING = 8,   /* engine -> worker: u32 n, then f32 values[n] (n = hidden size) */
};

enum pf_finish_reason { PF_FINISH_STOP = 1, PF_FINISH_LENGTH = 2, PF_FINISH_ABORT = 3 };
enum pf_error_kind {            /* pyforge/engine/errors.py: ErrorKind */
    PF_ERROR_BAD_REQUEST = 1, PF_ERROR_OVERLOADED = 2, PF_ERROR_OUT_OF_MEMORY = 3,
    PF_ERROR_SHUTTING_DOWN = 4, PF_ERROR_INTERNAL = 5,
};

#pragma pack(push, 1)
typedef struct {
    uint8_t type;           /* pf_record_type */
    uint8_t flags;          /* 0 */
    uint16_t worker;        /* SUBMIT: the submitting slot; else 0 */
    uint64_t request_id;
} pf_record_header;

/* SUBMIT: pf_submit, then i32 stop_token_ids[n_stop], i32 prompt_ids[n_prompt],
 * u32 n_ext, n_ext bytes of extension entries back to back, each a
 * pf_extension then its n value bytes (an engine refuses a tag it does not know).
 * An entry is sent only when its feature is set. */
typedef enum {
    PF_EXT_GRAMMAR = 1,          /* an llguidance grammar, UTF-8 */
    PF_EXT_LOGIT_BIAS = 2,       /* i32 token_ids[k] then f64 biases[k]: n = 12 k */
    PF_EXT_MIN_TOKENS = 3,       /* u32: EOS and stop ids banned before this many tokens */
    PF_EXT_PROMPT_LOGPROBS = 4,  /* u32: top alternatives per prompt token; PROMPT_LOGPROBS replies */
    PF_EXT_POOLING = 5,          /* u32 pf_pooling: an embedding request; one EMBEDDING reply, no TOKENS */
} pf_extension_tag;
enum pf_pooling { PF_POOLING_MEAN = 1, PF_POOLING_LAST = 2 };
typedef struct {
    uint16_t tag;           /* pf_extension_tag */
    uint16_t flags;         /* 0 */
    uint32_t n;             /* value bytes that follow */
} pf_extension;
#define PF_PARAMS_VERSION 1
#define PF_PARAM_SEED_SET 1u
#define PF_PARAM_IGNORE_EOS 2u
#define PF_PARAM_LOGPROBS_SET 4u
typedef struct {
    double temperature;         /* 0: greedy */
    double top_p;               /* (0, 1] */
    double min_p;
    double repetition_penalty;  /* 1: off */
    double presence_penalty;
    double frequency_penalty;
    int32_t top_k;              /* 0 or -1: off */
    uint32_t max_tokens;
    uint64_t seed;              /* with PF_PARAM_SEED_SET */
    uint8_t flags;              /* PF_PARAM_* */
    uint8_t logprobs;           /* top logprobs per token, with PF_PARAM_LOGPROBS_SET */
    uint16_t pad;               /* 0 */
} pf_params;

typedef struct {
    uint32_t n_prompt;
    uint16_t params_version;    /* PF_PARAMS_VERSION */
    uint16_t n_stop;
    pf_params params;
} pf_submit;

/* TOKENS: pf_tokens, i32 token_ids[n], then f32 logprobs[n] if has & 1,
 * then i32 top_ids[n * n_top] and f32 top_logprobs[n * n_top] if has & 2.
 * PROMPT_LOGPROBS: the same, has = 3; prompt tokens from the second on. */
typedef struct {
    uint32_t n;
    uint16_t n_top;
    uint16_t has;
} pf_tokens;

typedef struct {
    uint32_t prompt_tokens;
    uint32_t completion_tokens;
    uint32_t cached_tokens;     /* prompt tokens served from the prefix cache */
    uint8_t finish_reason;      /* pf_finish_reason */
} pf_finish;

/* ERROR: pf_error, then n bytes of UTF-8 message. */
typedef struct {
    uint16_t kind;              /* pf_error_kind: a worker maps it to an HTTP status */
    uint32_t n;
} pf_error;
#pragma pack(pop)

static_assert(sizeof(pf_record_header) == 12, "record header is 12 bytes");
static_assert(sizeof(pf_params) == 68, "SUBMIT params (version 1) are 68 bytes");
static_assert(sizeof(pf_submit) == 76, "SUBMIT fixed part is 76 bytes");
static_assert(sizeof(pf_tokens) == 8 && sizeof(pf_finish) == 13 && sizeof(pf_error) == 6, "record bodies");
static_assert(sizeof(pf_extension) == 8, "SUBMIT extension entry header is 8 bytes");

#endif /* PYFORGE_IPC_H */

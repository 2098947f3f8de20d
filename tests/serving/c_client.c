/* A pyforge engine client in C, from native/pyforge_ipc.h alone: attach to a live
 * segment, claim a worker slot, submit one greedy request, print its replies.
 *
 *   c_client SEGMENT MAX_TOKENS PROMPT_ID...
 *
 * Prints "admitted", one "token ID" line per token, then "finish REASON PROMPT
 * COMPLETION" (exit 0) or "error KIND MESSAGE" (exit 2; pf_error_kind). Built and run by
 * tests/serving/test_engine_process.py against a real engine process.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pyforge_ipc.h"

#define SECONDS 1000000000ull

static void die(const char *what) {
    fprintf(stderr, "c_client: %s\n", what);
    exit(1);
}

static uint32_t u32_at(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t u64_at(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static unsigned char *map_segment(const char *name) {
    char path[300];
    snprintf(path, sizeof path, "/%s", name);
    int fd = shm_open(path, O_RDWR, 0);
    if (fd < 0) die("cannot open the segment");
    struct stat st;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < PF_PAGE) die("the segment is too small");
    unsigned char *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) die("cannot map the segment");
    if (memcmp(base + PF_SEG_OFF_MAGIC, PF_SEG_MAGIC, 8) != 0) die("not a pyforge segment");
    if (u32_at(base + PF_SEG_OFF_VERSION) != PF_SEG_VERSION) die("another segment version");
    return base;
}

static uint32_t claim_slot(unsigned char *base, uint32_t n_workers) {
    for (uint32_t s = 0; s < n_workers; s++)
        if (pf_shm_cas_u32(base + pf_seg_slot(s) + PF_SLOT_OFF_PID, 0, (uint32_t)getpid())) {
            pf_shm_add_i64(base + pf_seg_slot(s) + PF_SLOT_OFF_CLAIMS, 1);
            return s;
        }
    die("no free worker slot");
    return 0;
}

static void put_message(pf_ring *ring, const void *msg, uint64_t len) {
    uint64_t deadline = pf_now_ns() + 5 * SECONDS;
    int rc;
    while ((rc = pf_ring_lock(ring, deadline)) == PF_RING_INTR) {}
    if (rc != PF_RING_OK) die("cannot lock the request ring");
    while ((rc = pf_ring_write_frame(ring, PF_FRAME_START | PF_FRAME_END, len, msg, len, deadline)) == PF_RING_INTR) {}
    pf_ring_unlock(ring);
    if (rc != PF_RING_OK) die("cannot write the request");
}

/* The next whole message of the ring into buf (small messages only: one frame). */
static uint64_t get_message(pf_ring *ring, unsigned char *buf, uint64_t size) {
    uint64_t deadline = pf_now_ns() + 30 * SECONDS;
    pf_frame f;
    for (;;) {
        int rc = pf_ring_peek(ring, &f);
        if (rc == PF_RING_OK) break;
        if (rc != PF_RING_EMPTY) die("the response ring is corrupt");
        rc = pf_ring_wait_readable(ring, deadline);
        if (rc == PF_RING_TIMEOUT) die("no reply within 30 s");
    }
    if ((f.flags & (PF_FRAME_START | PF_FRAME_END)) != (PF_FRAME_START | PF_FRAME_END) || f.data_len > size)
        die("a reply larger than this client reads");
    pf_ring_read(ring, &f, buf);
    pf_ring_consume(ring, &f);
    return f.data_len;
}

static uint64_t submit_message(unsigned char *msg, uint32_t slot, uint64_t request_id, uint32_t max_tokens,
                               int n_prompt, char **prompt) {
    pf_record_header h = {PF_REC_SUBMIT, 0, (uint16_t)slot, request_id};
    pf_submit s = {(uint32_t)n_prompt, PF_PARAMS_VERSION, 0,
                   {0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0, max_tokens, 0, PF_PARAM_IGNORE_EOS, 0, 0}};
    uint64_t at = 0;
    memcpy(msg + at, &h, sizeof h); at += sizeof h;
    memcpy(msg + at, &s, sizeof s); at += sizeof s;
    for (int i = 0; i < n_prompt; i++) {
        int32_t id = (int32_t)atoi(prompt[i]);
        memcpy(msg + at, &id, 4); at += 4;
    }
    uint32_t n_ext = 0;
    memcpy(msg + at, &n_ext, 4);
    return at + 4;
}

#define GOING_ON (-1)

/* Print one batch of records; GOING_ON while the request goes on, else the exit status. */
static int print_records(const unsigned char *p, uint64_t len, uint64_t request_id) {
    uint64_t at = 0;
    while (at + sizeof(pf_record_header) <= len) {
        pf_record_header h;
        memcpy(&h, p + at, sizeof h);
        at += sizeof h;
        int mine = h.request_id == request_id;
        if (h.type == PF_REC_ADMITTED) {
            if (mine) printf("admitted\n");
        } else if (h.type == PF_REC_TOKENS) {
            pf_tokens t;
            memcpy(&t, p + at, sizeof t);
            at += sizeof t;
            for (uint32_t i = 0; i < t.n && mine; i++) printf("token %d\n", (int32_t)u32_at(p + at + 4 * i));
            at += 4ull * t.n + ((t.has & 1) ? 4ull * t.n : 0) + ((t.has & 2) ? 8ull * t.n * t.n_top : 0);
        } else if (h.type == PF_REC_FINISH) {
            pf_finish f;
            memcpy(&f, p + at, sizeof f);
            at += sizeof f;
            static const char *reasons[] = {"?", "stop", "length", "abort"};
            if (mine) {
                printf("finish %s %u %u\n", reasons[f.finish_reason <= 3 ? f.finish_reason : 0], f.prompt_tokens,
                       f.completion_tokens);
                return 0;
            }
        } else if (h.type == PF_REC_ERROR) {
            pf_error e;
            memcpy(&e, p + at, sizeof e);
            at += sizeof e;
            if (mine) {
                printf("error %u %.*s\n", e.kind, (int)e.n, (const char *)(p + at));
                return 2;
            }
            at += e.n;
        } else {
            die("an unknown record type");
        }
    }
    return GOING_ON;
}

/* "facts MAX_MODEL_LEN VOCAB_SIZE HIDDEN_SIZE EOS_ID...": what the engine decided */
static void print_facts(const unsigned char *base) {
    uint32_t n_eos = u32_at(base + PF_SEG_OFF_N_EOS);
    if (n_eos > PF_MAX_EOS_IDS) die("more end-of-generation ids than the header holds");
    printf("facts %u %u %u", u32_at(base + PF_SEG_OFF_MAX_MODEL_LEN), u32_at(base + PF_SEG_OFF_VOCAB_SIZE),
           u32_at(base + PF_SEG_OFF_HIDDEN_SIZE));
    for (uint32_t i = 0; i < n_eos; i++) printf(" %u", u32_at(base + PF_SEG_OFF_EOS_IDS + 4 * i));
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc < 4) die("usage: c_client SEGMENT MAX_TOKENS PROMPT_ID...");
    unsigned char *base = map_segment(argv[1]);
    uint32_t n_workers = u32_at(base + PF_SEG_OFF_N_WORKERS);
    uint64_t request_bytes = u64_at(base + PF_SEG_OFF_REQUEST_RING_BYTES);
    uint64_t response_bytes = u64_at(base + PF_SEG_OFF_RESPONSE_RING_BYTES);
    if (pf_shm_load_u32(base + PF_SEG_OFF_ENGINE_STATUS) != PF_ENGINE_READY) die("the engine is not ready");
    if (argc - 3 >= (int)pf_shm_load_u32(base + PF_SEG_OFF_MAX_MODEL_LEN)) die("the prompt is too long");
    print_facts(base);

    uint32_t slot = claim_slot(base, n_workers);
    pf_ring requests, replies;
    if (pf_ring_init(&requests, base + pf_seg_request_ring(n_workers), pf_ring_region(request_bytes), 0) ||
        pf_ring_init(&replies, base + pf_seg_response_ring(n_workers, request_bytes, response_bytes, slot),
                     pf_ring_region(response_bytes), 0))
        die("the rings do not attach");
    int64_t claims = pf_shm_load_i64(base + pf_seg_slot(slot) + PF_SLOT_OFF_CLAIMS);
    uint64_t request_id = PF_REQUEST_ID(slot, ((uint64_t)claims & 0xFFFF) << 32);

    static unsigned char msg[1 << 16];
    if (argc - 3 > (int)((sizeof msg - 100) / 4)) die("too many prompt ids for this client");
    put_message(&requests, msg, submit_message(msg, slot, request_id, (uint32_t)atoi(argv[2]), argc - 3, argv + 3));
    int status = GOING_ON;
    while (status == GOING_ON) {
        uint64_t n = get_message(&replies, msg, sizeof msg);
        status = print_records(msg, n, request_id);
    }
    pf_shm_cas_u32(base + pf_seg_slot(slot) + PF_SLOT_OFF_PID, (uint32_t)getpid(), 0);
    return status;
}

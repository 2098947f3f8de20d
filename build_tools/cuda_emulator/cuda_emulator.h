/* Runs CUDA kernel source on the CPU: the runtime for build_tools/cuda_emulator.
 *
 * Force-included (g++ -include) before a .cu file compiled as C++. Each CUDA
 * thread of a block is a fiber with its own stack; one OS thread runs the
 * fibers of one block in turn, blocks one after another. A fiber runs until
 * it must wait (__syncthreads, a warp shuffle) and then hands over, so the
 * kernel's own code, barriers and warp exchanges execute as written:
 *   __syncthreads      waits for every thread of the block that has not exited;
 *   __shfl_*_sync      waits for every lane its mask names, and fails the launch
 *                      when one of them has exited or does not exist, or when
 *                      lanes of a warp meet with different masks (undefined on
 *                      a GPU, where it hangs or reads garbage);
 *   a pass in which no waiting fiber can go on fails the launch (a deadlock).
 * The scheduler resumes a waiting fiber only once its wait is over, so a
 * shuffle costs each lane about one switch there and back.
 * __shared__ variables are statics: one block runs at a time, so each block
 * sees them alone. The scheduler visits a block's threads in an order of its
 * own (a permutation drawn per block, the same on every run), not thread 0
 * first, so code that reads another thread's write without a barrier or
 * shuffle between them tends to read stale data and fail its test. What this
 * cannot show: every race (the order is one of many), memory faults (a stray
 * pointer is the host's), timing.
 */
#ifndef PYFORGE_CUDA_EMULATOR_H
#define PYFORGE_CUDA_EMULATOR_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static

struct dim3 {
    unsigned int x, y, z;
};
typedef dim3 uint3;
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

namespace pf_emu {

enum { STACK_BYTES = 64 << 10, MAX_THREADS = 1024, MAX_WARPS = MAX_THREADS / 32 };

struct Fiber {
    void *sp;               /* saved stack pointer (x86-64) */
#if !defined(__x86_64__)
    ucontext_t ctx;
#endif
    unsigned char *stack;   /* STACK_BYTES, a guard page below */
    dim3 tid;
    unsigned linear;        /* tid.x + tid.y * bx + tid.z * bx * by */
    bool done;
    int wait;               /* RUNNABLE, AT_BARRIER or AT_SHUFFLE */
    unsigned sync_gen;      /* AT_BARRIER: the generation it waits to see pass */
    unsigned shuffles;      /* warp shuffles this fiber has entered; AT_SHUFFLE: in number shuffles - 1 */
};

enum { RUNNABLE, AT_BARRIER, AT_SHUFFLE };

/* The lanes of a warp meet at shuffle k (the k-th each enters) in turn: a lane
 * cannot enter k + 1 before all named lanes entered k, so one round is open
 * at a time, and values of k and k + 1 live in value[k & 1]. */
struct Warp {
    uint64_t value[2][32];
    unsigned round;         /* the open shuffle round */
    unsigned mask;          /* its mask (the first entrant's) */
    int entered;            /* lanes in it so far */
    unsigned exited;        /* lanes that have exited or do not exist */
};

struct State {
    std::mutex lock;        /* ctypes drops the GIL: one launch at a time */
    Fiber fibers[MAX_THREADS];
    int order[MAX_THREADS];  /* the scheduler's visiting order of this block's threads */
    Warp warps[MAX_WARPS];
    unsigned char *stacks = nullptr;
    int n_threads = 0, live = 0, arrived = 0, current = 0;
    unsigned barrier_gen = 0;
    char error[512];
    bool failed = false;
    void *scheduler_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t scheduler_ctx;
#endif
    void (*entry)(void **) = nullptr;
    void **args = nullptr;
    dim3 grid, block, block_idx;
    const dim3 *thread_idx = nullptr;
};

static State g;

}  // namespace pf_emu

#define threadIdx (*::pf_emu::g.thread_idx)
#define blockIdx (::pf_emu::g.block_idx)
#define blockDim (::pf_emu::g.block)
#define gridDim (::pf_emu::g.grid)

/* -- context switch -------------------------------------------------------- */
#if defined(__x86_64__)
/* pf_emu_switch(&save_sp, load_sp): push the callee-saved registers and the
 * FP control words, save rsp, load the other stack, pop its registers, ret. */
extern "C" void pf_emu_switch(void **save_sp, void *load_sp);
__asm__(
    ".text\n"
    ".hidden pf_emu_switch\n"
    ".globl pf_emu_switch\n"
    ".type pf_emu_switch,@function\n"
    "pf_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size pf_emu_switch, .-pf_emu_switch\n");
#endif

namespace pf_emu {

static void fail(const char *fmt, unsigned a = 0, unsigned b = 0, unsigned c = 0);

static inline void to_scheduler(Fiber &f) {
#if defined(__x86_64__)
    pf_emu_switch(&f.sp, g.scheduler_sp);
#else
    swapcontext(&f.ctx, &g.scheduler_ctx);
#endif
}

static inline void to_fiber(Fiber &f) {
    g.current = (int)(&f - g.fibers);
    g.thread_idx = &f.tid;
#if defined(__x86_64__)
    pf_emu_switch(&g.scheduler_sp, f.sp);
#else
    swapcontext(&g.scheduler_ctx, &f.ctx);
#endif
}

static inline Fiber &me() { return g.fibers[g.current]; }

static void release_barrier_if_complete() {
    if (g.arrived > 0 && g.arrived == g.live) {
        g.arrived = 0;
        g.barrier_gen++;
    }
}

static void fiber_main() {
    Fiber &f = me();
    g.entry(g.args);
    f.done = true;
    g.live--;
    release_barrier_if_complete();
    Warp &w = g.warps[f.linear >> 5];
    const unsigned bit = 1u << (f.linear & 31);
    w.exited |= bit;
    if (w.entered > 0 && (w.mask & bit))
        fail("shuffle %u of warp %u: lane %u, named in the mask, exits instead", w.round, f.linear >> 5,
             f.linear & 31);
    to_scheduler(f);
    __builtin_unreachable();  /* the scheduler never resumes a finished fiber */
}

static void fail(const char *fmt, unsigned a, unsigned b, unsigned c) {
    if (!g.failed) snprintf(g.error, sizeof g.error, fmt, a, b, c);
    g.failed = true;
    for (;;) to_scheduler(me());  /* the scheduler stops at once */
}

static bool allocate_stacks() {
    if (g.stacks) return true;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), each = STACK_BYTES + page;
    void *p = mmap(nullptr, each * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return false;
    g.stacks = (unsigned char *)p;
    for (int i = 0; i < MAX_THREADS; i++) {
        mprotect(g.stacks + i * each, page, PROT_NONE);  /* an overflow faults instead of corrupting */
        g.fibers[i].stack = g.stacks + i * each + page;
    }
    return true;
}

static void start_fiber(Fiber &f) {
#if defined(__x86_64__)
    /* The frame pf_emu_switch pops: FP control words, six registers, then
     * the return address (fiber_main), with rsp = 8 mod 16 at its entry. */
    uint64_t *top = (uint64_t *)(f.stack + STACK_BYTES);
    uint32_t fp_words[2];
    __asm__ volatile("stmxcsr %0\n fnstcw %1" : "=m"(fp_words[0]), "=m"(fp_words[1]));
    *--top = 0;                          /* fiber_main's (never used) return address */
    *--top = (uint64_t)(void *)fiber_main;
    for (int i = 0; i < 6; i++) *--top = 0;
    --top;
    memcpy(top, fp_words, 8);
    f.sp = top;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = STACK_BYTES;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#endif
}

static bool wait_over(const Fiber &f) {
    switch (f.wait) {
    case AT_BARRIER: return f.sync_gen != g.barrier_gen;
    case AT_SHUFFLE: return g.warps[f.linear >> 5].round >= f.shuffles;
    default: return true;
    }
}

/* A Fisher-Yates permutation of 0..n-1 from a generator seeded by the block index. */
static void shuffle_order(int n) {
    uint64_t x = 0x9E3779B97F4A7C15ull ^ (((uint64_t)g.block_idx.z << 42) | ((uint64_t)g.block_idx.y << 21) |
                                           g.block_idx.x);
    for (int i = 0; i < n; i++) g.order[i] = i;
    for (int i = n - 1; i > 0; i--) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;  /* xorshift64 */
        const int j = (int)(x % (uint64_t)(i + 1));
        const int t = g.order[i];
        g.order[i] = g.order[j], g.order[j] = t;
    }
}

static bool run_block() {
    const int n = g.n_threads;
    memset(g.warps, 0, sizeof(Warp) * ((n + 31) / 32));
    if (n % 32) g.warps[n / 32].exited = ~0u << (n % 32);  /* lanes past the block's end */
    for (int i = 0; i < n; i++) {
        Fiber &f = g.fibers[i];
        f.linear = (unsigned)i;
        f.tid = dim3{i % g.block.x, (i / g.block.x) % g.block.y, i / (g.block.x * g.block.y)};
        f.done = false;
        f.wait = RUNNABLE;
        f.shuffles = 0;
        start_fiber(f);
    }
    shuffle_order(n);
    g.live = n;
    g.arrived = 0;
    while (g.live > 0) {
        bool resumed = false;
        for (int i = 0; i < n && !g.failed; i++) {
            Fiber &f = g.fibers[g.order[i]];
            if (f.done || !wait_over(f)) continue;
            f.wait = RUNNABLE;
            resumed = true;
            to_fiber(f);
        }
        if (g.failed) return false;
        if (!resumed) {
            snprintf(g.error, sizeof g.error,
                     "deadlock in block (%u, %u, %u): %d threads wait at a __syncthreads or shuffle "
                     "that the others do not reach",
                     g.block_idx.x, g.block_idx.y, g.block_idx.z, g.live);
            return false;
        }
    }
    return true;
}

/* The launch: every block of grid, in order. 0 on success, else -1 and error. */
static int launch(void (*entry)(void **), const unsigned *grid, const unsigned *block, void **args, char *error,
                  int error_len) {
    std::lock_guard<std::mutex> hold(g.lock);
    const unsigned long threads = (unsigned long)block[0] * block[1] * block[2];
    /* CUDA's limits: block <= 1024 threads (z <= 64), grid y and z <= 65535, x < 2^31 */
    if (threads == 0 || threads > MAX_THREADS || block[2] > 64 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 ||
        grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
        snprintf(error, error_len, "bad launch: grid (%u, %u, %u), block (%u, %u, %u)", grid[0], grid[1], grid[2],
                 block[0], block[1], block[2]);
        return -1;
    }
    if (!allocate_stacks()) {
        snprintf(error, error_len, "cannot map %d fiber stacks", (int)MAX_THREADS);
        return -1;
    }
    g.entry = entry;
    g.args = args;
    g.grid = dim3{grid[0], grid[1], grid[2]};
    g.block = dim3{block[0], block[1], block[2]};
    g.n_threads = (int)threads;
    g.failed = false;
    for (unsigned z = 0; z < grid[2]; z++)
        for (unsigned y = 0; y < grid[1]; y++)
            for (unsigned x = 0; x < grid[0]; x++) {
                g.block_idx = dim3{x, y, z};
                if (!run_block()) {
                    snprintf(error, error_len, "%s", g.error);
                    return -1;
                }
            }
    return 0;
}

/* One warp exchange: every lane in mask publishes v, then reads lane src_of(lane)'s. */
template <typename T, typename Src>
static T shuffle(unsigned mask, T v, Src src_of) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    Fiber &f = me();
    const unsigned lane = f.linear & 31, warp = f.linear >> 5, k = f.shuffles++;
    Warp &w = g.warps[warp];
    if (!(mask >> lane & 1)) fail("lane %u shuffles with a mask (0x%x) that leaves it out", lane, mask);
    if (mask & w.exited)
        fail("shuffle %u of warp %u: a lane named in the mask (0x%x) has exited or does not exist", k, warp, mask);
    if (w.entered == 0) w.mask = mask;
    else if (w.mask != mask) fail("warp %u meets at one shuffle with masks 0x%x and 0x%x", warp, w.mask, mask);
    memcpy(&w.value[k & 1][lane], &v, sizeof(T));
    if (++w.entered == __builtin_popcount(mask)) {  /* the last in: the round is over, open the next */
        w.entered = 0;
        w.round = k + 1;
    } else {
        f.wait = AT_SHUFFLE;
        to_scheduler(f);
    }
    const unsigned src = src_of(lane);
    T out = v;  /* a source outside the warp or the segment: the lane's own value, as on the GPU */
    if (src < 32) {
        if (!(mask >> src & 1)) fail("lane %u reads lane %u, which the mask (0x%x) leaves out", lane, src, mask);
        memcpy(&out, &w.value[k & 1][src], sizeof(T));
    }
    return out;
}

}  // namespace pf_emu

/* -- CUDA built-ins -------------------------------------------------------- */
static inline void __syncthreads() {
    using namespace pf_emu;
    Fiber &f = me();
    f.sync_gen = g.barrier_gen;
    g.arrived++;
    release_barrier_if_complete();
    if (f.sync_gen == g.barrier_gen) {
        f.wait = AT_BARRIER;
        to_scheduler(f);
    }
}

template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return pf_emu::shuffle(mask, v, [=](unsigned lane) {
        const unsigned src = lane ^ (unsigned)lane_mask;
        return (src / width == lane / width) ? src : lane;
    });
}

template <typename T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return pf_emu::shuffle(mask, v, [=](unsigned lane) {
        const unsigned src = lane + delta;
        return (src / width == lane / width) ? src : lane;
    });
}

template <typename T>
static inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return pf_emu::shuffle(mask, v, [=](unsigned lane) { return lane / width * width + (unsigned)src_lane % width; });
}

static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename T>
static inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
static inline T max(T a, T b) { return a > b ? a : b; }

#endif

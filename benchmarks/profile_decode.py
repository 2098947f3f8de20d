"""Where a decode step's time goes: native kernels vs Python glue.

    python benchmarks/profile_decode.py [--format Q4_K_M] [--threads 2] [--batch 1] [--steps 64] [--context 64]
                                        [--kv-cache-dtype auto]
    python benchmarks/profile_decode.py --attention-prefill 512 [--threads 2] [--reps 20]
    python benchmarks/profile_decode.py --attention-decode 2048 [--batch 1] [--threads 2] [--reps 20]

Wraps every CPU-backend primitive and the sampler's native call with a timer
(about 0.1 µs each), runs decode steps, and reports the share of the step spent
outside native code: Python scheduling, batch building, wrappers, allocation.

--attention-prefill N times the paged-attention kernel alone on one N-token
prompt of TinyLlama's shape (one layer), each path (PYFORGE_ATTN_TILES: per-row,
tiles on AVX2, tiles on the widest kernels), on 1 and --threads threads, best
of --reps calls, with GFLOP/s over the causal work (4 x heads x head_dim per
query-key pair).

--attention-decode L times one decode step's attention alone (--batch rows, each
at context L) over TinyLlama's 22 layers, each layer its own K/V pool so the
caches stream from memory as in a real step, per --kv-cache-dtype (f32, f16,
bf16, q8_0): best of --reps steps, the cache bytes read and the bandwidth.
"""
import argparse
import functools
import os
import time

import numpy as np

from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.native import ops
from pyforge.native import sampler as native_sampler
from pyforge.synthetic import ensure_model

PRIMITIVES = ("embed", "matmul", "rmsnorm", "rope", "add_bias", "add_inplace", "silu_mul", "kv_store", "attention")


def timed(fn, totals, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def instrument(engine, totals):
    for name in PRIMITIVES:
        setattr(engine.backend, name, timed(getattr(engine.backend, name), totals, name))
    native_sampler.sample = timed(native_sampler.sample, totals, "sample")


# TinyLlama-1.1B's attention: query heads, kv heads, head_dim; the cache's block size
ATTN_SHAPE = (32, 4, 64, 16)
ATTN_PATHS = (("per-row", "0"), ("tiles AVX2", "avx2"), ("tiles", ""))


def bench_attention_prefill(n_tok, threads, reps):
    n_heads, n_kv, hd, bs = ATTN_SHAPE
    rng = np.random.default_rng(0)
    n_blocks = -(-n_tok // bs)
    k_cache = rng.standard_normal((n_blocks, n_kv, bs, hd), dtype=np.float32)
    v_cache = rng.standard_normal((n_blocks, n_kv, bs, hd), dtype=np.float32)
    tables = rng.permutation(n_blocks).astype(np.int32)[None, :]
    q = rng.standard_normal((n_tok, n_heads, hd), dtype=np.float32)
    out = np.empty_like(q)
    lens, qsl = np.array([n_tok], np.int32), np.array([0, n_tok], np.int32)
    flops = 4 * n_heads * hd * n_tok * (n_tok + 1) / 2
    saved = os.environ.get("PYFORGE_ATTN_TILES")
    print(f"paged attention, one {n_tok}-token prompt, {n_heads} heads / {n_kv} kv heads, head_dim {hd}, "
          f"best of {reps}")
    try:
        for t in sorted({1, threads}):
            base = None
            for name, env in ATTN_PATHS:
                os.environ["PYFORGE_ATTN_TILES"] = env
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, hd**-0.5, out, t)
                    best = min(best, time.perf_counter() - t0)
                base = base or best
                print(f"  {t} thread{'s' if t > 1 else ' '}  {name:10s} {1e3 * best:7.2f} ms  "
                      f"{flops / best / 1e9:6.1f} GFLOP/s  {base / best:5.2f}x")
    finally:
        if saved is None:
            os.environ.pop("PYFORGE_ATTN_TILES", None)
        else:
            os.environ["PYFORGE_ATTN_TILES"] = saved


N_LAYERS = 22  # TinyLlama-1.1B


def bench_attention_decode(n_ctx, batch, threads, reps):
    n_heads, n_kv, hd, bs = ATTN_SHAPE
    rng = np.random.default_rng(0)
    per_seq = -(-n_ctx // bs)
    n_blocks = per_seq * batch
    tables = rng.permutation(n_blocks).astype(np.int32).reshape(batch, per_seq)
    lens, qsl = np.full(batch, n_ctx, np.int32), np.arange(batch + 1, dtype=np.int32)
    q = rng.standard_normal((batch, n_heads, hd), dtype=np.float32)
    out = np.empty_like(q)
    print(f"paged attention, one decode step of {batch} row(s) at context {n_ctx}, {N_LAYERS} layers x "
          f"{n_heads} heads / {n_kv} kv heads, head_dim {hd}, {threads} threads, best of {reps}")
    base = None
    for kv_dtype in ops.KV_DTYPES:
        shape, dtype = ops.kv_cache_shape(n_blocks, n_kv, bs, hd, kv_dtype)
        x = rng.standard_normal((n_blocks * n_kv * bs, hd), dtype=np.float32)
        layers = [(ops.kv_encode(x, kv_dtype).reshape(shape), ops.kv_encode(x[::-1].copy(), kv_dtype).reshape(shape))
                  for _ in range(N_LAYERS)]
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for k_cache, v_cache in layers:
                ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, hd**-0.5, out, threads,
                                    kv_dtype=kv_dtype)
            best = min(best, time.perf_counter() - t0)
        read = 2 * N_LAYERS * batch * n_ctx * n_kv * ops.kv_row_bytes(kv_dtype, hd)
        base = base or best
        print(f"  {kv_dtype:5s} {1e3 * best:7.2f} ms/step  {read / 2**20:7.1f} MiB read  "
              f"{read / best / 1e9:5.1f} GB/s  {base / best:5.2f}x  "
              f"{2 * N_LAYERS * n_kv * ops.kv_row_bytes(kv_dtype, hd) / 1024:.1f} KiB/token")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=64, help="prompt tokens before the timed decode steps")
    ap.add_argument("--kv-cache-dtype", default="auto", help="the engine's KV cache (auto: f16 for quantized weights)")
    ap.add_argument("--attention-prefill", type=int, default=0, metavar="N",
                    help="instead: time the attention kernel alone on an N-token prompt, per path")
    ap.add_argument("--attention-decode", type=int, default=0, metavar="L",
                    help="instead: time one decode step's attention alone at context L, per KV cache dtype")
    ap.add_argument("--reps", type=int, default=20, help="calls per path with --attention-prefill (best is kept)")
    args = ap.parse_args()
    if args.attention_decode:
        bench_attention_decode(args.attention_decode, args.batch, args.threads, args.reps)
        return
    if args.attention_prefill:
        bench_attention_prefill(args.attention_prefill, args.threads, args.reps)
        return
    n_ctx = args.context + args.steps + 16
    engine = Engine(str(ensure_model("tinyllama-1.1b", args.format)), n_threads=args.threads,
                    max_model_len=n_ctx, kv_cache_tokens=max(4096, args.batch * n_ctx),
                    max_num_batched_tokens=max(512, args.context), kv_cache_dtype=args.kv_cache_dtype)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True)
    for _ in range(args.batch):
        engine.add_request(rng.integers(100, 30000, args.context).tolist(), params)
    for _ in range(4):                      # prefill + warm-up decode steps
        engine.step()
    totals = {}
    instrument(engine, totals)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = time.perf_counter() - t0
    native = sum(totals.values())
    print(f"tinyllama-1.1b {args.format}, batch {args.batch}, {args.threads} threads, {args.steps} decode steps "
          f"after {args.context} context tokens, {engine.backend.kv_dtype} KV cache")
    print(f"step: {1e3 * wall / args.steps:.2f} ms; native kernels {1e3 * native / args.steps:.2f} ms; "
          f"outside native code {100 * (wall - native) / wall:.1f}%")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12s} {1e3 * t / args.steps:7.3f} ms/step  {100 * t / wall:5.1f}%")


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: native kernels vs Python glue.

    python benchmarks/profile_decode.py [--format Q4_K_M] [--threads 2] [--batch 1] [--steps 64] [--context 64]

Wraps every CPU-backend primitive and the sampler's native call with a timer
(about 0.1 µs each), runs decode steps, and reports the share of the step spent
outside native code: Python scheduling, batch building, wrappers, allocation.
"""
import argparse
import functools
import time

import numpy as np

from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=64, help="prompt tokens before the timed decode steps")
    args = ap.parse_args()
    n_ctx = args.context + args.steps + 16
    engine = Engine(str(ensure_model("tinyllama-1.1b", args.format)), n_threads=args.threads,
                    max_model_len=n_ctx, kv_cache_tokens=max(4096, args.batch * n_ctx),
                    max_num_batched_tokens=max(512, args.context))
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
          f"after {args.context} context tokens")
    print(f"step: {1e3 * wall / args.steps:.2f} ms; native kernels {1e3 * native / args.steps:.2f} ms; "
          f"outside native code {100 * (wall - native) / wall:.1f}%")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12s} {1e3 * t / args.steps:7.3f} ms/step  {100 * t / wall:5.1f}%")


if __name__ == "__main__":
    main()

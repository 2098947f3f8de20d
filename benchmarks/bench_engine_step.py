"""Engine host time per decode step against the number of running sequences.

    python benchmarks/bench_engine_step.py [--seqs 1 16 64 256] [--steps 200] [--repeats 5] [--modes null cuda]

The serving engine loop's step (`EngineLoop.step` + the flush of its replies,
over a real shared-memory segment whose response ring is emptied between
steps, untimed) in the steady state, every sequence decoding one token, timed
whole and split: the forward pass (with the greedy pick, where the backend
samples greedy steps itself: CUDA), the native sampler call, publishing (the
request table and the TOKENS / FINISH records) and the rest of `Engine.step`,
the "step core" (scheduling, batch building, finish checks, per-token
bookkeeping). core+pub/seq is what issue 15 compiles. Modes:

  null   the do-nothing model (models/null.py) on the CPU backend: no forward pass
  cuda   the small-k synthetic model on the CUDA backend over a no-op CuPy
         (bench_cuda_host.null_cupy: kernels, copies and cuBLAS calls do nothing),
         so the forward column is the model's own host time per step

Each (mode, seqs) cell runs --repeats rounds of --steps steps and reports the
medians of the rounds, in microseconds per step; core/seq is the step core
divided by the sequences. The load average is printed beside: the numbers are
only comparable between runs on the same, equally loaded, machine.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description  # noqa: E402

MODEL = ("small-k", "F16")
PROMPT_TOKENS = 8


class Timed:
    """Wraps a callable and adds its wall time to `seconds`."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def make_engine(mode, n_seqs, steps):
    from pyforge.engine.engine import Engine
    from pyforge.synthetic import ensure_model
    path = str(ensure_model(*MODEL))
    context = PROMPT_TOKENS + steps + 16
    options = dict(n_threads=1, max_model_len=context + 1, max_num_seqs=n_seqs,
                   max_num_batched_tokens=max(n_seqs * PROMPT_TOKENS, 256),
                   kv_cache_tokens=n_seqs * (context + 16), enable_prefix_caching=False)
    if mode == "null":
        engine = Engine(path, null_model=True, **options)
    else:
        engine = Engine(path, device="cuda", **options)
    engine.sampler.all_logprobs = False     # as the serving loop runs it
    return engine


def loop_step(loop, ring):
    """One serving step; its replies read off the response ring (untimed): seconds."""
    start = time.perf_counter()
    loop.step()
    loop.replies.flush()
    seconds = time.perf_counter() - start
    ring.get_all()
    return seconds


def round_times(loop, ring, n_seqs, steps, ids):
    """(loop, step, forward, sample) seconds per step over `steps` decode steps of n_seqs fresh sequences."""
    from pyforge.engine.sampling_params import SamplingParams
    from pyforge.serving.engine_process import _Worker
    engine = loop.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(n_seqs):
        loop.table.admit(next(ids), _Worker(0, os.getpid()), [(7 * i + j) % 1000 + 1 for j in range(PROMPT_TOKENS)],
                         params)
    loop.replies.flush()
    loop_step(loop, ring)   # the prefill
    step = engine.step = Timed(engine.step)
    forward = engine.runner.forward = Timed(engine.runner.forward)
    greedy = engine.runner.forward_greedy = Timed(engine.runner.forward_greedy)
    sample = engine.sampler.sample = Timed(engine.sampler.sample)
    total = sum(loop_step(loop, ring) for _ in range(steps))
    del engine.step, engine.runner.forward, engine.runner.forward_greedy, engine.sampler.sample
    while engine.has_work:  # let them finish: the next round starts empty
        loop_step(loop, ring)
    return total / steps, step.seconds / steps, (forward.seconds + greedy.seconds) / steps, sample.seconds / steps


def measure(mode, n_seqs, steps, repeats):
    import itertools
    from pyforge.ipc import Segment
    from pyforge.ipc.segment import new_name
    from pyforge.serving.engine_process import EngineLoop
    engine = make_engine(mode, n_seqs, steps)
    seg = Segment.create(new_name("pyforge-bench-"), n_workers=1)
    try:
        seg.publish_facts(engine.facts)
        loop, ring, ids = EngineLoop(seg, engine, queue_capacity=n_seqs), seg.response_ring(0), itertools.count(1)
        round_times(loop, ring, n_seqs, min(steps, 20), ids)      # warm-up
        rounds = [round_times(loop, ring, n_seqs, steps, ids) for _ in range(repeats)]
    finally:
        seg.close()
        seg.unlink()
    total, step, forward, sample = (statistics.median(r[i] for r in rounds) * 1e6 for i in range(4))
    return dict(loop=total, forward=forward, sample=sample, core=step - forward - sample, publish=total - step)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["null", "cuda"], choices=["null", "cuda"])
    args = ap.parse_args(argv)
    if "cuda" in args.modes:
        from bench_cuda_host import null_cupy
        sys.modules["cupy"] = null_cupy()
    print(cpu_description())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| mode | seqs | loop step µs | forward µs | sample µs | core µs | publish µs | core+pub µs/seq |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for n in args.seqs:
            r = measure(mode, n, args.steps, args.repeats)
            print(f"| {mode} | {n} | {r['loop']:.0f} | {r['forward']:.0f} | {r['sample']:.0f} | {r['core']:.0f} | "
                  f"{r['publish']:.0f} | {(r['core'] + r['publish']) / n:.2f} |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

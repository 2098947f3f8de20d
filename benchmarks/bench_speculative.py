"""N-gram speculative decoding: decode tokens/s and tokens per step, with and without.

    python benchmarks/bench_speculative.py [--workloads echo stories nomatch] [--concurrency 1 4 16]
                                           [--threads 2] [--decode 128] [--rounds 3]
                                           [--config tinyllama-1.1b --format Q4_K_M]
                                           [--echo-config tinyllama-1.1b-copy]
                                           [--spec '{"method": "ngram", ...}'] [--crossover]

Workloads:
  echo     a copy model (pyforge/synthetic_copy.py: --echo-config, by default TinyLlama-1.1B's
           shapes and Q4_K_M, so a step costs what that model's does): its embedding and output
           head are built so that greedy decoding follows fixed 16-token cycles of the
           vocabulary, while its attention and MLP layers are small random ones. Prompts walk
           three turns of a cycle from a random token; the continuation goes on around it, as
           a trained model quoting its input would, so prompt-lookup drafts land. It is a
           stand-in for "repeat this code block", not a language model; greedy.
  stories  stories260K (../shared/models) on four TinyStories-like prompts; greedy. A round
           runs every prompt once: at concurrency 1 one after another, at 4 and 16 together.
  nomatch  the synthetic model (random weights, --config / --format) on distinct random
           tokens, sampled at temperature 1: drafts (almost) never come, so this measures
           the adaptive rule's overhead.
Each row runs the same requests on two engines (plain and speculative), alternating
round by round (this machine's speed drifts); medians. Decode time starts once every
request has its first token (prefill excluded).

--crossover times forward steps of B sequences with 1 token each and with 1 + k
tokens each (one decoding row plus k drafts): the ratio says where verification stops
being nearly free (compute-bound), which disable_by_batch_size should follow.

Not run by the tests; a quiet machine gives meaningful numbers (name the CPU).
"""
import argparse
import functools
import json
import statistics
import sys
import time

import numpy as np

from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.synthetic import ensure_model
from pyforge.synthetic_copy import COPY_CYCLES, successors, walk

from machine import cpu_description

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
        "disable_by_batch_size": 64}
STORIES = "../shared/models/stories260K/stories260K.gguf"
STORY_PROMPTS = ["Once upon a time, there was a little girl named Lily. She loved to play outside.",
                 "Tom had a red ball. He liked to throw the ball to his dog.",
                 "One day, a little bird sat on a tree. The bird was sad because",
                 "Sam and his mom went to the park. At the park, Sam saw a big"]


def workload(args, name, engine, n, seed, first=0, decode=None):
    """n (prompt ids, SamplingParams) requests of a workload, each decoding `decode` tokens
    (default args.decode; stories: prompts first, first + 1, ... of STORY_PROMPTS)."""
    decode = decode or args.decode
    rng = np.random.default_rng(seed)
    vocab = engine.facts.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=decode, ignore_eos=True)
    if name == "stories":
        return [(engine.tokenizer.encode(STORY_PROMPTS[(first + i) % len(STORY_PROMPTS)]), greedy)
                for i in range(n)]
    if name == "echo":
        nxt, turn = copy_successors(args.echo_config), COPY_CYCLES[args.echo_config]
        return [([1] + walk(nxt, int(rng.integers(3, vocab)), 3 * turn), greedy) for _ in range(n)]
    params = SamplingParams(temperature=1.0, max_tokens=decode, ignore_eos=True, seed=int(seed))
    return [([1] + rng.choice(np.arange(100, vocab - 100), 96, replace=False).tolist(), params) for _ in range(n)]


@functools.lru_cache
def copy_successors(config_name):
    return successors(config_name)


def decode_run(engine, requests):
    """(tokens decoded, seconds, sequence-steps) of one batch of requests, from the step where
    every request has its first token (prefill excluded)."""
    seqs = [engine.add_request(p, params) for p, params in requests]
    counts = {s.seq_id: 0 for s in seqs}
    started, steps = None, 0
    while engine.has_work:
        outputs = engine.step()
        for o in outputs:
            counts[o.seq_id] += 1
        if started is None and all(counts.values()):
            started, base, steps = time.perf_counter(), sum(counts.values()), 0
        elif started is not None:
            steps += len({o.seq_id for o in outputs})
    return sum(counts.values()) - base, time.perf_counter() - started, steps


def decode_round(args, name, engine, concurrency, seed):
    """(decode tokens/s, tokens per sequence-step) of one round: one batch of `concurrency`
    requests; for stories, batches until every story prompt has run once."""
    batches = -(-len(STORY_PROMPTS) // concurrency) if name == "stories" else 1
    decoded = elapsed = steps = 0
    for b in range(batches):
        d, t, s = decode_run(engine, workload(args, name, engine, concurrency, seed, b * concurrency))
        decoded, elapsed, steps = decoded + d, elapsed + t, steps + s
    return decoded / elapsed, decoded / max(steps, 1)


def bench_row(args, name, path, concurrency, spec):
    engines = {label: Engine(path, n_threads=args.threads, max_num_seqs=max(16, concurrency),
                             max_model_len=1024, speculative_config=cfg)
               for label, cfg in (("plain", None), ("spec", spec))}
    speeds = {label: [] for label in engines}
    per_step = {label: [] for label in engines}
    for label, engine in engines.items():       # warm-up: page the weights in
        decode_run(engine, workload(args, name, engine, 1, 999, decode=16))
    for r in range(args.rounds):
        for label, engine in engines.items():
            tps, tpstep = decode_round(args, name, engine, concurrency, r)
            speeds[label].append(tps)
            per_step[label].append(tpstep)
    sp = engines["spec"].speculator
    plain, fast = statistics.median(speeds["plain"]), statistics.median(speeds["spec"])
    print(f"| {name} | {concurrency} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f} "
          f"| {statistics.median(per_step['spec']):.2f} | {sp.acceptance_rate:.2f} |", flush=True)


def crossover(args, path, spec):
    """Seconds per forward step: B x 1 token vs B x (1 + k) tokens."""
    k = spec["num_speculative_tokens"]
    engine = Engine(path, n_threads=args.threads, max_num_seqs=64, max_model_len=1024,
                    max_num_batched_tokens=64 * (k + 1))
    print(f"\n| batch | step s (1 token each) | step s ({1 + k} tokens each) | ratio |\n|---|---|---|---|")
    for batch in args.crossover_batches:
        times = []
        for n_new in (1, 1 + k):
            params = SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True)
            seqs = [engine.add_request([1] + list(range(100 + i, 164 + i)), params) for i in range(batch)]
            while any(s.num_output_tokens == 0 for s in seqs):
                engine.step()               # prefill (chunked), until every sequence decodes
            plan = [(s, n_new) for s in seqs]
            for s in seqs:                  # pretend the next n_new tokens are known
                s.token_ids.extend([5] * (n_new - 1))
                engine.block_manager.allocate(s, s.num_computed_tokens + n_new)
            _timed(engine, plan)            # warm-up: first calls of a shape set up scratch
            best = min(_timed(engine, plan) for _ in range(args.rounds))
            times.append(best)
            for s in seqs:
                engine.abort(s.seq_id)
        print(f"| {batch} | {times[0]:.4f} | {times[1]:.4f} | {times[1] / times[0]:.2f} |", flush=True)


def _timed(engine, plan):
    t0 = time.perf_counter()
    engine.runner.run(plan, all_logits=True)
    return time.perf_counter() - t0


def model_path(args, workload_name):
    """The model a workload runs on (synthetic ones generated on first use)."""
    if workload_name == "stories":
        return args.stories
    return str(ensure_model(args.echo_config if workload_name == "echo" else args.config, args.format))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["echo", "stories", "nomatch"],
                    choices=["echo", "stories", "nomatch"])
    ap.add_argument("--concurrency", nargs="*", type=int, default=[1, 4, 16], help="none: skip the decode table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default="tinyllama-1.1b", help="synthetic model config (pyforge/synthetic.py)")
    ap.add_argument("--format", default="Q4_K_M")
    ap.add_argument("--echo-config", default="tinyllama-1.1b-copy", choices=sorted(COPY_CYCLES),
                    help="the echo workload's copy model (pyforge/synthetic_copy.py), in --format")
    ap.add_argument("--stories", default=STORIES)
    ap.add_argument("--spec", default=json.dumps(SPEC), help="the speculative engine's --speculative-config")
    ap.add_argument("--crossover", action="store_true", help="also time verification steps against batch size")
    ap.add_argument("--crossover-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    args = ap.parse_args()
    spec = json.loads(args.spec)
    print(f"{cpu_description()}, {args.threads} threads; synthetic {args.config} {args.format}, echo {args.echo_config} "
          f"{args.format}; decode {args.decode}; median of {args.rounds} rounds; spec {json.dumps(spec)}")
    print("\n| workload | concurrency | plain tok/s | spec tok/s | speed-up | tokens/step (spec) | acceptance |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads if args.concurrency else ():
        for c in args.concurrency:
            bench_row(args, name, model_path(args, name), c, spec)
    if args.crossover:
        crossover(args, model_path(args, "nomatch"), spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Single-stream prefill and decode: pyforge vs llama.cpp on the same GGUF file.

    python benchmarks/bench_native.py [--formats Q4_K_M Q8_0] [--threads 2] [--rounds 3]
                                      [--llama-bench PATH | --peer llama-cpp-python]

The peer is llama.cpp's own `llama-bench` (built natively from the llama.cpp
tree in llama-cpp-python's source distribution, outside this repository: see
RESULTS.md), one run per round: prefill as its pp test, decode as its tg test at
depth --prompt (so both decode after the same context). `--peer
llama-cpp-python` uses that wrapper in this process instead (about half of
llama.cpp's decode speed). The engines alternate round by round (this
machine's speed drifts), on the synthetic tinyllama-1.1b model; medians are
reported with the ratio and the decode bandwidth bound (weight bytes /
measured bandwidth).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.synthetic import ensure_model

from machine import cpu_description

CONFIG = "tinyllama-1.1b"


def measure_bandwidth(n_threads, gib=1.0, repeats=5):
    """Read bandwidth (GB/s): n_threads numpy float32 maxima over disjoint slices of a big
    array (numpy's max is vectorised; its float64 sum is not a bandwidth probe on every
    CPU: on Zen 5 it read 38 GB/s where max reads 68 and a Q8_0 decode streams 57)."""
    data = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(data, n_threads)
    best = 0.0
    for _ in range(repeats):
        threads = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def prompt_tokens(n, vocab=32000, seed=0):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(100, vocab - 100, n - 1).tolist()


class PyforgeRunner:
    name = "pyforge"

    def __init__(self, path, threads, n_ctx):
        self.engine = Engine(path, n_threads=threads, max_model_len=n_ctx, kv_cache_tokens=n_ctx,
                             max_num_batched_tokens=n_ctx)

    def run(self, prompt, n_decode):
        params = SamplingParams(temperature=0.0, max_tokens=n_decode + 1, ignore_eos=True)
        seq = self.engine.add_request(prompt, params)
        t0 = time.perf_counter()
        self.engine.step()                     # prefill + first token
        t1 = time.perf_counter()
        for _ in range(n_decode):
            self.engine.step()
        t2 = time.perf_counter()
        if seq.num_output_tokens != n_decode + 1:   # e.g. stopped at the model's context length
            raise SystemExit(f"pyforge generated {seq.num_output_tokens} of {n_decode + 1} tokens: "
                             "lower --prompt or --decode")
        self.engine.abort(seq.seq_id)
        return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=n_ctx, n_ubatch=n_ctx, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def next_token(self):
        """Greedy pick from the last row's logits (llm.scores is filled only with logits_all)."""
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def run(self, prompt, n_decode):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self.next_token()
        t1 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = self.next_token()
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


class LlamaBenchRunner:
    """llama.cpp's llama-bench: pp<prompt>, then tg<decode> at depth <prompt>."""
    name = "llama-bench"

    def __init__(self, exe, path, threads):
        self.exe, self.path, self.threads = exe, path, threads

    def _tokens_per_s(self, *flags):
        out = subprocess.run([self.exe, "-m", self.path, "-t", str(self.threads), "-r", "1", "-o", "json", *flags],
                             capture_output=True, text=True, check=True, timeout=1800)
        [test] = json.loads(out.stdout)
        return float(test["avg_ts"])

    def run(self, prompt, n_decode):
        n = str(len(prompt))
        prefill = self._tokens_per_s("-p", n, "-n", "0", "-b", n, "-ub", n)
        decode = self._tokens_per_s("-p", "0", "-n", str(n_decode), "-d", n)
        return prefill, decode


def make_peer(args, path, n_ctx):
    if args.peer == "llama-cpp-python":
        return LlamaCppRunner(path, args.threads, n_ctx)
    exe = args.llama_bench or shutil.which("llama-bench")
    if not exe:
        raise SystemExit("llama-bench not found: pass --llama-bench PATH (or --peer llama-cpp-python)")
    return LlamaBenchRunner(exe, path, args.threads)


def bench_format(fmt, args, bandwidth):
    path = str(ensure_model(CONFIG, fmt))
    weight_bytes = os.path.getsize(path)
    n_ctx = args.prompt + args.decode + 16
    runners = [PyforgeRunner(path, args.threads, n_ctx), make_peer(args, path, n_ctx)]
    results = {r.name: ([], []) for r in runners}
    for r in runners:                       # warm-up: page in the weights
        r.run(prompt_tokens(32, seed=1000), 4)
    for i in range(args.rounds):
        prompt = prompt_tokens(args.prompt, seed=i)   # a fresh prompt: no prefix-cache hits
        for r in runners:
            pre, dec = r.run(prompt, args.decode)
            results[r.name][0].append(pre)
            results[r.name][1].append(dec)
    med = [(statistics.median(p), statistics.median(d)) for p, d in results.values()]
    bound = bandwidth * 1e9 / weight_bytes
    return fmt, med, bound, weight_bytes


def print_table(rows, args, bandwidth):
    peer = args.peer
    print(f"\n{cpu_description()}; synthetic {CONFIG}, {args.threads} threads, prompt {args.prompt}, decode {args.decode}, "
          f"median of {args.rounds} rounds; read bandwidth {bandwidth:.1f} GB/s; peer {peer}")
    print(f"| format | file MiB | prefill pyforge | prefill {peer} | ratio | decode pyforge | decode {peer} "
          "| ratio | decode bound | pyforge % of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt, med, bound, size in rows:
        (pp, pd), (lp, ld) = med
        print(f"| {fmt} | {size / 2**20:.0f} | {pp:.1f} | {lp:.1f} | {pp / lp:.2f} | {pd:.1f} | {ld:.1f} "
              f"| {pd / ld:.2f} | {bound:.1f} | {100 * pd / bound:.0f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["Q4_K_M", "Q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--peer", choices=["llama-bench", "llama-cpp-python"], default="llama-bench")
    ap.add_argument("--llama-bench", help="the llama-bench binary (default: llama-bench on PATH)")
    args = ap.parse_args()
    bandwidth = measure_bandwidth(args.threads)
    rows = [bench_format(fmt, args, bandwidth) for fmt in args.formats]
    print_table(rows, args, bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())

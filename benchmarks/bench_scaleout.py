"""Scale-out benchmark: N pyforge replicas behind SGLang's router on loopback,
prefix-aware routing (cache_aware) against round_robin and against one replica alone.

    python benchmarks/bench_scaleout.py [--replicas 3] [--prefixes 12] [--users 8] [--concurrency 12]
                                      [--prefix-tokens 320] [--max-tokens 8] [--model PATH]
                                      [--policies cache_aware round_robin] [--threads N] [--no-single]
                                      [--json OUT] [--seed 0]

Needs `pip install sglang-router` (the router is its Rust binary, started as
`python -m sglang_router.launch_router --worker-urls ... --policy ...`).

Workload: --prefixes long shared prefixes (a "document" or system prompt of about
--prefix-tokens tokens each, distinct from their first words), each asked by --users
users a question of their own; the requests are shuffled (seeded) and sent by
--concurrency clients back to back as streamed /v1/completions. Each configuration
starts fresh replicas (empty prefix caches), KV pools big enough to keep every
prefix, so only routing decides how often a prefix is recomputed:

  single       one replica alone, no router: the best cached fraction, and the unit scale-out multiplies
  round_robin  N replicas behind the router, requests dealt in turn: each prefix lands everywhere
  cache_aware  N replicas behind the router's approximate prefix trees (one per worker)

Reported per configuration: the cached-prompt-token fraction (sum of
usage.prompt_tokens_details.cached_tokens / sum of prompt_tokens), TTFT p50/p99,
requests/s and output tokens/s, and each replica's share of the requests (from its
own /metrics: pyforge:request_success_total). Targets (issue 16): cache_aware keeps
>= 90% of the single replica's cached fraction, and no replica serves more than 50%
of the requests at N = 3. Every replica, the single one included, gets --threads
engine threads (default cores // N, at least 1), so N replicas share the machine
fairly and the single row is one of them alone (a replica given every core spins
its OpenMP threads against its own HTTP worker and the clients on a small machine);
the router and the clients share the machine too. Name the CPU with the numbers
(the first line printed does).

The default model is ../shared/models/stories260K (context 512: prefixes of 320
tokens leave room for the question and the answer); any GGUF works with --model.
"""
import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_serving import REPO, free_port, make_prompts, pct, stop
from machine import cpu_description

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.gguf"
POLICIES = ("cache_aware", "round_robin")


# -- processes -----------------------------------------------------------------

def start_replica(model, port, threads, kv_tokens, max_seqs):
    cmd = [sys.executable, "-m", "pyforge.cli", "serve", "--model", str(model), "--port", str(port),
           "--workers", "1", "--worker-threads", "64", "--threads", str(threads), "--max-num-seqs", str(max_seqs),
           "--kv-cache-tokens", str(kv_tokens), "--log-level", "warning", "--served-model-name", "bench"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})


def start_router(worker_urls, policy, port):
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--policy", policy,
           "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
           "--health-check-endpoint", "/health/ready", "--worker-startup-check-interval", "1",
           "--log-level", "warn"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port, proc, path, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited with status {proc.returncode} while starting")
        try:
            status, _ = get(port, path)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"port {port} did not answer {path} within {timeout} s")


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def requests_served(port):
    status, text = get(port, "/metrics")
    m = re.search(r"^pyforge:request_success_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    if status != 200 or not m:
        raise RuntimeError(f"no pyforge:request_success_total at port {port}")
    return float(m.group(1))


# -- workload ------------------------------------------------------------------

def make_workload(model, n_prefixes, n_users, prefix_tokens, seed):
    """(prompt, prefix index) pairs, shuffled: each prefix followed by each user's question."""
    docs = make_prompts(model, n_prefixes, prefix_tokens)
    docs = [re.sub(r"^Request (\d+):", r"Document \1 (read it carefully):", d) for d in docs]
    work = [(f"{doc}\nUser {u}: what does document {p} say about item {u}?\nAnswer:", p)
            for p, doc in enumerate(docs) for u in range(n_users)]
    random.Random(seed).shuffle(work)
    return work


def stream(port, prompt, max_tokens):
    """(ttft s, prompt tokens, cached prompt tokens, output tokens) of one streamed completion."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start, first, usage = time.perf_counter(), None, None
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    finally:
        conn.close()
    if usage is None:
        raise RuntimeError("the stream carried no usage")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return (first or time.perf_counter()) - start, usage["prompt_tokens"], cached, usage["completion_tokens"]


def drive(port, work, concurrency, max_tokens):
    results, lock, todo = [], threading.Lock(), iter(work)

    def client():
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            r = stream(port, item[0], max_tokens)
            with lock:
                results.append(r)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return results, time.perf_counter() - start


# -- one configuration -----------------------------------------------------------

def run_config(name, args, work, n_replicas, threads):
    kv_tokens = (args.prefixes + args.concurrency) * (args.prefix_tokens + 64 + args.max_tokens)
    ports = [free_port() for _ in range(n_replicas)]
    procs = [start_replica(args.model, p, threads, kv_tokens, args.concurrency) for p in ports]
    router = None
    try:
        for port, proc in zip(ports, procs):
            wait_ready(port, proc, "/health/ready")
            stream(port, "Warm-up request, unlike the workload.", 2)
        entry = ports[0]
        if name != "single":
            entry = free_port()
            router = start_router([f"http://127.0.0.1:{p}" for p in ports], name, entry)
            wait_ready(entry, router, "/v1/models", timeout=120)
        before = [requests_served(p) for p in ports]
        results, wall = drive(entry, work, args.concurrency, args.max_tokens)
        shares = [requests_served(p) - b for p, b in zip(ports, before)]
    finally:
        if router is not None:
            stop(router)
        for proc in procs:
            stop(proc)
    ttfts = [r[0] for r in results]
    total = sum(shares) or 1
    return {"config": name, "replicas": n_replicas, "threads_per_replica": threads, "requests": len(results),
            "cached_fraction": sum(r[2] for r in results) / sum(r[1] for r in results),
            "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99), "wall_s": wall,
            "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(r[3] for r in results) / wall,
            "replica_share": [s / total for s in shares]}


def print_table(rows):
    print("| configuration | replicas × threads | cached prompt tokens | TTFT p50 | TTFT p99 | requests/s "
          "| output tok/s | share per replica |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        shares = " / ".join(f"{s:.0%}" for s in r["replica_share"])
        print(f"| {r['config']} | {r['replicas']} × {r['threads_per_replica']} | {r['cached_fraction']:.1%} "
              f"| {r['ttft_p50_s'] * 1e3:.0f} ms | {r['ttft_p99_s'] * 1e3:.0f} ms | {r['requests_per_s']:.2f} "
              f"| {r['output_tokens_per_s']:.1f} | {shares} |", flush=True)


def verdict(rows):
    """The issue's two targets, as lines to print: [(ok, text)]."""
    by = {r["config"]: r for r in rows}
    out = []
    if "single" in by and "cache_aware" in by:
        kept = by["cache_aware"]["cached_fraction"] / max(by["single"]["cached_fraction"], 1e-9)
        out.append((kept >= 0.9, f"cache_aware keeps {kept:.0%} of the single replica's cached fraction "
                                 "(target >= 90%)"))
    if "cache_aware" in by:
        top = max(by["cache_aware"]["replica_share"])
        out.append((top <= 0.5, f"cache_aware's busiest replica serves {top:.0%} of the requests (target <= 50%)"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--prefixes", type=int, default=12)
    ap.add_argument("--users", type=int, default=8, help="requests per prefix")
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--prefix-tokens", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--no-single", action="store_true", help="skip the one-replica baseline")
    ap.add_argument("--threads", type=int, default=0,
                    help="engine threads per replica (default: cores // replicas, at least 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.replicas < 2 or min(args.prefixes, args.users, args.concurrency, args.prefix_tokens) < 1:
        ap.error("--replicas must be >= 2; --prefixes, --users, --concurrency, --prefix-tokens >= 1")
    cores = os.cpu_count() or 1
    print(f"{cpu_description()}, {cores} cores; model {Path(args.model).name}; {args.prefixes} prefixes of ~{args.prefix_tokens} "
          f"tokens x {args.users} users, concurrency {args.concurrency}, {args.max_tokens} tokens generated",
          flush=True)
    work = make_workload(args.model, args.prefixes, args.users, args.prefix_tokens, args.seed)
    threads = args.threads or max(1, cores // args.replicas)
    configs = [("single", 1, threads)] * (not args.no_single) + [(p, args.replicas, threads) for p in args.policies]
    rows = [run_config(name, args, work, n, threads) for name, n, threads in configs]
    print_table(rows)
    for ok, text in verdict(rows):
        print(("PASS " if ok else "MISS ") + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()

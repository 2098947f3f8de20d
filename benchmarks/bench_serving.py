"""Serving benchmark: pyforge vs llama-cpp-python's OpenAI server, same GGUF file.

    python benchmarks/bench_serving.py [--servers pyforge llama_cpp] [--concurrency 1 4 8 16 32]
                                       [--requests 64] [--threads 2] [--model PATH] [--json OUT]

Each server is started here on loopback (pyforge: `pyforge serve`, one worker;
llama.cpp: `python -m llama_cpp.server`, which needs `pip install
'llama-cpp-python[server]'`), warmed up, then driven by a bounded thread pool:
at concurrency c, c clients each send streamed /v1/completions requests back to
back (64-token prompts, 64 generated tokens, greedy) until --requests are done.
Reported per level: aggregate output tokens/s (all tokens / wall time),
time to first token p50/p99 and inter-token latency p50/p99 (gaps between
streamed chunks). Prompts differ per request (no prefix-cache help).

Default model: the synthetic tinyllama-1.1b Q4_K_M (pyforge.synthetic.ensure_model).
On this machine class a Q4_K_M decode step reads ~0.67 GB of weights, so one
stream is bounded near bandwidth / 0.67 GB (~40-55 tokens/s); batching shares
that read, so aggregate tokens/s should grow with concurrency until compute binds.
"""
import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers -------------------------------------------------------------------

def start_pyforge(model, port, threads, max_seqs):
    cmd = [sys.executable, "-m", "pyforge.cli", "serve", "--model", model, "--port", str(port),
           "--workers", "1", "--worker-threads", str(max(64, 2 * max_seqs)), "--threads", str(threads),
           "--max-num-seqs", str(max_seqs), "--max-model-len", "2048", "--kv-cache-tokens", str(max_seqs * 160 + 512),
           "--log-level", "warning", "--served-model-name", "bench"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})


def start_llama_cpp(model, port, threads, max_seqs):
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "2048",
           "--model_alias", "bench", "--interrupt_requests", "False"]   # default True cuts running streams
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


SERVERS = {"pyforge": start_pyforge, "llama_cpp": start_llama_cpp}


def wait_up(port, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} while starting")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- one request ---------------------------------------------------------------

def stream_completion(port, prompt, max_tokens):
    """(ttft seconds, [inter-chunk gaps], n output tokens) of one streamed request."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    stamps, n_chunks = [], 0
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            stamps.append(time.perf_counter())
            n_chunks += 1
    conn.close()
    if not stamps:
        return None, [], 0
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], n_chunks


def run_level(port, prompts, concurrency, max_tokens):
    results, lock = [], threading.Lock()
    todo = iter(prompts)

    def client():
        while True:
            with lock:
                prompt = next(todo, None)
            if prompt is None:
                return
            r = stream_completion(port, prompt, max_tokens)
            with lock:
                results.append(r)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results if r[0] is not None]
    itls = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
            "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99)}


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# -- prompts -------------------------------------------------------------------

def make_prompts(model, n, n_tokens=PROMPT_TOKENS):
    """n different texts of n_tokens tokens each (BOS included) in the model's vocabulary."""
    from pyforge.engine.engine import load_tokenizer
    from pyforge.loader import load_model_file
    tok = load_tokenizer(load_model_file(model))
    words = ("river stone quiet lantern orbit maple signal harbor velvet engine copper meadow "
             "thunder pocket silver garden").split()
    prompts = []
    for i in range(n):
        text, k = f"Request {i}:", i
        while len(tok.encode(text)) < n_tokens:
            text += " " + words[k % len(words)]
            k = k * 7 + 3
        while len(tok.encode(text)) > n_tokens:
            text = text.rsplit(" ", 1)[0]
        prompts.append(text)
    return prompts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", nargs="+", default=["pyforge", "llama_cpp"], choices=list(SERVERS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 x concurrency, >= 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=OUTPUT_TOKENS)
    ap.add_argument("--model", default=None, help="GGUF file (default: synthetic tinyllama-1.1b Q4_K_M)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.model is None:
        from pyforge.synthetic import ensure_model
        args.model = str(ensure_model("tinyllama-1.1b", "Q4_K_M"))
    n_max = max(args.requests or max(8, 4 * c) for c in args.concurrency)
    prompts = make_prompts(args.model, n_max * len(args.concurrency) + 1)
    print(f"model {args.model}, {args.threads} threads, prompts {PROMPT_TOKENS} tokens, "
          f"{args.max_tokens} generated", flush=True)
    rows = []
    for name in args.servers:
        port = free_port()
        proc = SERVERS[name](args.model, port, args.threads, max(args.concurrency))
        try:
            wait_up(port, proc)
            stream_completion(port, prompts[-1], 4)          # warm-up
            used = 0
            for c in args.concurrency:
                n = args.requests or max(8, 4 * c)
                row = {"server": name, **run_level(port, prompts[used:used + n], c, args.max_tokens)}
                used += n
                rows.append(row)
                print(f"{name:10s} c={c:3d} n={row['requests']:4d} {row['tokens_per_s']:8.1f} tok/s  "
                      f"TTFT p50 {row['ttft_p50'] * 1e3:8.1f} ms p99 {row['ttft_p99'] * 1e3:8.1f} ms  "
                      f"ITL p50 {row['itl_p50'] * 1e3:7.1f} ms p99 {row['itl_p99'] * 1e3:7.1f} ms  "
                      f"({row['output_tokens']} tokens in {row['wall_s']:.1f} s)", flush=True)
        finally:
            stop(proc)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

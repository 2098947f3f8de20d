"""Serving benchmark: pyforge vs llama.cpp's servers, same GGUF file.

    python benchmarks/bench_serving.py [--servers pyforge llama_server llama_cpp] [--concurrency 1 4 8 16 32]
                                       [--requests 64] [--threads 2] [--model PATH] [--json OUT]
                                       [--plot benchmarks/serving.png] [--null-model]
                                       [--llama-server PATH]

Each server is started here on loopback (pyforge: `pyforge serve`, one worker;
llama_server: llama.cpp's own `llama-server`, built natively from the llama.cpp
tree in llama-cpp-python's source distribution (RESULTS.md says how), one slot
per stream of the highest level, same threads; llama_cpp: llama-cpp-python's
`python -m llama_cpp.server`, which needs `pip install
'llama-cpp-python[server]'` and serves one stream at a time), warmed up, then
driven by a bounded thread pool:
at concurrency c, c clients each send streamed /v1/completions requests back to
back (64-token prompts, 64 generated tokens, greedy) until --requests are done,
each client on one kept-alive HTTP/1.1 connection as the openai SDK's pool
does (--new-connections: a new connection per request).
Reported per level: aggregate output tokens/s (all tokens / wall time),
tokens processed/s (prompt + generated tokens / wall time), time to first
token p50/p99, inter-token latency p50/p99 (gaps between streamed chunks with
text), tokens per chunk, and the CPU cores used meanwhile by the client (it
shares the machine) and by the server's processes (pyforge: engine, workers).
Tokens are counted by the server: each request asks for
`stream_options.include_usage` and takes `usage.completion_tokens` from the
last chunk. A server that sends no usage (llama-cpp-python's server ignores
stream_options) has its text chunks counted instead, one token each, which is
how that server streams. A server may put several tokens in one chunk (pyforge
does when a stream falls behind, as vLLM and llama-server do), so chunk gaps
are inter-chunk, not per-token, latencies; tokens per chunk says how far apart.
Prompts differ per request (no prefix-cache help). Before the levels, each
server gets a prefix probe: two requests sharing a long prefix (--prefix-tokens,
default 512) one after the other; the second one's TTFT shows the prefix cache
(llama.cpp's server reuses its slot's KV prefix the same way).
A PNG (--plot) draws throughput and latency against concurrency per server.

--null-model runs pyforge alone with `serve --null-model` (no forward pass,
models/null.py) at high concurrency (default 1 16 64): what HTTP, IPC,
scheduling and sampling cost by themselves, i.e. pyforge's own ceiling in
tokens/s. A real model can only be slower; if a real run comes close to this
number, the serving stack, not the model, is the bottleneck.

Default model: the synthetic tinyllama-1.1b Q4_K_M (pyforge.synthetic.ensure_model).
On this machine class a Q4_K_M decode step reads ~0.67 GB of weights, so one
stream is bounded near bandwidth / 0.67 GB (~40-55 tokens/s); batching shares
that read, so aggregate tokens/s should grow with concurrency until compute binds.
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import cpu_description

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers -------------------------------------------------------------------

def start_pyforge(model, port, threads, max_seqs, seq_tokens, null_model=False):
    kv_tokens = max_seqs * (seq_tokens + 16) + 2048          # no preemption; room for the prefix probe
    cmd = [sys.executable, "-m", "pyforge.cli", "serve", "--model", model, "--port", str(port),
           "--workers", "1", "--worker-threads", str(max(64, 2 * max_seqs)), "--threads", str(threads),
           "--max-num-seqs", str(max_seqs), "--max-model-len", "2048", "--kv-cache-tokens", str(kv_tokens),
           "--log-level", "warning", "--served-model-name", "bench"] + (["--null-model"] if null_model else [])
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})


def start_llama_cpp(model, port, threads, max_seqs, seq_tokens, null_model=False):
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "2048",
           "--model_alias", "bench", "--interrupt_requests", "False"]   # default True cuts running streams
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama_server(model, port, threads, max_seqs, seq_tokens, null_model=False):
    exe = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if not exe:
        raise SystemExit("llama-server not found: pass --llama-server PATH")
    cmd = [exe, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
           "-np", str(max_seqs), "-c", str(max_seqs * (seq_tokens + 16)), "-a", "bench"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


SERVERS = {"pyforge": start_pyforge, "llama_server": start_llama_server, "llama_cpp": start_llama_cpp}


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

def stream_completion(port, prompt, max_tokens, conn=None, extra=None):
    """(ttft seconds, [inter-chunk gaps], n output tokens, n chunks with text) of one streamed request,
    on `conn` (kept open for the next request) or on a connection of its own; `extra`: more body fields."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
                       **(extra or {})}).encode()
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        if own:
            raise
        # The server closed the kept connection (llama-server does after every
        # streamed response): reconnect and send again, as pooled clients do.
        conn.close()
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    stamps, usage = [], None
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
        if chunk.get("usage"):
            usage = chunk["usage"]
    resp.read()                 # the end of the chunked body: the connection is then ready for more
    if own:
        conn.close()
    if not stamps:
        return None, [], 0, 0
    n_tokens = usage["completion_tokens"] if usage else len(stamps)
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], n_tokens, len(stamps)


def server_cpu(pid):
    """CPU seconds (user + system) used so far by the server process `pid` and
    its descendants, by role: engine (pyforge's engine process), workers (every
    other descendant: gunicorn workers), main (pid itself: the launcher, or all
    of llama-cpp-python's server)."""
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    out, todo = {"main": cpu.get(pid, 0.0)}, [pid]
    while todo:
        here = todo.pop()
        for child in [c for c, p in parent.items() if p == here]:
            todo.append(child)
            try:
                engine = b"engine_process" in Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            role = "engine" if engine else "workers"
            out[role] = out.get(role, 0.0) + cpu[child]
    return out


def run_level(port, prompts, concurrency, max_tokens, prompt_tokens=PROMPT_TOKENS, keep_alive=True,
              server_pid=None, extra=None):
    results, lock = [], threading.Lock()
    todo = iter(prompts)

    def client():
        # keep-alive: one connection per client, as the openai SDK's connection pool does
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600) if keep_alive else None
        try:
            while True:
                with lock:
                    prompt = next(todo, None)
                if prompt is None:
                    return
                r = stream_completion(port, prompt, max_tokens, conn, extra)
                with lock:
                    results.append(r)
        finally:
            if conn is not None:
                conn.close()

    start, cpu = time.perf_counter(), os.times()
    served = server_cpu(server_pid) if server_pid else {}
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall, cpu_end = time.perf_counter() - start, os.times()
    client_cpu = cpu_end.user - cpu.user + cpu_end.system - cpu.system
    served = {role: (t - served.get(role, 0.0)) / wall for role, t in server_cpu(server_pid).items()} if server_pid else {}
    ttfts = [r[0] for r in results if r[0] is not None]
    itls = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    chunks = sum(r[3] for r in results)
    processed = tokens + prompt_tokens * len(results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "processed_per_s": processed / wall,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
            "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99),
            "tokens_per_chunk": tokens / max(chunks, 1), "client_cpu_cores": client_cpu / wall,
            "server_cpu_cores": served,
            "short_requests": sum(r[2] != max_tokens for r in results)}


def prefix_probe(port, prefix, suffixes):
    """TTFT (s) of requests sharing `prefix`, sent one after the other: the first fills the cache."""
    return [stream_completion(port, prefix + s, 2)[0] for s in suffixes]


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# -- prompts -------------------------------------------------------------------

def make_prompts(model, n, n_tokens=PROMPT_TOKENS):
    """n different texts of n_tokens tokens each (BOS included) in the model's vocabulary."""
    from pyforge.tokenizer import load_tokenizer
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


def make_prefix(model, n_tokens):
    """A 'system prompt' of about n_tokens tokens, unlike any benchmark prompt."""
    text = make_prompts(model, 1, n_tokens)[0].replace("Request 0:", "System:", 1)
    return text


# -- report --------------------------------------------------------------------

def print_row(row):
    print(f"{row['server']:10s} c={row['concurrency']:3d} n={row['requests']:4d} "
          f"{row['tokens_per_s']:8.1f} tok/s {row['processed_per_s']:8.1f} processed tok/s  "
          f"TTFT p50 {row['ttft_p50'] * 1e3:8.1f} ms p99 {row['ttft_p99'] * 1e3:8.1f} ms  "
          f"ITL p50 {row['itl_p50'] * 1e3:7.1f} ms p99 {row['itl_p99'] * 1e3:7.1f} ms  "
          f"{row['tokens_per_chunk']:4.1f} tok/chunk, CPU cores: client {row['client_cpu_cores']:.2f}"
          + "".join(f" {role} {cores:.2f}" for role, cores in row.get("server_cpu_cores", {}).items() if cores >= 0.005)
          + "  "
          f"({row['output_tokens']} tokens in {row['wall_s']:.1f} s)"
          + (f"  {row['short_requests']} requests got fewer than max_tokens!" if row["short_requests"] else ""),
          flush=True)


def plot(rows, probes, path, title):
    """Throughput and latency against concurrency, one line per server."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        c = [r["concurrency"] for r in mine]
        line, = ax_tp.plot(c, [r["tokens_per_s"] for r in mine], "o-", label=f"{name} generated")
        ax_tp.plot(c, [r["processed_per_s"] for r in mine], "s--", color=line.get_color(),
                   label=f"{name} prompt + generated")
        ax_lat.plot(c, [r["ttft_p50"] * 1e3 for r in mine], "o-", color=line.get_color(), label=f"{name} TTFT p50")
        ax_lat.plot(c, [r["itl_p50"] * 1e3 for r in mine], "s--", color=line.get_color(),
                    label=f"{name} ITL p50 (gap between chunks)")
        if name in probes:
            cold, warm = probes[name]
            ax_lat.axhline(warm * 1e3, color=line.get_color(), linestyle=":", linewidth=1,
                           label=f"{name} TTFT, cached prefix ({cold * 1e3:.0f} ms cold)")
    levels = sorted({r["concurrency"] for r in rows})
    for ax, ylabel in ((ax_tp, "tokens/s"), (ax_lat, "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_lat.set_yscale("log")
    ax_tp.set_title("throughput")
    ax_lat.set_title("latency")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", nargs="+", default=["pyforge", "llama_server"], choices=list(SERVERS))
    ap.add_argument("--llama-server", default=None, help="the llama-server binary (default: on PATH)")
    ap.add_argument("--concurrency", nargs="+", type=int, default=None,
                    help="concurrent streams per level (default 1 4 8 16 32; with --null-model 1 16 64)")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 x concurrency, >= 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=OUTPUT_TOKENS)
    ap.add_argument("--model", default=None, help="GGUF file (default: synthetic tinyllama-1.1b Q4_K_M)")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--prefix-tokens", type=int, default=512,
                    help="shared prefix of the prefix-cache probe (0: no probe)")
    ap.add_argument("--null-model", action="store_true",
                    help="pyforge alone, no forward pass: the serving stack's ceiling")
    ap.add_argument("--new-connections", action="store_true",
                    help="a new connection per request (default: each client keeps one open, as the openai SDK does)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--plot", default=None,
                    help="PNG of throughput and latency vs concurrency (default benchmarks/serving.png; "
                         "benchmarks/serving_null.png with --null-model; 'none': no plot)")
    args = ap.parse_args(argv)
    if args.llama_server:
        os.environ["LLAMA_SERVER"] = args.llama_server
    if args.null_model:
        args.servers = ["pyforge"]
    if args.concurrency is None:
        args.concurrency = [1, 16, 64] if args.null_model else [1, 4, 8, 16, 32]
    if args.plot is None:
        args.plot = str(REPO / "benchmarks" / ("serving_null.png" if args.null_model else "serving.png"))
    if args.model is None:
        from pyforge.synthetic import ensure_model
        args.model = str(ensure_model("tinyllama-1.1b", "Q4_K_M"))
    n_max = max(args.requests or max(8, 4 * c) for c in args.concurrency)
    prompts = make_prompts(args.model, n_max * len(args.concurrency) + 1, args.prompt_tokens)
    prefix = make_prefix(args.model, args.prefix_tokens) if args.prefix_tokens else None
    seq_tokens = max(args.prompt_tokens, args.prefix_tokens + 16) + args.max_tokens
    mode = " (NULL MODEL: no forward pass)" if args.null_model else ""
    print(f"{cpu_description()}; model {args.model}{mode}, {args.threads} threads, prompts {args.prompt_tokens} tokens, "
          f"{args.max_tokens} generated, {'a new connection per request' if args.new_connections else 'keep-alive'}",
          flush=True)
    rows, probes = [], {}
    for name in args.servers:
        port = free_port()
        proc = SERVERS[name](args.model, port, args.threads, max(args.concurrency), seq_tokens, args.null_model)
        try:
            wait_up(port, proc)
            stream_completion(port, prompts[-1], 4)          # warm-up
            if prefix:
                cold, warm = prefix_probe(port, prefix, [" Question: what is a river?", " Question: why?"])
                probes[name] = (cold, warm)
                print(f"{name:10s} prefix probe ({args.prefix_tokens}-token shared prefix): TTFT first "
                      f"{cold * 1e3:.1f} ms, second {warm * 1e3:.1f} ms ({cold / warm:.1f}x)", flush=True)
            used = 0
            for c in args.concurrency:
                n = args.requests or max(8, 4 * c)
                row = {"server": name, "null_model": args.null_model,
                       **run_level(port, prompts[used:used + n], c, args.max_tokens, args.prompt_tokens,
                                   keep_alive=not args.new_connections, server_pid=proc.pid)}
                used += n
                rows.append(row)
                print_row(row)
        finally:
            stop(proc)
    if args.plot and args.plot != "none":
        title = (f"{Path(args.model).name}{mode}, {args.threads} threads, "
                 f"{args.prompt_tokens}-token prompts, {args.max_tokens} generated")
        try:
            plot(rows, probes, args.plot, title)
            print(f"plot: {args.plot}")
        except ImportError:     # the table above is the result; the picture is optional
            print("no plot: matplotlib is not installed (pip install matplotlib, or --plot none)")
    if args.json:
        Path(args.json).write_text(json.dumps({"levels": rows, "prefix_probe_ttft_s": probes}, indent=2))
    return rows


if __name__ == "__main__":
    main()

"""How long a killed engine takes to come back under load, and what its requests see.

    python benchmarks/bench_restart.py --model M.gguf [--kills 3] [--queued 4] [--threads 2]

Starts `pyforge serve` (one worker, max_num_seqs 1, so requests queue), then,
per kill: one long stream generating, `--queued` requests waiting; SIGKILL to
the engine; times until /health/ready answers 200 again, and checks that the
queued requests complete and the running one got an error. Prints a table.
"""
import argparse
import os
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from live_server import Server, get, metric, wait_for_metrics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description  # noqa: E402


def engine_pid(server):
    return next(p for p in server.pids_now() if b"engine_process" in Path(f"/proc/{p}/cmdline").read_bytes())


def one_kill(server, n_queued):
    client = server.client.with_options(timeout=300)
    running = iter(client.completions.create(model=server.name, prompt="Running when it dies", max_tokens=100000,
                                             stream=True, temperature=0, extra_body={"ignore_eos": True}))
    next(running)
    with ThreadPoolExecutor(n_queued) as pool:
        queued = [pool.submit(client.completions.create, model=server.name, prompt=f"Queued {i}", max_tokens=8,
                              temperature=0, extra_body={"ignore_eos": True}) for i in range(n_queued)]
        wait_for_metrics(server, lambda t: metric(t, "pyforge:num_requests_waiting") == n_queued, timeout=60)
        t0 = time.monotonic()
        os.kill(engine_pid(server), signal.SIGKILL)
        try:
            list(running)
            running_error = False
        except Exception:       # noqa: BLE001 - any error event counts
            running_error = True
        while get(server.url + "/health/ready")[0] != 200:
            time.sleep(0.02)
        ready = time.monotonic() - t0
        done = [f.result().usage.completion_tokens == 8 for f in queued]
        completed = time.monotonic() - t0
    return ready, completed, all(done), running_error


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--queued", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    server = Server(args.model, "--threads", str(args.threads), "--max-num-seqs", "1", "--max-model-len", "4096",
                    "--kv-cache-tokens", "8192", workers=1)
    server.name = Path(args.model).stem
    try:
        rows = [one_kill(server, args.queued) for _ in range(args.kills)]
    finally:
        server.stop()
    print(f"\nengine restart after SIGKILL: {Path(args.model).name}, {args.threads} threads, {cpu_description()}\n")
    print("| kill | ready again (s) | queued done (s) | queued completed | running got an error |")
    print("|---|---|---|---|---|")
    for i, (ready, completed, ok, err) in enumerate(rows, 1):
        print(f"| {i} | {ready:.2f} | {completed:.2f} | {'yes' if ok else 'NO'} | {'yes' if err else 'NO'} |")
    print(f"\nmedian ready again: {statistics.median(r[0] for r in rows):.2f} s")


if __name__ == "__main__":
    main()

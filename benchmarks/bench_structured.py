"""What structured output costs: generated tokens/s with every request under a JSON
schema vs unconstrained, through `pyforge serve`, and the engine's mask timings.

    python benchmarks/bench_structured.py [--concurrency 16] [--requests 64] [--rounds 3]
                                          [--threads 2] [--model PATH] [--null-model] [--json OUT]

Serving: one `pyforge serve` (the real model, or --null-model: no forward pass, the
stack's own ceiling), then rounds of two levels alternated on the same warm server:
c clients streaming /v1/completions (64-token prompts, greedy, 64 tokens) plainly,
then each with `json_schema` = ORDER_SCHEMA, a realistic order-with-line-items shape
whose minItems keeps it open past 64 tokens, so both levels generate the same count.
Reported: median tokens/s of each and their ratio (targets: >= 0.9 with the model,
>= 0.5 with the null model).

Engine (in-process, the same model): c sequences under the schema decoding together;
per step, the time llguidance took to compute the step's masks (p50 / p99) and
the time the engine still waited for them after its forward pass; overlap is the
share of the mask time computed on the mask thread that the forward pass hid
(masks are computed in line, unhidden, after a forward pass under 2 ms: the first
step, and every null-model step).

Default model: the synthetic tinyllama-1.1b Q4_K_M (pyforge.synthetic.ensure_model).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import free_port, make_prompts, pct, run_level, start_pyforge, stop, wait_up  # noqa: E402
from machine import cpu_description  # noqa: E402

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24},
            "email": {"type": "string", "format": "email"}}, "required": ["name", "email"]},
        "items": {"type": "array", "minItems": 40, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "maxLength": 12},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "minimum": 0}}, "required": ["sku", "qty", "price"],
            "additionalProperties": False}},
    },
    "required": ["order_id", "customer", "items"],
    "additionalProperties": False,
}


def serving(args, model):
    port = free_port()
    proc = start_pyforge(model, port, args.threads, max(args.concurrency, 16), 64 + args.max_tokens,
                         null_model=args.null_model)
    try:
        wait_up(port, proc)
        prompts = make_prompts(model, args.requests)
        run_level(port, prompts[:args.concurrency], args.concurrency, 8)                       # warm-up
        run_level(port, prompts[:args.concurrency], args.concurrency, 8, extra={"json_schema": ORDER_SCHEMA})
        rates = {"plain": [], "schema": []}
        levels = [("plain", None), ("schema", {"json_schema": ORDER_SCHEMA})]
        for r in range(args.rounds):
            for name, extra in levels if r % 2 == 0 else levels[::-1]:     # neither always goes first
                row = run_level(port, prompts, args.concurrency, args.max_tokens, extra=extra)
                if row["short_requests"]:
                    raise RuntimeError(f"{row['short_requests']} {name} requests ended early")
                rates[name].append(row["tokens_per_s"])
        return {name: statistics.median(v) for name, v in rates.items()} | {"rounds": rates}
    finally:
        stop(proc)


def engine_masks(args, model):
    from pyforge import Engine, SamplingParams
    from pyforge.structured import grammar_for
    engine = Engine(model, n_threads=args.threads, max_num_seqs=args.concurrency, max_model_len=2048,
                    kv_cache_tokens=args.concurrency * (64 + args.max_tokens + 16) + 1024, null_model=args.null_model)
    grammar = grammar_for("json_schema", ORDER_SCHEMA)
    prompts = [engine.tokenizer.encode(p) for p in make_prompts(model, args.concurrency)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, grammar=grammar)
    for p in prompts:
        engine.add_request(p, params)
    start, steps = time.perf_counter(), 0
    while engine.has_work:
        engine.step()
        steps += 1
    wall = time.perf_counter() - start
    timings = list(engine.guided.timings)
    compute = [c * 1e3 for c, _, _ in timings]
    waited = [w * 1e3 for _, w, _ in timings]
    threaded = [(c, w) for c, w, on_thread in timings if on_thread]
    hidden = 1 - sum(w for _, w in threaded) / max(sum(c for c, _ in threaded), 1e-12) if threaded else 0.0
    return {"steps": steps, "wall_s": wall, "mask_ms_p50": pct(compute, 50), "mask_ms_p99": pct(compute, 99),
            "wait_ms_p50": pct(waited, 50), "wait_ms_p99": pct(waited, 99),
            "threaded_steps": len(threaded), "overlap": hidden}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--null-model", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.model is None:
        from pyforge.synthetic import ensure_model
        args.model = str(ensure_model("tinyllama-1.1b", "Q4_K_M"))
    result = {"cpu": cpu_description(), "model": args.model, "null_model": args.null_model,
              "concurrency": args.concurrency, "threads": args.threads}
    result["engine"] = engine_masks(args, args.model)
    result["serving"] = serving(args, args.model)
    s, e = result["serving"], result["engine"]
    print(f"{result['cpu']}, {args.threads} threads, {Path(args.model).name}"
          f"{' (null model)' if args.null_model else ''}, concurrency {args.concurrency}")
    print(f"{'unconstrained tok/s':>20} {'json_schema tok/s':>18} {'ratio':>6} | "
          f"{'mask ms p50/p99':>16} {'wait ms p50/p99':>16} {'overlap':>8} (of {e['threaded_steps']} steps)")
    print(f"{s['plain']:20.1f} {s['schema']:18.1f} {s['schema'] / s['plain']:6.2f} | "
          f"{e['mask_ms_p50']:7.2f} / {e['mask_ms_p99']:6.2f} {e['wait_ms_p50']:7.2f} / {e['wait_ms_p99']:6.2f} "
          f"{e['overlap']:8.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

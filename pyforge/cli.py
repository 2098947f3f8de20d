"""`pyforge serve | generate | inspect` — the command-line entry point."""
import argparse
import os
import sys
import time


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    p.add_argument("--model", required=True, help="GGUF file or Hugging Face model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--device", default="auto", help="auto (cuda when CuPy sees a GPU, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="cuda: fraction of the GPU's memory for weights and the KV cache")
    p.add_argument("--cuda-graphs", action="store_true", help="cuda: decode steps as captured CUDA graph replays")
    p.add_argument("--quantization", default="none",
                   help="quantize float matmul weights at load: none, q8_0, q4_k (Q4_K_M mix) or q4_0")
    p.add_argument("--speculative-config", default=None,
                   help='n-gram speculative decoding, vLLM\'s JSON: \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, f32, f16, bf16 or q8_0 (cpu); auto, f16 or fp8_e4m3 (cuda)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=run_generate)


def add_inspect_parser(sub):
    p = sub.add_parser("inspect", help="print a model file's architecture, tensors and vocabulary")
    p.add_argument("path")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(func=run_inspect)


def add_serve_parser(sub):
    from pyforge.config import add_arguments

    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (engine process + gunicorn)")
    add_arguments(p)
    p.set_defaults(func=run_serve)


def run_serve(args):
    from pyforge.config import ServerConfig
    from pyforge.server.launcher import serve

    status = serve(ServerConfig.from_sources(args))
    if status:
        sys.exit(status)


def run_generate(args):
    from pyforge.engine.engine import Engine
    from pyforge.engine.sampling_params import SamplingParams
    from pyforge.tokenizer import IncrementalDetokenizer

    engine = Engine(args.model, device=args.device, n_threads=args.threads,
                    gpu_memory_utilization=args.gpu_memory_utilization, cuda_graphs=args.cuda_graphs,
                    quantization=args.quantization, speculative_config=args.speculative_config,
                    kv_cache_dtype=args.kv_cache_dtype)
    tok = engine.tokenizer
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt_ids = tok.encode(text)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
    )
    detok = IncrementalDetokenizer(tok, prefix_ids=prompt_ids)
    start = time.perf_counter()
    first = None
    n = 0
    for out in engine.generate(prompt_ids, params):
        first = first or time.perf_counter()
        n += 1
        if out.token_id not in tok.eos_ids:
            sys.stdout.write(detok.feed(out.token_id))
            sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    sys.stdout.flush()   # the stats go to stderr: keep them after the text
    end = time.perf_counter()
    prefill = first - start if first else 0.0
    decode = (end - first) / max(n - 1, 1) if first else 0.0
    print(
        f"[{len(prompt_ids)} prompt tokens in {prefill:.2f} s ({len(prompt_ids) / max(prefill, 1e-9):.1f} tok/s); "
        f"{n} generated, {1 / max(decode, 1e-9):.1f} tok/s]",
        file=sys.stderr,
    )


def run_inspect(args):
    from pyforge.inspect import describe

    print(describe(args.path, list_tensors=args.tensors))


def main(argv=None):
    from pyforge import __version__

    parser = argparse.ArgumentParser(prog="pyforge", description="pyforge LLM inference")
    parser.add_argument("--version", action="version", version=f"pyforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_generate_parser(sub)
    add_inspect_parser(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader left (`pyforge inspect FILE | head`): nothing went wrong. Point stdout
        # at /dev/null, or the interpreter's own last flush raises the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        print(f"pyforge: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

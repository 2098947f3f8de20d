#!/usr/bin/env python3
"""`pyforge serve` behind llama-server's command line, to run llama.cpp's own server
tests (tools/server/tests in llama.cpp's tree) against pyforge, unchanged.

Their utils.py starts `$LLAMA_SERVER_BIN_PATH` with llama-server flags; point it here:

    LLAMA_SERVER_BIN_PATH=$PWD/tests/compat/pyforge_as_llama_server.py \\
        python -m pytest -q <llama.cpp>/tools/server/tests/unit/test_basic.py ...

(tests/compat/run_llama_server_tests.sh fetches the tree from llama-cpp-python's
source distribution and runs the selection). Each flag is mapped to ours where
pyforge has the meaning; flags for llama-only features are dropped, and listed on
stderr so a failing test's log says what was not applied. Models named by
llama-server's --hf-repo/--hf-file are looked up in MODELS: the tests' downloads
are the files in ../shared/models (nothing is downloaded here). Their conftest first
starts every preset without --offline (to download its model): an unknown model then
starts as stories260K, so that warm-up passes; a test that really uses one fails.
"""
import os
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MODELS = {   # llama-server's --hf-repo[/--hf-file] -> a local file
    "ggml-org/test-model-stories260K": SHARED / "models" / "stories260K" / "stories260K.gguf",
    "ggml-org/models/tinyllamas/stories260K.gguf": SHARED / "models" / "stories260K" / "stories260K.gguf",
}
STAND_IN = MODELS["ggml-org/test-model-stories260K"]
# llama-server flag -> our flag (each takes a value)
VALUE_FLAGS = {
    "--port": "--port", "--threads": "--threads", "-t": "--threads", "--alias": "--served-model-name",
    "--ctx-size": "--max-model-len", "-c": "--max-model-len", "--parallel": "--max-num-seqs", "-np": "--max-num-seqs",
    "--n-predict": "--default-max-tokens", "-n": "--default-max-tokens", "--api-key": "--api-key",
    "--cors-origins": "--allowed-origins", "--cors-methods": "--allowed-methods",
    "--cors-headers": "--allowed-headers", "--temp": "--default-temperature",
    "--chat-template-file": "--chat-template", "--model": "--model", "-m": "--model",
}
# llama-server's CORS defaults (common.h): any origin, credentials, these methods and headers
CORS_DEFAULTS = {"--allowed-origins": "*", "--allow-credentials": "true",
                 "--allowed-methods": "GET, POST, DELETE, OPTIONS", "--allowed-headers": "*"}
DROPPED_WITH_VALUE = {"--seed", "--batch-size", "-b", "--ubatch-size", "-ub", "--n-gpu-layers", "-ngl", "-ctk",
                      "-ctv", "-fa", "--slot-save-path", "--grp-attn-n", "--grp-attn-w", "--tags",
                      "--sleep-idle-seconds", "--cache-ram", "--reasoning-format", "--reasoning", "--pooling",
                      "--spec-type", "--spec-draft-n-max", "--spec-draft-n-min", "--lora", "--media-path"}


def translate(argv):
    """(pyforge serve flags, dropped llama-server flags)."""
    out, dropped, repo, hf_file, template = [], [], None, None, None
    offline = "--offline" in argv
    it = iter(argv)
    for flag in it:
        if flag in VALUE_FLAGS:
            value = next(it)
            if flag == "--cors-origins":
                value = value.replace(" ", "")
            if flag == "--n-predict" and int(value) < 0:
                continue                    # -1: unlimited, our default
            out += [VALUE_FLAGS[flag], value]
        elif flag == "--host":
            out += ["--host", next(it)]
        elif flag == "--hf-repo":
            repo = next(it)
        elif flag == "--hf-file":
            hf_file = next(it)
        elif flag == "--chat-template":
            template = next(it)
        elif flag == "--offline":
            continue
        elif flag in ("--cors-credentials", "--no-cors-credentials"):
            out += ["--allow-credentials", str(flag == "--cors-credentials").lower()]
        elif flag in ("--no-webui", "--no-ui"):
            out += ["--playground", "false"]
        elif flag in DROPPED_WITH_VALUE:
            dropped.append(f"{flag} {next(it)}")
        elif flag.startswith("-"):
            dropped.append(flag)            # switches: --jinja, --metrics (always on), --no-slots, ...
    if repo is not None:
        key = f"{repo}/{hf_file}" if hf_file else repo
        if key not in MODELS and offline:
            sys.exit(f"pyforge_as_llama_server: no local file for --hf-repo {key} (add it to MODELS)")
        out += ["--model", str(MODELS.get(key, STAND_IN))]
    elif "--model" not in out and not offline:
        out += ["--model", str(STAND_IN)]      # a router preset (models from a folder): warm-up only
    for flag, value in CORS_DEFAULTS.items():
        if flag not in out:
            out += [flag, value]
    out += ["--chat-template", template or "chatml", "--workers", "1"]
    return out, dropped


def main():
    flags, dropped = translate(sys.argv[1:])
    if dropped:
        print(f"pyforge_as_llama_server: not applied: {' '.join(dropped)}", file=sys.stderr)
    os.execvp(sys.executable, [sys.executable, "-m", "pyforge.cli", "serve", *flags])


if __name__ == "__main__":
    main()

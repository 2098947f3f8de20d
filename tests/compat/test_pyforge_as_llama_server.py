"""The llama-server command line as the shim turns it into `pyforge serve` flags."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("shim", Path(__file__).with_name("pyforge_as_llama_server.py"))
shim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shim)


def test_a_preset_maps_onto_our_flags():
    flags, dropped = shim.translate(
        ["--port", "8080", "--temp", "0.8", "--seed", "42", "--host", "127.0.0.1,::1", "--offline",
         "--hf-repo", "ggml-org/test-model-stories260K", "--batch-size", "32", "--no-slots", "--alias", "tinyllama-2",
         "--ctx-size", "512", "--parallel", "2", "--n-predict", "64", "--api-key", "k", "--cors-origins", "a, b",
         "--jinja"])
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--port"] == "8080" and pairs["--host"] == "127.0.0.1,::1" and pairs["--default-temperature"] == "0.8"
    assert (pairs["--served-model-name"], pairs["--max-model-len"], pairs["--max-num-seqs"]) == ("tinyllama-2", "512", "2")
    assert (pairs["--default-max-tokens"], pairs["--api-key"], pairs["--allowed-origins"]) == ("64", "k", "a,b")
    assert pairs["--model"] == str(shim.STAND_IN) and pairs["--chat-template"] == "chatml"
    assert dropped == ["--seed 42", "--batch-size 32", "--no-slots", "--jinja"]


def test_unknown_models_start_only_for_the_warm_up():
    flags, _ = shim.translate(["--hf-repo", "ggml-org/models", "--hf-file", "bert-bge-small/ggml-model-f16.gguf"])
    assert flags[flags.index("--model") + 1] == str(shim.STAND_IN)          # warm-up: no --offline
    with pytest.raises(SystemExit, match="no local file for --hf-repo ggml-org/models/bert"):
        shim.translate(["--offline", "--hf-repo", "ggml-org/models", "--hf-file", "bert-bge-small/ggml-model-f16.gguf"])


def test_unlimited_n_predict_keeps_our_default():
    flags, _ = shim.translate(["--n-predict", "-1", "--hf-repo", "ggml-org/test-model-stories260K"])
    assert "--default-max-tokens" not in flags


def test_llama_server_cors_defaults_and_switches():
    flags, _ = shim.translate(["--hf-repo", "ggml-org/test-model-stories260K", "--no-ui"])
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert (pairs["--allowed-origins"], pairs["--allow-credentials"]) == ("*", "true")
    assert pairs["--allowed-methods"] == "GET, POST, DELETE, OPTIONS" and pairs["--allowed-headers"] == "*"
    assert pairs["--playground"] == "false"
    flags, _ = shim.translate(["--cors-origins", "a", "--no-cors-credentials"])
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert (pairs["--allowed-origins"], pairs["--allow-credentials"]) == ("a", "false")

"""The command line, run as a user runs it (a subprocess of `python -m pyforge.cli`)."""
import subprocess
import sys

import pytest

from conftest import REPO, STORIES


def pyforge(*args):
    return subprocess.run([sys.executable, "-m", "pyforge.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_generate_streams_the_greedy_story():
    r = pyforge("generate", "--model", str(STORIES), "--prompt", "Once upon a time", "--temperature", "0",
                "--max-tokens", "24", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "there was a little girl named Lily" in r.stdout
    assert "tok/s" in r.stderr


def test_inspect_describes_the_model():
    r = pyforge("inspect", str(STORIES))
    assert r.returncode == 0, r.stderr
    for expected in ("architecture:  llama", "layers:        5", "8 query, 4 kv", "F32", "512 tokens"):
        assert expected in r.stdout
    # 2 (K, V) x 5 layers x 4 kv heads x head dim 8 x 4 / 2 bytes; no q8_0 for head dim 8
    assert "KV cache:      bytes per token f32 1,280, f16 640, bf16 640, fp8_e4m3 320" in r.stdout


def test_inspect_shows_the_family_options(tmp_path):
    from pyforge.synthetic import write_gguf

    path = write_gguf("tiny-gemma2", tmp_path / "g2.gguf", "F32")
    r = pyforge("inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "architecture:  gemma2" in r.stdout
    assert ("options:       tied head, attention scale 0.176777, embeddings x 8, attention soft cap 0.05, "
            "logit soft cap 0.5, sliding window 24 on 2 of 4 layers") in r.stdout
    assert "options:       none" in pyforge("inspect", str(STORIES)).stdout
    stablelm = pyforge("inspect", str(write_gguf("tiny-stablelm", tmp_path / "s.gguf", "F32")))
    assert "(neox, 4 dims)" in stablelm.stdout
    assert "options:       q/k/v biases, LayerNorms (eps 1e-05)" in stablelm.stdout


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00", b"not a model at all"])
def test_bad_model_file_is_one_clear_error(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    r = pyforge("generate", "--model", str(bad), "--prompt", "hi")
    assert r.returncode == 1
    assert str(bad) in r.stderr and "Traceback" not in r.stderr


def test_chat_without_a_template_is_a_clear_error():
    r = pyforge("generate", "--model", str(STORIES), "--prompt", "hi", "--chat")
    assert r.returncode == 1 and "template" in r.stderr and "Traceback" not in r.stderr


def test_generate_quantizes_at_load():
    r = pyforge("generate", "--model", str(STORIES), "--prompt", "Once upon a time", "--temperature", "0",
                "--max-tokens", "24", "--threads", "1", "--quantization", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "there was a little girl named Lily" in r.stdout
    r = pyforge("generate", "--model", str(STORIES), "--prompt", "hi", "--quantization", "q5")
    assert r.returncode == 1 and "q5" in r.stderr and "Traceback" not in r.stderr

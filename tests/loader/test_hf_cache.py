"""Repo ids resolve to the local Hugging Face hub cache, never to a download."""
import pytest

from pyforge.loader import ModelFileError, load_model_file
from pyforge.synthetic import write_hf_folder


def fake_hub(tmp_path, repo_id, commit="0123abcd"):
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_repo_id_loads_the_cached_snapshot(tmp_path, monkeypatch):
    snapshot = fake_hub(tmp_path, "acme/tiny-model")
    write_hf_folder("tiny-gqa", snapshot, dtype="float32", seed=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with load_model_file("acme/tiny-model") as mf:
        assert mf.config.n_layers == 2
        assert mf.path.endswith("0123abcd")


def test_uncached_repo_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelFileError, match="never downloads"):
        load_model_file("acme/not-here")


def test_repo_file_spec_with_a_tokenizer_from_another_repo(tmp_path, monkeypatch):
    from pyforge.synthetic import write_gguf
    from pyforge.tokenizer import load_tokenizer
    gguf_snapshot = fake_hub(tmp_path, "acme/tiny-GGUF", commit="feed01")
    gguf_snapshot.mkdir(parents=True)
    write_gguf("tiny-mha", gguf_snapshot / "tiny.F32.gguf", dtype="F32")
    tok_snapshot = fake_hub(tmp_path, "acme/tiny-chat", commit="beef02")
    write_hf_folder("tiny-gqa", tok_snapshot)
    (tok_snapshot / "tokenizer_config.json").write_text(
        '{"chat_template": "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"}')
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with load_model_file("acme/tiny-GGUF:tiny.F32.gguf") as mf:
        assert mf.path.endswith("feed01/tiny.F32.gguf") and mf.tokenizer_source[0] == "gguf"
    with load_model_file("acme/tiny-GGUF:tiny.F32.gguf@acme/tiny-chat") as mf:
        assert mf.config.n_heads == 4 and mf.tokenizer_source == ("hf", str(tok_snapshot))
        tok = load_tokenizer(mf)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<<hi>>"


@pytest.mark.parametrize("spec, message", [
    ("acme/tiny-GGUF:missing.gguf", "has no file 'missing.gguf'"),
    ("acme/absent-GGUF:x.gguf", "the model repo has no cached snapshot"),
    ("acme/tiny-GGUF:tiny.F32.gguf@acme/no-tok", "the tokenizer repo has no cached snapshot"),
])
def test_spec_errors_name_what_is_missing(tmp_path, monkeypatch, spec, message):
    from pyforge.synthetic import write_gguf
    snapshot = fake_hub(tmp_path, "acme/tiny-GGUF")
    snapshot.mkdir(parents=True)
    write_gguf("tiny-mha", snapshot / "tiny.F32.gguf", dtype="F32")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelFileError, match=message):
        load_model_file(spec)

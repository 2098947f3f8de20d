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

"""Find a Hugging Face repo id ("org/name") in the local hub cache.

pyforge never downloads: a model named by repo id must already be in the cache
that `huggingface_hub` fills (models--org--name/snapshots/<revision>/), found
through HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub, as the hub does;
so it behaves as the hub does under HF_HUB_OFFLINE=1 whatever that is set to
(`huggingface-cli download REPO` fills the cache).

A model spec names one model:

    /path/model.gguf | /path/hf-folder | org/name
    org/name-GGUF:file.gguf              a GGUF file of a GGUF repo
    org/name-GGUF:file.gguf@org/tok      ... with the tokenizer and chat template of another repo
                                         (or of a local folder)
"""
import os
import re
from typing import NamedTuple

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_REPO_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<file>[^:@]+)$")


class ModelSpec(NamedTuple):
    path: str                   # the model file or folder, resolved in the cache
    tokenizer: str | None       # a folder holding tokenizer.json, or None: the model's own


def resolve_spec(spec):
    """ModelSpec of a model spec (above); FileNotFoundError names what is not cached."""
    main, tokenizer = spec, None
    if "@" in spec:
        main, tokenizer = spec.rsplit("@", 1)
        tokenizer = _folder(tokenizer, "the tokenizer repo")
    match = _REPO_FILE.match(main)
    if match and not os.path.exists(main):
        folder = _folder(match["repo"], "the model repo")
        path = os.path.join(folder, match["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{spec}: the cached snapshot of {match['repo']} ({folder}) has no file "
                                    f"{match['file']!r}")
        return ModelSpec(path, tokenizer)
    if looks_like_repo_id(main):
        return ModelSpec(_folder(main, "the model repo"), tokenizer)
    return ModelSpec(main, tokenizer)


def _folder(name, what):
    """A local folder, or the cached snapshot of a repo id."""
    if os.path.isdir(name) or not looks_like_repo_id(name):
        return name
    folder = snapshot_folder(name)
    if folder is None:
        raise FileNotFoundError(f"{name}: no such file or folder, and {what} has no cached snapshot in "
                                f"{hub_cache_dir()} (pyforge never downloads weights; "
                                f"`huggingface-cli download {name}` fills the cache)")
    return folder


def hub_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def looks_like_repo_id(name):
    return bool(_REPO_ID.match(name)) and not os.path.exists(name)


def snapshot_folder(repo_id, revision="main"):
    """The cached snapshot folder of repo_id, or None when it is not cached."""
    repo_dir = os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(repo_dir, "refs", revision)
    snapshots = os.path.join(repo_dir, "snapshots")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
        folder = os.path.join(snapshots, commit)
        return folder if os.path.isdir(folder) else None
    if os.path.isdir(snapshots):   # no ref file: take the newest snapshot
        candidates = [os.path.join(snapshots, d) for d in os.listdir(snapshots)]
        candidates = [d for d in candidates if os.path.isdir(d)]
        if candidates:
            return max(candidates, key=os.path.getmtime)
    return None

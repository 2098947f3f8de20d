"""Find a Hugging Face repo id ("org/name") in the local hub cache.

pyforge never downloads: a model named by repo id must already be in the cache
that `huggingface_hub` fills (models--org--name/snapshots/<revision>/), found
through HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub, as the hub does.
"""
import os
import re

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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

"""`system_fingerprint`: which build served a response, as OpenAI reports it.

    system_fingerprint(model_spec) -> "fp_" + 12 hex digits

A hash of the pyforge version and the model's identity: the spec's resolved path
and, for each of its files (the GGUF file, or a Hugging Face folder's files), name,
size and modification time. Every worker of a server computes the same string, a
restart on the same files keeps it, and an upgrade or a new model file changes it:
a client sees when the same request may answer differently.
"""
import hashlib
import os

from pyforge import __version__
from pyforge.loader.hf_cache import resolve_spec


def system_fingerprint(model_spec):
    digest = hashlib.sha256(f"pyforge {__version__}\0{model_spec}".encode())
    for entry in _identity(model_spec):
        digest.update(f"\0{entry}".encode())
    return "fp_" + digest.hexdigest()[:12]


def _identity(model_spec):
    """(path, size, mtime_ns) of the model's files; [] where they cannot be found."""
    try:
        path = resolve_spec(str(model_spec)).path
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, name) for name in os.listdir(path))
        return [(f, s.st_size, s.st_mtime_ns) for f, s in ((f, os.stat(f)) for f in files)]
    except (OSError, ValueError):
        return []

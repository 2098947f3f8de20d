"""Model files in, config + memory-mapped tensors out.

`load_model_file(path)` takes a GGUF file or a Hugging Face folder
(config.json + *.safetensors [+ model.safetensors.index.json]) and returns a
`ModelFile`: a validated `ModelConfig`, the tensors under canonical (GGUF)
names as zero-copy numpy views over the mapped file(s), the GGUF metadata and
where the tokenizer lives. Files are untrusted: every size, offset and count is
checked before use, and any problem is a `ModelFileError("<path>: <problem>")`.
"""
import os
from dataclasses import dataclass

import numpy as np

from pyforge.ggml_types import GGMLType
from pyforge.loader.hf_cache import resolve_spec
from pyforge.loader.names import expected_shapes, optional_shapes


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt or unsupported."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class TensorRef:
    name: str
    ggml_type: GGMLType
    shape: tuple          # numpy order, rows first: weight matrices are (n_out, n_in)
    # Zero-copy view over the mapped file. F32 -> float32, F16 -> float16,
    # BF16 -> uint16, all shaped `shape`; quantized types -> uint8 shaped
    # (*shape[:-1], bytes per row).
    data: np.ndarray


class ModelFile:
    """What load_model_file returns; close() unmaps (views handed out keep the map alive)."""

    def __init__(self, path, config, tensors, metadata, tokenizer_source, closers=()):
        self.path = str(path)
        self.config = config
        self.tensors = tensors            # canonical name -> TensorRef
        self.metadata = metadata          # GGUF: key -> value (arrays as lists); HF: {}
        self.tokenizer_source = tokenizer_source   # ("gguf", metadata) or ("hf", folder)
        self._closers = list(closers)

    def close(self):
        self.tensors = {}
        closers, self._closers = self._closers, []
        for close in closers:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ModelFile({self.path!r}, {self.config.arch}, {len(self.tensors)} tensors)"


def load_model_file(spec):
    """A model spec (a GGUF file, a Hugging Face model folder, a cached repo id or
    repo:file.gguf[@tokenizer-repo]: loader/hf_cache.py) -> ModelFile."""
    spec = os.fspath(spec)
    try:
        path, tokenizer = resolve_spec(spec)
    except FileNotFoundError as e:
        raise ModelFileError(spec, str(e).split(": ", 1)[1]) from None
    model_file = _load_path(path)
    if tokenizer is not None:
        if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
            model_file.close()
            raise ModelFileError(spec, f"the tokenizer folder {tokenizer} has no tokenizer.json")
        model_file.tokenizer_source = ("hf", tokenizer)
    return model_file


def _load_path(path):
    if os.path.isdir(path):
        from pyforge.loader.hf import load_hf_folder
        return load_hf_folder(path)
    if not os.path.exists(path):
        raise ModelFileError(path, "no such file or folder")
    if path.endswith(".safetensors"):
        raise ModelFileError(path, "a .safetensors file needs its model folder (with config.json); pass the folder")
    from pyforge.loader.gguf import load_gguf
    return load_gguf(path)


def check_tensors(path, config, tensors, file_name=None):
    """Every required tensor present with the config's shape, nothing unknown.

    file_name: canonical name -> the name in the file, for messages about HF files.
    """
    def label(name):
        other = file_name(name) if file_name else None
        return f"{name} ({other})" if other and other != name else name

    required = expected_shapes(config)
    optional = optional_shapes(config)
    for name, shape in required.items():
        if name not in tensors:
            raise ModelFileError(path, f"missing tensor {label(name)}")
        if tuple(tensors[name].shape) != shape:
            raise ModelFileError(path, f"tensor {label(name)} has shape {tuple(tensors[name].shape)}, "
                                       f"expected {shape} from the config")
    for name, ref in tensors.items():
        if name in required:
            continue
        if name not in optional:
            raise ModelFileError(path, f"unexpected tensor {label(name)} "
                                       f"(not part of a {config.arch} model with this config)")
        if tuple(ref.shape) != optional[name]:
            raise ModelFileError(path, f"tensor {label(name)} has shape {tuple(ref.shape)}, expected {optional[name]}")


def validated(path, config):
    try:
        return config.validate()
    except ValueError as e:
        raise ModelFileError(path, f"invalid model config: {e}") from None

"""Both backends implement the whole Backend protocol (same names, same parameters),
and the model definitions and the engine call nothing outside it."""
import inspect
import re
from pathlib import Path

import pytest

from pyforge.backends.cpu import CpuBackend
from pyforge.backends.cuda import CudaBackend
from pyforge.backends.protocol import Backend

PACKAGE = Path(__file__).resolve().parents[2] / "pyforge"
METHODS = {name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")}
ATTRIBUTES = set(Backend.__annotations__)
# what only the cuda backend offers, asked for by name where the engine turns CUDA graphs on
CUDA_ONLY = {"use_cuda_graphs", "graphs"}


def parameters(function):
    return [p for p in inspect.signature(function).parameters if p != "self"]


@pytest.mark.parametrize("backend", [CpuBackend, CudaBackend], ids=lambda b: b.name)
def test_a_backend_implements_the_whole_protocol(backend):
    for name in METHODS:
        assert callable(getattr(backend, name, None)), f"{backend.name} lacks {name}"
        assert parameters(getattr(backend, name)) == parameters(getattr(Backend, name)), name
    instance_attributes = set(re.findall(r"self\.(\w+) =", inspect.getsource(backend.__init__)))
    for name in ATTRIBUTES:
        assert hasattr(backend, name) or name in instance_attributes, f"{backend.name} lacks {name}"


def test_models_and_engine_call_only_the_protocol():
    used = set()
    for path in [*PACKAGE.glob("models/*.py"), *PACKAGE.glob("engine/*.py")]:
        used |= set(re.findall(r"\b(?:b|backend)\.(\w+)", path.read_text()))
    assert used, "the pattern finds the calls"
    assert used <= METHODS | ATTRIBUTES | CUDA_ONLY, sorted(used - METHODS - ATTRIBUTES - CUDA_ONLY)

"""--device auto | cpu | cuda[:N] on a machine without CuPy
(CuPy's absence is forced, so these run the same on a GPU machine)."""
import subprocess
import sys

import pytest
from emulated_cupy import make_emulated_cupy

from pyforge.backends import get_backend, resolve_device
from pyforge.cli import main
from pyforge.engine.engine import Engine
from pyforge.synthetic import ensure_model


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # `import cupy` raises ImportError


@pytest.fixture
def emulated_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", make_emulated_cupy())


def test_auto_picks_cpu_without_cupy(no_cupy):
    assert resolve_device("auto") == "cpu"
    assert get_backend("auto").name == "cpu"


def test_cuda_without_cupy_is_one_clear_error(no_cupy):
    with pytest.raises(ValueError, match=r"device 'cuda' is not available: CuPy is not installed .*pyforge\[cuda12\]"):
        get_backend("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_backend("tpu")


def test_cli_reports_missing_cupy_without_a_traceback(no_cupy, capsys):
    path = ensure_model("small-k", "F16")
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--device", "cuda", "--max-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyforge: error: device 'cuda' is not available: CuPy is not installed")
    assert "Traceback" not in err


def test_auto_picks_cuda_when_cupy_sees_a_device(emulated_cupy):
    assert resolve_device("auto") == "cuda"
    assert resolve_device("auto", head_dim=64) == "cuda"
    assert resolve_device("auto", head_dim=16) == "cpu"     # the CUDA attention kernels need multiples of 32
    assert resolve_device("cpu") == "cpu"


def test_auto_engine_falls_back_to_cpu_for_small_heads(emulated_cupy):
    engine = Engine(str(ensure_model("tiny-gqa", "F32")), device="auto", n_threads=1, kv_cache_tokens=256)
    assert engine.backend.name == "cpu"
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        Engine(str(ensure_model("tiny-gqa", "F32")), device="cuda", n_threads=1, kv_cache_tokens=256)


def test_missing_device_index_is_an_error(emulated_cupy):
    with pytest.raises(ValueError, match=r"cuda:3 does not exist \(1 CUDA device"):
        get_backend("cuda:3")


def test_importing_the_cuda_backend_needs_no_cupy():
    code = ("import sys; sys.modules['cupy'] = None; import pyforge.backends.cuda, pyforge.backends.cuda_kernels; "
            "import pyforge.backends as b; print(b.resolve_device('auto'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cpu"

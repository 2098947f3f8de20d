"""What the package root offers (README's Python API)."""
import subprocess
import sys

import pyforge
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams


def test_engine_and_sampling_params_from_the_root():
    assert pyforge.Engine is Engine and pyforge.SamplingParams is SamplingParams


def test_importing_the_package_loads_no_compiled_module():
    code = "import sys, pyforge, pyforge.tokenizer; print(any(m.startswith('pyforge.native.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"

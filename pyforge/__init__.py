"""pyforge: a small LLM inference server with a compiled core.

Imported from a checkout's source tree after a non-editable install (`python -m
pytest` or gunicorn run from the repository folder put it first on sys.path),
the package also searches the installed copy, so the compiled modules, which
only the installed copy has, are found (see pyforge/native/__init__.py).
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"

_EXPORTS = {"Engine": "pyforge.engine.engine", "SamplingParams": "pyforge.engine.sampling_params"}


def __getattr__(name):
    """pyforge.Engine and pyforge.SamplingParams, imported on first use: `import pyforge`
    alone (an HTTP worker) loads none of the engine's compiled modules."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pyforge' has no attribute {name!r}")

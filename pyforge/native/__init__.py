"""Compiled extension modules (built from ../../native by setup.py).

Run from a checkout after a non-editable `pip install .`, `import pyforge` can
find the source tree first (`python -m`, `python -c` and gunicorn put the
current folder at the head of sys.path), and this folder there holds no
compiled modules: the installed package's copies of them are found instead.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

"""Compiled extension modules (built from ../../native by setup.py).

In a checkout used after a non-editable `pip install .`, this folder holds no
compiled modules: with pyforge/__init__.py's extended path, the installed
package's copies of them are found instead.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

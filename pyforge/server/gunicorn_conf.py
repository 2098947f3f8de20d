"""gunicorn settings and hooks: `gunicorn wsgi:app -c pyforge/server/gunicorn_conf.py` in a
checkout, `gunicorn pyforge.wsgi:app -c python:pyforge.server.gunicorn_conf` anywhere.

The configuration comes from LLM_* environment variables (and LLM_CONFIG, a
TOML file), as for `pyforge serve`. The hooks (launcher.py) start the engine
before the first worker, build each worker's app after its fork, and stop the
engine and remove the shared-memory segment when gunicorn exits.
"""
from pyforge.config import ServerConfig
from pyforge.server.launcher import _configure_logging, gunicorn_settings

_config = ServerConfig.from_sources(None)
_configure_logging(_config)         # now: gunicorn logs "Starting gunicorn" before on_starting runs
globals().update(gunicorn_settings(_config))

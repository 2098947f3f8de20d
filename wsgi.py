"""gunicorn entry point in a checkout: `gunicorn wsgi:app -c pyforge/server/gunicorn_conf.py`
(installed, from any folder: `gunicorn pyforge.wsgi:app -c python:pyforge.server.gunicorn_conf`)."""
from pyforge.wsgi import app

__all__ = ["app"]

"""gunicorn entry point of the installed package, usable from any folder:

    gunicorn pyforge.wsgi:app -c python:pyforge.server.gunicorn_conf

`app` is a placeholder: the config's post_worker_init hook builds each worker's
real app (engine client, tokenizer, routes) after the fork and swaps it in.
"""
from pyforge.server.launcher import placeholder_app as app

__all__ = ["app"]

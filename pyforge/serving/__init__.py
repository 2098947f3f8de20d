"""The engine process: the Engine behind the shared-memory segment (not HTTP;
pyforge/server is the HTTP worker side)."""

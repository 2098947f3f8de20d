"""The engine: requests, scheduling, sampling."""

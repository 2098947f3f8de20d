"""Why the engine ended a request with an error, as the engine and the IPC records
say it; only the HTTP side (pyforge/server/engine_client.py) maps a kind to a status."""
from enum import IntEnum

INTERNAL_ERROR = "internal error in the engine"     # what a client hears of our bugs


class ErrorKind(IntEnum):
    BAD_REQUEST = 1         # the request cannot run (a bad prompt or parameter)
    OVERLOADED = 2          # the waiting queue is full: retry later
    OUT_OF_MEMORY = 3       # its step ran out of (GPU) memory: retry later
    SHUTTING_DOWN = 4       # the engine is draining or stopping
    INTERNAL = 5            # our bug

"""Ctrl-C and SIGTERM routed to one handler for the span of a ``with`` block, so that the
training loop (`train.stop_requests`) and the study driver (`study.driver`) stop alike on
both signals."""
from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def routed(handler):
    """`handler` for SIGINT and SIGTERM inside the block; the previous handlers come back on
    leaving. Outside the main thread signals cannot be set, and are left alone."""
    old = {}
    try:
        for sig in STOP_SIGNALS:
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)

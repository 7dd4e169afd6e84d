from __future__ import annotations

from django.dispatch import Signal

# Sent (from a thread of its own) when an ASGI worker is about to stop, after its last
# request: uvicorn then ends the process with the signal it was stopped by, so `atexit`
# handlers never run. Whatever a worker keeps in memory for later is written here.
worker_stopping = Signal()

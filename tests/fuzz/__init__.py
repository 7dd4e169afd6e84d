"""Fuzzing with hypothesis: the JSON API, the playground's send, every admin form.

Requests go through the ASGI application the site runs under (platform_site.asgi, with
the middleware twins), signed in with a session cookie and a CSRF token as a browser
is, and the chat calls that get through reach a real OpenAI-compatible server on
loopback. Strategies: tests/fuzz/strategies.py; the harness: tests/fuzz/conftest.py.

Every example must end without a 500 (or any 5xx: the upstream is healthy), with
nothing logged at ERROR or with a traceback (root and "django" loggers), with usage
records the database can store (the buffer is flushed after each example), and for the
JSON API with 4xx answers in the documented {"error": {"message", "type"}} shape. After
each test's examples, one more real chat call must be recorded.

Every 500 found so far is pinned as its minimal input in tests/fuzz/test_found.py.

Reproducible by default: examples are derandomized (the same ones on every run, CI and
laptop alike) and no example database is written. To explore instead, with random
seeds and failures kept in .hypothesis/ (ignored by git):

    KEYROUTE_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/fuzz -n 0 -p no:randomly

A failure prints the minimal input that fails and the problem it caused. The whole
package takes about 35 s per database on a 2-core machine (SQLite or PostgreSQL).
"""

"""Connection pools of event loops that end (the test client's, a command's asyncio.run)
are closed with their loop, not dropped: nothing warns about unclosed sessions at exit."""

from __future__ import annotations

import pytest

from credentials.models import APIKeyCredentials
from tests.conftest import TEST_REDIS_URL, database_url, run_python, subprocess_env

SCRIPT = """
import asyncio, gc, json, os, sys
import django
django.setup()
from django.contrib.auth import get_user_model
from django.test import Client
from django.db import connections
from credentials.models import PLATFORM, APIKeyCredentials
from llm import services, usage

credential = APIKeyCredentials.objects.get(pk=sys.argv[1])
browser = Client()
browser.force_login(get_user_model().objects.get(username="alice"))
body = {"credential": sys.argv[1], "model": "gpt-test-mini",
        "messages": [{"role": "user", "content": "hi"}]}
for stream in (False, True):  # each request runs the async view on a loop of its own
    # (under the test client, a stream is collected into one answer)
    answer = browser.post("/api/llm/chat", json.dumps({**body, "stream": stream}),
                          content_type="application/json")
    assert answer.status_code == 200, answer.content

async def command():  # what a management command running its own loop does
    result = await services.achat(messages=body["messages"], model="gpt-test-mini",
                                  credential=credential, user=PLATFORM)
    assert result.text == "echo: hi"

asyncio.run(command())
usage.flush()
connections.close_all()  # what is left for a command to close: its database connection
gc.collect()
print("done")
"""


@pytest.mark.parametrize("cache_url", ["locmemcache://", TEST_REDIS_URL])
def test_nothing_is_left_unclosed_at_exit(
    transactional_db, django_user_model, credential_factory, upstream, cache_url
):
    alice = django_user_model.objects.create_user("alice")
    credential: APIKeyCredentials = credential_factory(owner=alice, base_url=upstream.base_url)
    env = subprocess_env(
        DATABASE_URL=database_url(),
        CACHE_URL=cache_url,
        DJANGO_SETTINGS_MODULE="platform_site.settings",
        ALLOWED_HOSTS="testserver",
        PYTHONWARNINGS="always",
        PYTHONDEVMODE="1",  # shows every ResourceWarning
    )

    result = run_python("-c", SCRIPT, str(credential.pk), env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert len(upstream.requests) == 3
    assert "nclosed" not in result.stderr, result.stderr
    assert "ResourceWarning" not in result.stderr, result.stderr

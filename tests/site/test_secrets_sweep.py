"""The secrets sweep: one distinctive key, used every way the site offers, shows nowhere.

An admin adds a credential with the key, edits it, re-points it (entering the key
again); users call through it (success, key rejected with the key echoed back, model
refused, upstream error, timeout, streams, embeddings, the model list, the playground,
a failover from a dead proxy, a proxy down until its circuit breaker opens); the same
failures are raised below the views, through both SDK clients; the admin tests,
diagnoses and rotates; the doctor runs. Then every place a user or an operator could
read is searched for the key, its first characters (all but the 4 of the hint the admin
shows on purpose), its random middle, and its base64 and hex forms: every table, row by
row, with plain SQL; dumpdata; every page, API answer, header and cookie; every log
record down to DEBUG (SQL included); the doctor's text and JSON; /metrics, /readyz and
/healthz; the caches and the sessions; the exceptions; what the process printed; and
the error reports (the DEBUG=true page, the e-mail to ADMINS). Everything outside the
process is real: loopback upstreams and the database (SQLite or PostgreSQL).

A failure lists each place and which part of the key shows there, never the key.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import sys
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.forms.models import model_to_dict
from django.test import AsyncClient, Client, RequestFactory, override_settings
from django.urls import reverse
from django.views.debug import get_exception_reporter_class, technical_500_response
from django.views.decorators.debug import sensitive_post_parameters

from credentials.models import PLATFORM, APIKeyCredentials
from credentials.secret import Secret
from llm import services, usage
from llm.breaker import breakers
from llm.errors import LLMError
from llm.models import UsageRecord
from tests.conftest import raw_api_key
from tests.site.sweep import Exposure, cache_entries, debug_logs, decoded_session, table_cells
from tests.upstream import DeadPort, Upstream, free_port

pytestmark = pytest.mark.django_db

MODEL = "gpt-test-mini"
HELLO = [{"role": "user", "content": "hello there"}]
ADD_URL = reverse("admin:credentials_apikeycredentials_add")
LIST_URL = reverse("admin:credentials_apikeycredentials_changelist")
RECORDS_URL = reverse("admin:llm_usagerecord_changelist")
# Every logger a console at LOG_LEVEL=DEBUG would print, set to DEBUG for the sweep.
LOGGERS = (
    "",
    "django",
    "openai",
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "aiohttp",
    "asyncio",
    "llm",
    "credentials",
    "platform_site",
    "axes",
)
# Loggers that must have said something, or the log sweep proves nothing about them.
MUST_LOG = ("openai", "httpx2", "httpcore2", "django.db.backends", "django.request", "llm")


def distinctive_key() -> Secret:
    """A fake key no other test uses, assembled here so that no source file holds it.

    A Secret, so that pytest's report of a failure (which shows the arguments of every
    function on the way) never prints it; assertions about it compare to a bool first
    for the same reason.
    """
    return Secret("-".join(["sk", "test", "fake", "SWEEP", secrets.token_hex(16)]))


def change_url(credential: APIKeyCredentials) -> str:
    return reverse("admin:credentials_apikeycredentials_change", args=[credential.pk])


def form_data(**fields: str) -> dict[str, str]:
    return {
        "title": "Sweep proxy",
        "provider": "litellm",
        "owner": "",
        "api_key": "",
        "base_url": "",
        "fallback": "",
        "is_active": "on",
        "expires_at_0": "",
        "expires_at_1": "",
        "_save": "Save",
        **fields,
    }


class Visit:
    """Requests through the test client, each answer (redirects followed) read."""

    def __init__(self, seen: Exposure, client: Client, who: str) -> None:
        self.seen, self.client, self.who = seen, client, who

    def get(self, place: str, url: str) -> Any:
        return self._follow(place, self.client.get(url), url)

    def post(self, place: str, url: str, data: dict[str, Any]) -> Any:
        return self._follow(place, self.client.post(url, data), url)

    def post_json(self, place: str, url: str, body: dict[str, Any]) -> Any:
        response = self.client.post(url, data=json.dumps(body), content_type="application/json")
        return self._follow(place, response, url)

    def _follow(self, place: str, response: Any, url: str) -> Any:
        self.seen.response(f"{self.who}: {place} ({url})", response)
        hops = 0
        while response.status_code in (301, 302, 303) and hops < 3:
            url = response["Location"]
            response = self.client.get(url)
            hops += 1
            self.seen.response(f"{self.who}: {place}, redirected to {url}", response)
        return response


# ---- the admin ------------------------------------------------------------------------


def add_and_edit(
    admin: Visit, secret: Secret, first: Upstream, second: Upstream
) -> APIKeyCredentials:
    """Add through the admin's form (a refused try first), rename, re-point."""
    key = secret.get_secret_value()
    refused = admin.post(
        "add refused (metadata address)",
        ADD_URL,
        form_data(api_key=key, base_url="http://169.254.169.254/v1"),
    )
    assert refused.status_code == 200
    assert not APIKeyCredentials.objects.exists()

    added = admin.post("add", ADD_URL, form_data(api_key=key, base_url=first.base_url))
    assert added.status_code == 200
    credential = APIKeyCredentials.objects.get()
    stored = credential.api_key.get_secret_value() == key
    assert stored, "The admin's form did not store the key."
    encrypted = key not in raw_api_key(credential.pk)
    assert encrypted, "The api_key column holds the key in plaintext."

    renamed = admin.post(
        "change title",
        change_url(credential),
        form_data(title="Sweep proxy (renamed)", base_url=first.base_url),
    )
    assert renamed.status_code == 200
    moved_without_key = admin.post(
        "change base URL without the key (refused)",
        change_url(credential),
        form_data(title="Sweep proxy (renamed)", base_url=second.base_url),
    )
    assert moved_without_key.status_code == 200
    admin.post(
        "change base URL with the key again",
        change_url(credential),
        form_data(title="Sweep proxy (renamed)", base_url=second.base_url, api_key=key),
    )
    credential.refresh_from_db()
    assert credential.base_url == second.base_url
    kept = credential.api_key.get_secret_value() == key
    assert kept, "Re-pointing the credential changed its key."
    return credential


def admin_pages(admin: Visit, credentials: list[APIKeyCredentials]) -> None:
    admin.get("index", reverse("admin:index"))
    admin.get("add form", ADD_URL)
    admin.get("changelist", LIST_URL)
    admin.get("changelist search", f"{LIST_URL}?q=Sweep")
    for credential in credentials:
        pk = credential.pk
        admin.get(f"change form of {credential.title!r}", change_url(credential))
        admin.get(
            f"model suggestions of {credential.title!r}",
            reverse("admin:credentials_apikeycredentials_models", args=[pk]),
        )
        admin.get(
            f"history of {credential.title!r}",
            reverse("admin:credentials_apikeycredentials_history", args=[pk]),
        )
        admin.get(
            f"delete confirmation of {credential.title!r}",
            reverse("admin:credentials_apikeycredentials_delete", args=[pk]),
        )
        admin.get(f"usage of {credential.title!r}", f"{RECORDS_URL}?credential__id__exact={pk}")
    admin.get("usage list", RECORDS_URL)
    for record in UsageRecord.objects.order_by("created_at")[:3]:
        admin.get("a usage record", reverse("admin:llm_usagerecord_change", args=[record.pk]))


def admin_actions(admin: Visit, credentials: list[APIKeyCredentials]) -> None:
    selected = [str(credential.pk) for credential in credentials]
    tested = admin.post(
        "Test connection", LIST_URL, {"action": "test_connection", "_selected_action": selected}
    )
    assert tested.status_code == 200
    diagnosed = admin.post(
        "Diagnose", LIST_URL, {"action": "diagnose", "_selected_action": selected}
    )
    assert diagnosed.status_code == 200
    assert "findings" in diagnosed.context


# ---- the API and the playground ---------------------------------------------------------


def chat(api: Visit, place: str, credential: APIKeyCredentials, status: int, **extra: Any) -> Any:
    body = {"credential": str(credential.pk), "model": MODEL, "messages": HELLO, **extra}
    response = api.post_json(place, "/api/llm/chat", body)
    assert response.status_code == status, (place, response.status_code)
    return response


def failures(secret: Secret) -> dict[str, dict[str, Any]]:
    """How the upstream misbehaves (a careless one echoes the key it was sent), and the
    status the API then answers with."""
    key = secret.get_secret_value()
    return {
        "key rejected, echoed back (401)": {
            "respond": {"status": 401, "body": {"error": {"message": f"invalid api key {key}"}}},
            "status": 403,
        },
        "model refused (403)": {
            "respond": {
                "status": 403,
                "body": {"error": {"message": "not for you", "type": "key_model_access_denied"}},
            },
            "status": 403,
        },
        "upstream error (500)": {
            "respond": {"status": 500, "body": {"error": {"message": f"boom near {key}"}}},
            "status": 502,
        },
        "timeout": {"respond": {"delay": 3}, "status": 504},
    }


def use_through_the_api(
    api: Visit,
    settings: Any,
    secret: Secret,
    credential: APIKeyCredentials,
    upstream: Upstream,
) -> None:
    bearer = f"Bearer {secret.get_secret_value()}"
    api.get("credentials", "/api/llm/credentials")
    chat(api, "chat", credential, 200)
    sent = upstream.requests[-1].authorization == bearer
    assert sent, "The call did not send the credential's key."
    for place, case in failures(secret).items():
        upstream.respond(**case["respond"])
        settings.LLM_TIMEOUT_SECONDS = 1 if place == "timeout" else 10
        chat(api, f"chat, {place}", credential, case["status"])
        upstream.reset()
        breakers.reset()  # failures would open the breaker, and hide the next cases
    settings.LLM_TIMEOUT_SECONDS = 10
    embedded = api.post_json(
        "embeddings",
        "/api/llm/embeddings",
        {"credential": str(credential.pk), "model": "embed-test", "input": ["hello"]},
    )
    assert embedded.status_code == 200
    listed = api.get("models", f"/api/llm/models?credential={credential.pk}")
    assert listed.status_code == 200
    api.get("playground", "/llm/")
    for purpose in ("chat", "code", "embeddings"):
        sent = api.post_json(
            f"playground send ({purpose})",
            "/llm/send",
            {"credential": str(credential.pk), "purpose": purpose, "model": MODEL, "prompt": "hi"},
        )
        assert sent.status_code == 200, purpose
    only_this_key = {request.authorization for request in upstream.requests} == {bearer}
    assert only_this_key, "A call sent another key than the credential's."


def spend_control(
    api: Visit, seen: Exposure, secret: Secret, factory: Any, upstream: Upstream
) -> None:
    """A credential with every limit, driven to each refusal; its budget read back, its
    counters reconciled, and the soft limit's warning logged."""
    capped = factory(
        title="Sweep capped",
        api_key=secret.get_secret_value(),
        base_url=upstream.base_url,
        allowed_models=[MODEL, "embed-*"],
        monthly_budget_usd=Decimal("0.004"),  # one call costs $0.0042
        requests_per_minute=2,
    )
    chat(api, "chat, a model the credential does not allow", capped, 403, model="gpt-test-large")
    chat(api, "chat within the limits", capped, 200)
    chat(api, "chat over the budget", capped, 402)
    api.get("budget", f"/api/llm/budget?credential={capped.pk}")
    capped.monthly_budget_usd = None
    capped.save()
    chat(api, "chat within the rate", capped, 200)
    chat(api, "chat over the rate", capped, 429)
    run_command(seen, "manage.py reconcile_spend", "reconcile_spend")


def stream_as(user: Any, seen: Exposure, credential: APIKeyCredentials, upstream: Upstream) -> None:
    """Streamed chats as under ASGI (an AsyncClient, the events read as they come): one
    whole, one the upstream drops halfway (an error event in the stream)."""

    async def main(place: str) -> bytes:
        client = AsyncClient()
        await client.aforce_login(user)
        body = {"credential": str(credential.pk), "model": MODEL, "messages": HELLO, "stream": True}
        response: Any = await client.post(
            "/api/llm/chat", data=json.dumps(body), content_type="application/json"
        )
        assert response.status_code == 200, place
        assert response.streaming, place
        content = b"".join([chunk async for chunk in response.streaming_content])
        seen.response(f"alice: {place} (/api/llm/chat)", response, content)
        return content

    assert b"event: done" in async_to_sync(main)("streamed chat")
    upstream.respond(mode="drop-mid-stream")
    assert b"event: error" in async_to_sync(main)("streamed chat, dropped halfway")
    upstream.reset()
    breakers.reset()


def fail_over(api: Visit, primary: APIKeyCredentials, dead: DeadPort) -> None:
    response = chat(api, "chat, failed over from a dead proxy", primary, 200)
    assert response.json()["route"]["failed_over_from"] is not None
    assert dead.attempts >= 1


def open_the_breaker(api: Visit, settings: Any, down: APIKeyCredentials) -> None:
    """A proxy that stays down: its circuit breaker opens, and the answers (and the
    logs) say so."""
    body = {"credential": str(down.pk), "model": MODEL, "messages": HELLO}
    for attempt in range(1, settings.LLM_BREAKER_FAILURES + 2):
        answer = api.post_json(f"chat, proxy down (try {attempt})", "/api/llm/chat", body)
        assert answer.status_code >= 500
    assert answer.status_code == 503  # the breaker answers, without a call
    breakers.reset()


# ---- exceptions, as raised below the views ----------------------------------------------


def raised(seen: Exposure, place: str, call: Any) -> None:
    with pytest.raises(LLMError) as caught:
        call()
    seen.exception(f"exception of {place}", caught.value)


def provoke_exceptions(
    seen: Exposure,
    settings: Any,
    secret: Secret,
    credential: APIKeyCredentials,
    down: APIKeyCredentials,
    upstream: Upstream,
) -> None:
    """Each failure through the sync client (httpx2) and the async one (aiohttp)."""

    def sync_chat(which: APIKeyCredentials) -> Any:
        return lambda: services.chat(messages=HELLO, model=MODEL, credential=which, user=PLATFORM)

    def async_chat(which: APIKeyCredentials) -> Any:
        async def run() -> Any:
            return await services.achat(
                messages=HELLO, model=MODEL, credential=which, user=PLATFORM
            )

        return lambda: async_to_sync(run)()

    for kind, call in (("sync", sync_chat), ("async", async_chat)):
        for place, case in failures(secret).items():
            upstream.respond(**case["respond"])
            settings.LLM_TIMEOUT_SECONDS = 1 if place == "timeout" else 10
            raised(seen, f"{kind} chat, {place}", call(credential))
            upstream.reset()
            breakers.reset()
        settings.LLM_TIMEOUT_SECONDS = 10
        raised(seen, f"{kind} chat, proxy down", call(down))
        breakers.reset()


# ---- the operator's tools -------------------------------------------------------------


def run_command(seen: Exposure, place: str, *args: str, **options: Any) -> str:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(*args, stdout=out, stderr=err, **options)
    except CommandError as error:
        seen.exception(f"{place}: its error", error)
    seen.read(f"{place}: stdout", out.getvalue())
    seen.read(f"{place}: stderr", err.getvalue())
    return out.getvalue()


def rotate(seen: Exposure, settings: Any, credential: APIKeyCredentials) -> None:
    old = list(settings.CREDENTIALS_ENCRYPTION_KEYS)
    before = raw_api_key(credential.pk)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), *old]
    output = run_command(seen, "manage.py rotate_credential_keys", "rotate_credential_keys")
    assert "Done: " in output
    assert raw_api_key(credential.pk) != before


# ---- the error report -----------------------------------------------------------------


def _save_failed(api_key: str) -> None:
    """Where a save that fails holds the key: in a local (here, an argument)."""
    raise RuntimeError("The database refused the row.")


def _add_view(request: Any) -> None:
    """A view that fails while saving the key it was posted."""
    _save_failed(request.POST["api_key"])


def _failure(view: Any, request: Any) -> Any:
    """exc_info of `view` failing. The traceback starts here: the frames it shows
    hold the key only where the views put it."""
    try:
        view(request)
    except RuntimeError:
        return sys.exc_info()
    raise AssertionError("The view did not fail.")


def error_reports(seen: Exposure, secret: Secret, admin_user: Any) -> None:
    """Django's error page (DEBUG=true), as HTML and as text, and the e-mail to ADMINS
    (DEBUG=false; text, and HTML with include_html; by DEFAULT_EXCEPTION_REPORTER, as
    AdminEmailHandler sends it), for a failed POST of the admin's
    add form with the key in it: once marked as the admin's add view marks it
    (sensitive_post_parameters), once not (an exception before the view ran). The key
    is also in a frame's local (`api_key`) and in the secret settings. The pages are
    what the configured DEFAULT_EXCEPTION_REPORTER_FILTER lets through."""
    factory = RequestFactory()
    marked = sensitive_post_parameters("api_key")(_add_view)
    secret_settings = {
        "OPENAI_API_KEY": secret.get_secret_value(),
        "LLM_FAILOVER_API_KEY": secret.get_secret_value(),
    }
    for how, view in (("marked by the add view", marked), ("not marked", _add_view)):
        for accept in ("text/html", "text/plain"):
            request = factory.post(
                ADD_URL,
                form_data(api_key=secret.get_secret_value(), base_url="http://litellm:4000/v1"),
                HTTP_ACCEPT=accept,
            )
            request.user = admin_user
            exc_info = _failure(view, request)
            with override_settings(DEBUG=True, **secret_settings):
                page = technical_500_response(request, *exc_info)
            seen.response(f"DEBUG=true error page ({accept}), POST {how}", page)
        with override_settings(DEBUG=False, **secret_settings):
            error_type, error, traceback = exc_info
            reporter_class: Any = get_exception_reporter_class(request)  # stubs: an instance
            reporter = reporter_class(request, error_type, error, traceback, is_email=True)
            email = f"error e-mail to ADMINS (DEBUG=false), POST {how}"
            seen.read(f"{email}: text", reporter.get_traceback_text())
            seen.read(f"{email}: HTML (include_html)", reporter.get_traceback_html())


# ---- where it is all stored ---------------------------------------------------------------


def sweep_storage(seen: Exposure) -> None:
    for table, column, value in table_cells():
        seen.read(f"table {table}, column {column}", value)
        if column == "session_data":
            seen.read(f"table {table}, column {column} (decoded)", repr(decoded_session(value)))
    for alias, cache_key, value in cache_entries():
        seen.read(f"cache {alias!r}, key {cache_key!r}", repr(value))
    out = io.StringIO()
    call_command("dumpdata", stdout=out)
    seen.read("manage.py dumpdata", out.getvalue())
    for credential in APIKeyCredentials.objects.all():
        credential.api_key.get_secret_value()  # as a call leaves it
        for shown, text in {
            "str()": str(credential),
            "repr()": repr(credential),
            "vars()": repr(vars(credential)),
            "model_to_dict()": repr(model_to_dict(credential)),
        }.items():
            seen.read(f"manage.py shell: {shown} of credential {credential.title!r}", text)


# ---- the sweep ----------------------------------------------------------------------------


def test_the_key_shows_nowhere(
    settings, admin_client, admin_user, api, alice, start_upstream, credential_factory, capfd
):
    key = distinctive_key()
    seen = Exposure(key.get_secret_value())
    settings.LLM_PROBE_TIMEOUT_SECONDS = 1
    first, second = start_upstream(), start_upstream(cost="0.0042")
    admin, as_alice = Visit(seen, admin_client, "admin"), Visit(seen, api, "alice")
    anonymous = Visit(seen, Client(), "anonymous")

    with debug_logs(LOGGERS) as logs, DeadPort() as dead:
        credential = add_and_edit(admin, key, first, second)
        primary = credential_factory(
            title="Sweep primary (dead)",
            api_key=key.get_secret_value(),
            base_url=dead.base_url,
            fallback=credential,
        )
        down = credential_factory(
            title="Sweep down",
            api_key=key.get_secret_value(),
            base_url=f"http://127.0.0.1:{free_port()}/v1",
        )
        everything = [credential, primary, down]

        use_through_the_api(as_alice, settings, key, credential, second)
        spend_control(as_alice, seen, key, credential_factory, second)
        stream_as(alice, seen, credential, second)
        fail_over(as_alice, primary, dead)
        open_the_breaker(as_alice, settings, down)
        provoke_exceptions(seen, settings, key, credential, down, second)
        breakers.reset()

        admin_actions(admin, everything)
        run_command(seen, "manage.py check_llm_routes", "check_llm_routes")
        run_command(seen, "manage.py check_llm_routes --json", "check_llm_routes", "--json")
        rotate(seen, settings, credential)
        chat(as_alice, "chat after the rotation", credential, 200)
        usage.flush()
        assert UsageRecord.objects.filter(credential=credential).count() >= 10

        admin_pages(admin, everything)
        for path in ("/metrics", "/readyz", "/healthz"):
            answer = anonymous.get(path.strip("/"), path)
            assert answer.status_code == 200, path
        error_reports(seen, key, admin_user)

    sweep_storage(seen)
    for number, (name, _level, text) in enumerate(logs.lines):
        seen.read(f"log record {number} ({name})", text)
    printed = capfd.readouterr()
    seen.read("what the process printed: stdout", printed.out)
    seen.read("what the process printed: stderr", printed.err)

    said = {name for name, _, _ in logs.lines}
    silent = [name for name in MUST_LOG if not any(n.startswith(name) for n in said)]
    assert silent == [], f"These loggers logged nothing, so they were not swept: {silent}"
    at_debug = {name.split(".")[0] for name, level, _ in logs.lines if level == logging.DEBUG}
    assert {"openai", "httpcore2", "django"} <= at_debug, at_debug
    assert seen.leaks == {}, seen.report()

"""Pages and the JSON API. Views parse, call one service, answer.

The API, the playground's send and the probes are async and, once warm, make no sync
call: the session, the user and the credential come from caches (platform_site), usage
is buffered. The playground page, which queries and renders, is a sync view: it runs in
a thread of its own. Failures answer with the status and sentence of their LLMError (or
a 400 with field errors for bad input, 401 when not signed in, 404 for a credential the
user may not use), never with a 500 page or the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC
from functools import wraps
from typing import Any, cast
from urllib.parse import quote, urlsplit

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from credentials.models import APIKeyCredentials
from credentials.selectors import ausable_credential, usable_credentials
from llm import limits, services
from llm.errors import LLMError
from llm.models import PlaygroundChoice
from llm.requests import (
    TOO_BIG,
    InvalidRequest,
    chat_request,
    credential_from_query,
    embeddings_request,
    parse_json,
    playground_request,
)
from platform_site import shared_cache

log = logging.getLogger(__name__)
View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]
NO_SUCH_CREDENTIAL = "No such credential: choose one of your own or a shared one."
# The playground choice this browser last sent (see `remember`).
REMEMBERED = "keyroute_playground"
# Readiness probes answer quickly or say what does not.
READY_TIMEOUT = 2.0
ROUTE_HEADER = "X-Keyroute-Route"


def error_response(
    message: str, status: int, *, kind: str, fields: dict[str, list[str]] | None = None
) -> JsonResponse:
    error: dict[str, Any] = {"message": message, "type": kind}
    if fields:
        error["fields"] = fields
    return JsonResponse({"error": error}, status=status)


def too_many_fields() -> str:
    """A form or query string of more fields than Django reads: no call of this API."""
    return (
        f"The request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} form fields or "
        "query parameters: send the call as a JSON object."
    )


def llm_error_response(error: LLMError) -> JsonResponse:
    response = error_response(error.message, error.status, kind=type(error).__name__)
    if error.retry_after is not None:
        response["Retry-After"] = str(round(error.retry_after))
    return response


def _csrf_refused(request: HttpRequest) -> bool:
    """Django's CSRF check, run by the API itself: after authentication, in JSON.

    For a form body the check looks for the token among the form's fields: `api` reads
    the body first, so the view can still read it after the form was parsed. A multipart
    body Django cannot parse has no fields (Django marks them empty after the error), so
    the check runs again, on the header alone."""
    check = CsrfViewMiddleware(lambda request: HttpResponse())
    try:
        return check.process_view(request, _csrf_checked_view, (), {}) is not None
    except (MultiPartParserError, TooManyFilesSent):
        return check.process_view(request, _csrf_checked_view, (), {}) is not None


def _csrf_checked_view(request: HttpRequest) -> HttpResponse:  # pragma: no cover
    return HttpResponse()


def api(view: View) -> View:
    """Session auth answering 401 JSON (not a redirect); errors as JSON with their status.

    The CSRF check runs here, after authentication, so that a signed-out caller learns
    it must sign in (401) and a bad token is a JSON 403 rather than Django's HTML page.
    """

    @csrf_exempt
    @wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        user = await request.auser()
        if not user.is_authenticated:
            return error_response(
                "Sign in first: this API uses the site's session.", 401, kind="NotAuthenticated"
            )
        try:
            request.body  # noqa: B018 (read now: the CSRF check may parse it as a form)
            if _csrf_refused(request):
                return error_response(
                    "CSRF check failed: send the csrftoken cookie's value in an X-CSRFToken "
                    "header.",
                    403,
                    kind="CSRFFailed",
                )
            return await view(request, user, *args, **kwargs)
        except InvalidRequest as error:
            return error_response(error.message, 400, kind="InvalidRequest", fields=error.fields)
        except RequestDataTooBig:
            return error_response(TOO_BIG, 400, kind="InvalidRequest")
        except TooManyFieldsSent:
            return error_response(too_many_fields(), 400, kind="InvalidRequest")
        except LLMError as error:
            return llm_error_response(error)

    return wrapper


async def credential_for(user: Any, credential_id: str | None) -> APIKeyCredentials | None:
    """The chosen credential, None for the global default; 404 if not the user's to use."""
    if credential_id is None:
        return None
    credential = await ausable_credential(user, credential_id)
    if credential is None:
        raise LLMError(NO_SUCH_CREDENTIAL, status=404)
    return credential


def credential_json(credential: APIKeyCredentials) -> dict[str, Any]:
    return {
        "id": str(credential.pk),
        "title": credential.title,
        "provider": credential.provider,
        "host": urlsplit(credential.effective_base_url).netloc,
        "key_hint": credential.key_hint,
        "shared": credential.owner_id is None,
    }


def result_json(result: services.ChatResult | services.EmbeddingResult) -> dict[str, Any]:
    usage = result.usage
    body: dict[str, Any] = {
        "model": result.model,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "route": route_json(result.route),
    }
    if isinstance(result, services.ChatResult):
        body.update(text=result.text, cost=result.cost_usd)
    else:
        body.update(vectors=result.vectors, cost=result.cost_usd)
    return body


def route_json(route: services.RouteInfo) -> dict[str, Any]:
    """Where a call went and, after a failover, which route it replaced and why."""
    body: dict[str, Any] = {
        "source": route.source,
        "host": route.host,
        "credential": _credential_ref(route.credential_id, route.credential_title),
        "failed_over_from": None,
    }
    if passed := route.failed_over_from:
        body["failed_over_from"] = {
            "source": passed.source,
            "host": passed.host,
            "credential": _credential_ref(passed.credential_id, passed.credential_title),
            "reason": passed.reason,
        }
    return body


def _credential_ref(credential_id: str | None, title: str | None) -> dict[str, str] | None:
    return {"id": credential_id, "title": title or ""} if credential_id else None


def route_header(route: services.RouteInfo) -> str:
    """X-Keyroute-Route: source, host and credential id (never a title: headers are
    ASCII, titles are whatever an admin typed), and the host failed over from."""
    parts = [f"source={route.source}", f"host={quote(route.host, safe=':[]')}"]
    if route.credential_id:
        parts.append(f"credential={route.credential_id}")
    if route.failed_over_from:
        parts.append(f"from={quote(route.failed_over_from.host, safe=':[]')}")
    return "; ".join(parts)


def result_response(result: services.ChatResult | services.EmbeddingResult) -> JsonResponse:
    response = JsonResponse(result_json(result))
    response[ROUTE_HEADER] = route_header(result.route)
    return response


# ---- JSON API --------------------------------------------------------------------------


@require_GET
@api
async def credentials_api(request: HttpRequest, user: Any) -> HttpResponseBase:
    credentials = [credential_json(c) async for c in usable_credentials(user)]
    return JsonResponse(
        {"credentials": credentials, "global_default": bool(settings.OPENAI_API_KEY)}
    )


@require_POST
@api
async def chat_api(request: HttpRequest, user: Any) -> HttpResponseBase:
    chat = chat_request(parse_json(request.body))
    credential = await credential_for(user, chat.credential)
    if chat.stream:
        stream = services.astream_chat(
            messages=chat.messages,
            model=chat.model,
            credential=credential,
            user=user,
            **chat.options,
        )
        return await event_stream(request, stream)
    result = await services.achat(
        messages=chat.messages, model=chat.model, credential=credential, user=user, **chat.options
    )
    return result_response(result)


@require_POST
@api
async def embeddings_api(request: HttpRequest, user: Any) -> HttpResponseBase:
    embeddings = embeddings_request(parse_json(request.body))
    credential = await credential_for(user, embeddings.credential)
    result = await services.aembed(
        texts=embeddings.texts, model=embeddings.model, credential=credential, user=user
    )
    return result_response(result)


@require_GET
@api
async def models_api(request: HttpRequest, user: Any) -> HttpResponseBase:
    credential = await credential_for(user, credential_from_query(request.GET.get("credential")))
    listing = await services.alist_models(credential=credential, user=user)
    return JsonResponse({"models": listing.models})


@require_GET
@api
async def budget_api(request: HttpRequest, user: Any) -> HttpResponseBase:
    """What is left this month of the credential's budget and of the user's cap on it;
    null for either that is not set (the global default has neither)."""
    credential = await credential_for(user, credential_from_query(request.GET.get("credential")))
    if credential is None:
        return JsonResponse({"credential": None, "user": None})
    remaining = await limits.aremaining(credential, user)
    return JsonResponse({whose: remaining_json(left) for whose, left in remaining.items()})


def remaining_json(left: limits.Remaining | None) -> dict[str, str] | None:
    if left is None:
        return None
    return {
        "budget": limits.decimal_text(left.budget),
        "spent": limits.decimal_text(left.spent),
        "remaining": limits.decimal_text(left.remaining),
        "resets_at": left.resets_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


async def event_stream(
    request: HttpRequest, stream: AsyncIterator[str | services.RouteInfo | services.ChatResult]
) -> HttpResponseBase:
    """Server-sent events: {"delta"} pieces, then a "done" event with the whole result.

    The stream's start (its route, once the first chunk came) is awaited before
    answering, so that a failure to start (proxy down, key rejected) gets its own status
    code rather than a 200 with an error event, and the route its header.
    Under WSGI the events are collected first and sent at once: a WSGI server would read
    the rest of the stream on another event loop than the one its connection lives on.
    """
    try:
        route = await anext(stream)
    except LLMError as error:
        return llm_error_response(error)
    assert isinstance(route, services.RouteInfo)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                if isinstance(item, services.ChatResult):
                    yield sse(result_json(item), event="done")
                elif isinstance(item, str):
                    yield sse({"delta": item})
        except LLMError as error:
            kind = type(error).__name__
            yield sse({"error": {"message": error.message, "type": kind}}, event="error")
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    if not isinstance(request, ASGIRequest):
        body = b"".join([chunk async for chunk in events()])
        response: HttpResponseBase = HttpResponse(body, content_type="text/event-stream")
        response[ROUTE_HEADER] = route_header(route)
        return response
    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response[ROUTE_HEADER] = route_header(route)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events on as they come
    return response


# ---- the playground --------------------------------------------------------------------


@login_required
def playground(request: HttpRequest) -> HttpResponse:
    user = request.user
    credentials = [credential_json(c) for c in usable_credentials(user)]
    remembered = request.session.get(REMEMBERED)
    if remembered is None:
        choice = PlaygroundChoice.objects.filter(user_id=cast(int, user.pk)).first()
        remembered = {
            "credential": str(choice.credential_id) if choice and choice.credential_id else "",
            "purpose": choice.purpose if choice else "chat",
            "model": choice.model if choice else "",
        }
    context = {
        "credentials": credentials,
        "global_default": bool(settings.OPENAI_API_KEY),
        "remembered": remembered,
        "purposes": ["chat", "code", "embeddings"],
    }
    return render(request, "llm/playground.html", context)


@require_POST
@api
async def playground_send(request: HttpRequest, user: Any) -> HttpResponseBase:
    """What the playground's Send button posts: remembers the choice, then calls."""
    send = playground_request(parse_json(request.body))
    purpose, prompt = send.purpose, send.prompt
    if send.embeddings is not None:
        request_ = send.embeddings
        credential = await credential_for(user, request_.credential)
        await remember(request, user, credential, purpose, request_.model)
        result = await services.aembed(
            texts=request_.texts, model=request_.model, credential=credential, user=user
        )
        return result_response(result)
    chat = send.chat
    assert chat is not None
    credential = await credential_for(user, chat.credential)
    await remember(request, user, credential, purpose, chat.model)
    if purpose == "code":
        code = await services.agenerate_code(
            prompt=prompt, model=chat.model, credential=credential, user=user, **chat.options
        )
        return result_response(code)
    stream = services.astream_chat(
        messages=chat.messages, model=chat.model, credential=credential, user=user, **chat.options
    )
    return await event_stream(request, stream)


async def remember(
    request: HttpRequest,
    user: Any,
    credential: APIKeyCredentials | None,
    purpose: str,
    model: str,
) -> None:
    """Remember the user's choice for the playground's next visit.

    Written (in this request's own thread) only when it differs from what this browser
    sent last, which its session keeps: sending again with the same choice writes
    nothing. The page offers the session's choice, else the user's last one from any
    browser.
    """
    choice = {
        "credential": str(credential.pk) if credential else "",
        "purpose": purpose,
        "model": model,
    }
    if await request.session.aget(REMEMBERED) == choice:
        return
    await PlaygroundChoice.objects.aupdate_or_create(
        user=user, defaults={"credential": credential, "purpose": purpose, "model": model}
    )
    await request.session.aset(REMEMBERED, choice)


# ---- probes ----------------------------------------------------------------------------


async def healthz(request: HttpRequest) -> HttpResponseBase:
    """The process answers: no database, no cache, no upstream."""
    return JsonResponse({"status": "ok"})


async def readyz(request: HttpRequest) -> HttpResponseBase:
    """The database and the cache answer, each within READY_TIMEOUT seconds."""
    problems = [
        problem
        for problem in await asyncio.gather(
            _database_problem(), shared_cache.aproblem(timeout=READY_TIMEOUT)
        )
        if problem
    ]
    if problems:
        return JsonResponse({"status": "unavailable", "problems": problems}, status=503)
    return JsonResponse({"status": "ok"})


async def _database_problem() -> str | None:
    # The one sync call: in this request's own thread, which a slow database holds alone.
    try:
        await asyncio.wait_for(sync_to_async(_select_one)(), READY_TIMEOUT)
    except TimeoutError:
        return f"The database did not answer within {READY_TIMEOUT:g} s."
    except Exception:
        log.exception("Readiness: the database does not answer.")
        return "The database does not answer."
    return None


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")

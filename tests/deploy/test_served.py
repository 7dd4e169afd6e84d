"""The site as its container serves it (deploy/site/entrypoint.sh `serve`, two workers,
the example site.env with its placeholders replaced), behind a TLS proxy: HTTPS is
enforced, the proxy's headers are trusted, a chat reaches the proxy with the platform's
virtual key, and the image's HEALTHCHECK passes."""

from __future__ import annotations

import os

from tests.conftest import run_python, signed_in
from tests.deploy.conftest import SITE_DOCKERFILE
from tests.deploy.recipe import arguments, exec_form, service_env, with_test_values

HELLO = [{"role": "user", "content": "hello there"}]
CLIENT = "203.0.113.7"  # a browser on the internet, as the TLS proxy forwards it


def public_host() -> str:
    (origin,) = service_env("site")["CSRF_TRUSTED_ORIGINS"].split(",")
    return origin.removeprefix("https://")


def test_it_serves_https_through_the_tls_proxy_in_front(
    serve_like_the_image, upstream, django_user_model
):
    alice = django_user_model.objects.create_user("alice")
    served = serve_like_the_image(upstream)
    host = public_host()
    browser = {**signed_in(alice), "Host": host}
    via_proxy = {
        **browser,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": CLIENT,
        "Origin": f"https://{host}",
    }
    body = {"credential": None, "model": "gpt-4o-mini", "messages": HELLO}

    plain = served.site.request("GET", "/api/llm/credentials", headers=browser)
    listed = served.site.request("GET", "/api/llm/credentials", headers=via_proxy)
    answer = served.site.request("POST", "/api/llm/chat", headers=via_proxy, body=body)

    assert plain.status == 301
    assert plain.headers["Location"] == f"https://{host}/api/llm/credentials"
    assert listed.status == 200, listed.content
    assert listed.json()["global_default"] is True
    assert answer.status == 200, answer.content
    assert answer.json()["route"]["source"] == "global"
    assert "max-age=" in answer.headers["Strict-Transport-Security"]
    (call,) = [
        request for request in upstream.requests if request.path.endswith("/chat/completions")
    ]
    platform_key = with_test_values(service_env("site"))["OPENAI_API_KEY"]
    assert call.authorization == f"Bearer {platform_key}"


def test_it_passes_the_images_healthcheck(serve_like_the_image, upstream):
    served = serve_like_the_image(upstream)
    (healthcheck,) = arguments(SITE_DOCKERFILE, "HEALTHCHECK")
    command = exec_form(healthcheck)
    port = served.site.base_url.rpartition(":")[2]
    code = command[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    assert code != command[-1]

    result = run_python("-c", code, env={"PATH": os.environ.get("PATH", "")})

    assert result.returncode == 0, result.stderr
    stopped = served.site.process
    stopped.terminate()
    stopped.wait(15)
    assert run_python("-c", code, env={"PATH": os.environ.get("PATH", "")}).returncode == 1

"""Prometheus scrapes the site with its token, and every metric and label the Grafana
dashboard and the alerts read is one the site really exports: read from a scrape of the
site served as its container serves it, after calls that move every metric."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from decimal import Decimal
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import signed_in
from tests.deploy.recipe import (
    DEPLOY,
    label_names,
    listening_ports,
    load_yaml,
    metric_names,
    repo_path_of,
    service_env,
    services,
    with_test_values,
)
from tests.upstream import free_port

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "keyroute.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
HELLO = [{"role": "user", "content": "hello there"}]
CLIENT = "203.0.113.7"


def prometheus_config() -> dict[str, Any]:
    prometheus = services()["prometheus"]
    command = " ".join(prometheus["command"])
    (path,) = re.findall(r"--config\.file=(\S+)", command)
    source = repo_path_of(prometheus, path)
    assert source is not None, f"{path} is not mounted"
    config: dict[str, Any] = load_yaml(source)
    return config


def queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every dashboard target and alert rule."""
    found = []
    for panel in load_yaml(DASHBOARD)["panels"]:
        for target in panel["targets"]:
            found.append((panel["title"], target["expr"], target.get("legendFormat", "")))
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            summary = rule.get("annotations", {}).get("summary", "")
            found.append((rule["alert"], rule["expr"], summary))
    return found


def test_it_scrapes_the_site_with_the_sites_token():
    prometheus = services()["prometheus"]
    (job,) = prometheus_config()["scrape_configs"]
    (targets,) = job["static_configs"]
    (target,) = targets["targets"]
    host, _, port = target.partition(":")
    token_file = job["authorization"]["credentials_file"]
    command = " ".join(prometheus["command"])

    assert host == "site"
    assert int(port) in listening_ports("site")
    assert host in service_env("site")["ALLOWED_HOSTS"].split(",")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"
    assert job["authorization"].get("type", "Bearer") == "Bearer"
    # Written at start from the token in prometheus.env, into memory.
    assert f'"$$METRICS_TOKEN" > {token_file}' in command
    assert os.path.dirname(token_file) in prometheus["tmpfs"]
    assert service_env("prometheus")["METRICS_TOKEN"] == service_env("site")["METRICS_TOKEN"]


def test_it_loads_alert_rules_that_are_mounted():
    prometheus = services()["prometheus"]

    for rule_file in prometheus_config()["rule_files"]:
        source = repo_path_of(prometheus, rule_file)
        assert source is not None, f"{rule_file} is not mounted"
        assert source.is_file()


def test_it_does_not_scrape_litellm():
    (job,) = prometheus_config()["scrape_configs"]  # its /metrics needs an enterprise licence

    assert all("litellm" not in target for t in job["static_configs"] for target in t["targets"])


def test_it_exports_every_metric_and_label_the_dashboard_and_alerts_read(
    serve_like_the_image, start_upstream, credential_factory, django_user_model, tmp_path
):
    alice = django_user_model.objects.create_user("alice")
    upstream = start_upstream(cost="0.0042")
    backup = credential_factory(title="Backup", owner=alice, base_url=upstream.base_url)
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused
    # Spend control moves its metrics: a budget, and a model it refuses.
    primary = credential_factory(
        title="Primary",
        owner=alice,
        base_url=down,
        fallback=backup,
        monthly_budget_usd=Decimal("100"),
        allowed_models=["gpt-4o-mini"],
    )
    stale = tmp_path / "metrics" / "counter_999999.db"  # last run's: unreadable garbage
    stale.parent.mkdir()
    stale.write_bytes(b"not a metrics file")
    # One failure opens a breaker, so that the breaker's metrics move too.
    served = serve_like_the_image(upstream, LLM_BREAKER_FAILURES="1")
    site = served.site
    token = with_test_values(service_env("site"))["METRICS_TOKEN"]
    (origin,) = served.env["CSRF_TRUSTED_ORIGINS"].split(",")
    via_proxy = {
        **signed_in(alice),
        "Host": origin.removeprefix("https://"),
        "Origin": origin,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": CLIENT,
    }
    for credential in (str(primary.pk), None):
        body = {"credential": credential, "model": "gpt-4o-mini", "messages": HELLO}
        answer = site.request("POST", "/api/llm/chat", headers=via_proxy, body=body)
        assert answer.status == 200, answer.content
    body = {"credential": str(primary.pk), "model": "gpt-4o", "messages": HELLO}
    refused_model = site.request("POST", "/api/llm/chat", headers=via_proxy, body=body)
    assert refused_model.status == 403, refused_model.content

    scraped = site.request(
        "GET", "/metrics", headers={"Host": "site:8000", "Authorization": f"Bearer {token}"}
    )
    # From the internet through the TLS proxy: refused without the token, whatever the
    # client claims to be.
    spoofed = {"X-Forwarded-For": f"127.0.0.1, {CLIENT}"}
    refused = site.request("GET", "/metrics", headers=spoofed)
    allowed = site.request(
        "GET", "/metrics", headers={**spoofed, "Authorization": f"Bearer {token}"}
    )

    assert not stale.exists()
    assert scraped.status == 200, scraped.content
    assert refused.status == 403
    assert allowed.status == 200
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(scraped.content.decode()):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    checked = set()
    for where, expr, legend in queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        for name in names:
            assert name in labels, f"{where}: {name} is not exported"
        known = set().union(*(labels[name] for name in names))
        used = label_names(expr) | set(re.findall(r"\{\{\s*\$?(?:labels\.)?(\w+)\s*\}\}", legend))
        assert used <= known, f"{where}: labels {used - known} are not on {names}"
        checked |= names
    assert {name for name in labels if name.startswith("keyroute_")} - checked <= {
        "keyroute_llm_request_seconds_count",
        "keyroute_llm_request_seconds_sum",
    }

"""deploy/compose.yaml holds together: its services, files, hosts, ports and start order.

No container engine runs here, so nothing is started: the file is read as compose reads
it, and every name it relies on is checked against the file or service it names."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from urllib.parse import urlsplit

from tests.conftest import PROJECT
from tests.deploy.recipe import (
    DEPLOY,
    compose,
    dockerfile_of,
    env_example,
    env_files,
    example_of,
    instructions,
    listening_ports,
    load_yaml,
    repo_path_of,
    service_env,
    services,
    url_host_port,
)

SERVICES = {"postgres", "redis", "migrate", "site", "litellm", "prometheus", "grafana"}


def test_it_loads_with_every_service_of_the_recipe():
    assert set(services()) == SERVICES


def test_it_pins_every_image_to_a_version():
    for name, service in services().items():
        image = service["image"]
        tag = image.rpartition(":")[2]
        if "build" in service:
            assert tag == "local", f"{name}: an image built here is tagged local, not {image}"
        else:
            assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?", tag), f"{name}: {image} is not pinned"


def test_it_reads_env_files_whose_examples_exist_and_keeps_the_real_ones_out_of_git():
    ignored = [
        line.strip()
        for line in (PROJECT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name, service in services().items():
        if name == "redis":
            continue  # no settings, no secrets
        assert env_files(service), f"{name} has no env_file"
        for env_file in env_files(service):
            assert example_of(env_file).is_file(), f"{name}: {env_file}.example is missing"
            real = (DEPLOY / env_file).resolve().relative_to(PROJECT).as_posix()
            assert any(fnmatch.fnmatchcase(real, pattern) for pattern in ignored), real
            for variable in service_env(name):
                assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", variable), f"{env_file}: {variable!r}"


def test_it_builds_from_and_mounts_only_files_that_exist():
    for name, service in services().items():
        dockerfile = dockerfile_of(service)
        if dockerfile is not None:
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            assert (DEPLOY / service["build"]["context"]).resolve() == PROJECT
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose()["volumes"], f"{name}: volume {source} is not declared"


def test_it_points_the_sites_urls_at_services_on_the_ports_they_listen_on():
    site = service_env("site")
    urls = {
        name: value
        for name, value in site.items()
        # The origin browsers use, not a host the site connects to.
        if name != "CSRF_TRUSTED_ORIGINS" and urlsplit(value).netloc
    }
    assert {"DATABASE_URL", "CACHE_URL", "OPENAI_BASE_URL", "OPENAI_INTERNAL_BASE_URL"} <= set(urls)
    for name, url in urls.items():
        host, port = url_host_port(url)
        assert host in services(), f"{name} names {host}, which is no service"
        assert port in listening_ports(host), f"{name}: {host} does not listen on {port}"
    assert urlsplit(site["DATABASE_URL"]).scheme.startswith("postgres")
    assert urlsplit(site["CACHE_URL"]).scheme == "redis"


def test_it_gives_the_site_the_database_user_postgres_creates():
    database = urlsplit(service_env("site")["DATABASE_URL"])
    postgres = env_example("postgres")

    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres["POSTGRES_DB"]


def test_it_runs_migrations_once_before_the_site_starts():
    migrate, site = services()["migrate"], services()["site"]

    assert migrate["command"] == ["python", "manage.py", "migrate", "--no-input"]
    assert migrate["restart"] == "no"
    assert migrate["image"] == site["image"]
    assert migrate["env_file"] == site["env_file"]
    assert site["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_it_waits_for_health_only_where_a_healthcheck_exists():
    waited = 0
    for name, service in services().items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services(), f"{name} depends on {dependency}: no such service"
            if condition["condition"] != "service_healthy":
                continue
            waited += 1
            target = services()[dependency]
            dockerfile = dockerfile_of(target)
            built = dockerfile is not None and any(
                instruction == "HEALTHCHECK" for instruction, _ in instructions(dockerfile)
            )
            assert "healthcheck" in target or built, f"{name} waits for {dependency}'s health"
    assert waited >= 2  # the database and Redis, at least


def test_it_publishes_ports_on_this_machine_only():
    for name, service in services().items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping}"


def test_it_trusts_proxy_headers_from_the_networks_gateway_only():
    (network,) = compose()["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(network["subnet"])
    gateway = ipaddress.ip_address(network["gateway"])

    assert gateway in subnet
    # A TLS proxy on the host reaches the published port through the gateway.
    assert service_env("site")["FORWARDED_ALLOW_IPS"] == str(gateway)


def test_it_serves_grafana_the_dashboard_from_the_provisioned_datasource():
    grafana = services()["grafana"]
    provisioning = repo_path_of(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    (provider,) = load_yaml(provisioning / "dashboards" / "keyroute.yml")["providers"]
    folder = repo_path_of(grafana, provider["options"]["path"])
    assert folder is not None
    dashboard = load_yaml(folder / "keyroute.json")

    host, port = url_host_port(datasource["url"])
    assert host == "prometheus"
    assert port in listening_ports("prometheus")
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]

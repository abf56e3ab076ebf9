"""The operator's view in compose.yaml: Prometheus, Grafana with the relay's dashboard, Jaeger.

Docker is not needed: the files are parsed, their wiring checked, and every metric the
dashboard queries must be in the relay's own ``/metrics`` after a session has run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import yaml
from trio_websocket import ConnectionRejected

from .harness import connect
from .test_accounting import relays, text_turn
from .test_compose import SERVICES, environment, relay_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


def dashboard() -> dict:
    return json.loads((DASHBOARDS / "relay.json").read_text())


def queried_metrics() -> set[str]:
    """Every relay metric a panel of the dashboard queries (as a sample name)."""
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\brelay_[a-z0-9_]+", expr)}


def mounts(service: str) -> dict[str, str]:
    """Container path → repository path of the service's bind mounts."""
    found = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            assert (ROOT / source).exists(), (
                f"{service} mounts {source}, which is not in the repository"
            )
            found[target] = source
    return found


def test_the_relay_sends_its_traces_to_jaegers_otlp_port() -> None:
    endpoint = urlsplit(relay_config().otel_endpoint)
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "jaeger", 4318)
    assert SERVICES["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    assert environment("jaeger")["COLLECTOR_OTLP_ENABLED"] == "true"


def test_prometheus_scrapes_the_relays_metrics() -> None:
    config_path = mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((ROOT / config_path).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"relay:{relay_config().port}"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    volumes = mounts("grafana")
    assert volumes["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert volumes["/var/lib/grafana/dashboards"] == "./deploy/grafana/dashboards"
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "relay.yaml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    board = dashboard()
    assert board["uid"] == "relay"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in (
        "live sessions",
        "calls",
        "latency",
        "refused",
        "cause",
        "fast path",
        "dial",
        "cost per hour",
    ):
        assert topic in titles, topic


async def test_every_metric_the_dashboard_queries_is_in_the_relays_metrics() -> None:
    with trio.fail_after(15):
        async with relays(
            "sqlite:///:memory:", model="gpt-realtime-2", models=("gpt-realtime-2",)
        ) as (relay,):
            await text_turn(relay)  # a priced session, started and ended
            with pytest.raises(ConnectionRejected):  # and a refused handshake
                async with connect(relay.url + "/nowhere"):
                    pass
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                body = (await http.get("/metrics")).text
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    missing = sorted(queried_metrics() - exposed)
    assert not missing, f"the dashboard queries metrics the relay does not expose: {missing}"
    assert {"relay_cost_dollars_total", "relay_voice_latency_seconds_bucket"} <= queried_metrics()

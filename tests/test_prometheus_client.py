"""collector/prometheus.py against a real Prometheus scraping a real node_exporter's
textfile directory, and its strict parsing of answers that are not what the API says."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.prometheus import Prometheus, node_exporter, prometheus

from collector import prometheus as client
from collector.config import Paths, Settings
from collector.errors import ConfigError, UpstreamError

pytestmark = [pytest.mark.prometheus]

TEXTFILE = """\
# TYPE nixos_autodeploy_dirty gauge
nixos_autodeploy_dirty 0
# TYPE nixos_autodeploy_rollbacks_total counter
nixos_autodeploy_rollbacks_total{reason="health"} 3
"""


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prom")
    (tmp / "textfiles").mkdir()
    (tmp / "textfiles" / "autodeploy.prom").write_text(TEXTFILE)
    with (
        node_exporter(tmp / "textfiles", tmp / "node_exporter.log") as target,
        prometheus([target], tmp, "autodeploy") as server,
    ):
        server.wait_for(
            "a scrape", lambda: bool(server.query("nixos_autodeploy_dirty")["data"]["result"])
        )
        yield server


def settings(tmp_path: Path, url: str | None) -> Settings:
    paths = Paths(root=str(tmp_path), state_dir=str(tmp_path / "state"))
    return Settings(paths=paths, prometheus_url=url, timeout=10.0)


def test_a_vector_answer_is_its_samples(tmp_path: Path, prom: Prometheus) -> None:
    samples = client.query(settings(tmp_path, prom.url), "nixos_autodeploy_rollbacks_total")
    assert [(s.label("reason"), s.value) for s in samples] == [("health", 3.0)]
    assert samples[0].label("instance") is not None  # added by the scrape


def test_a_scalar_answer_is_one_sample_without_labels(tmp_path: Path, prom: Prometheus) -> None:
    (sample,) = client.query(settings(tmp_path, prom.url), "scalar(vector(2.5))")
    assert (sample.labels, sample.value) == ((), 2.5)


def test_only_non_zero_samples_fire(tmp_path: Path, prom: Prometheus) -> None:
    samples = client.query(settings(tmp_path, prom.url), "nixos_autodeploy_dirty or vector(4)")
    assert sorted(s.value for s in samples) == [0.0, 4.0]
    assert [s.value for s in client.firing(samples)] == [4.0]


def test_a_query_prometheus_refuses_is_one_line(tmp_path: Path, prom: Prometheus) -> None:
    with pytest.raises(UpstreamError) as caught:
        client.query(settings(tmp_path, prom.url), "sum(")
    message = str(caught.value)
    assert message.startswith(f"Prometheus {prom.url}/api/v1/query?")
    assert "\n" not in message


def test_an_unreachable_prometheus_is_an_upstream_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(UpstreamError, match="connection failed"):
            client.query(settings(tmp_path, f"http://127.0.0.1:{port}"), "up")


def test_without_a_url_there_is_no_query(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--prometheus-url"):
        client.query(settings(tmp_path, None), "up")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"status":"error","error":"bad"}', "the query failed: bad"),
        (b'{"status":"success"}', "no data object"),
        (b'{"status":"success","data":{"resultType":"matrix","result":[]}}', "got 'matrix'"),
        (b'{"status":"success","data":{"resultType":"vector","result":[1]}}', "not an object"),
        (
            b'{"status":"success","data":{"resultType":"vector",'
            b'"result":[{"metric":{"a":1},"value":[1,"1"]}]}}',
            "labels are not strings",
        ),
        (
            b'{"status":"success","data":{"resultType":"vector",'
            b'"result":[{"metric":{},"value":[1,1]}]}}',
            "pair",
        ),
        (
            b'{"status":"success","data":{"resultType":"scalar","result":[1,"many"]}}',
            "'many' is not a number",
        ),
    ],
)
def test_an_answer_unlike_the_api_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(UpstreamError, match=reason):
        client.parse(body, "http://p")


def test_prometheus_special_values_parse() -> None:
    body = (
        b'{"status":"success","data":{"resultType":"vector","result":['
        b'{"metric":{"i":"a"},"value":[1.5,"NaN"]},{"metric":{"i":"b"},"value":[1.5,"+Inf"]},'
        b'{"metric":{"i":"c"},"value":[1.5,"0"]}]}}'
    )
    samples = client.parse(body, "http://p")
    assert [s.label("i") for s in client.firing(samples)] == ["a", "b"]

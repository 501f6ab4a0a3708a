"""Observability end to end: a real Prometheus server (Debian's ``prometheus`` package) scrapes a real
deft server with the shipped configuration (deploy/prometheus/prometheus.yml, its target pointed at the
test server), answers PromQL on ``deft_request_latency_seconds`` after a generation, loads the shipped
alert rules, and runs every query of the Grafana dashboard (deploy/grafana/deft-dashboard.json).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
KUBERNETES_CONFIG = PROMETHEUS_DIR / "prometheus-kubernetes.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "deft-dashboard.json"
DEADLINE_S = 60
# Grafana's variables, as the dashboard would fill them in
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}


def binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found: install Debian's `prometheus` package (apt-get install prometheus)")
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend((panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def fill(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unfilled Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(deft_[a-z0-9_]+)", expr))


# ---------------------------------------------------------------------------------- static checks


def test_shipped_config_and_rules_pass_promtool() -> None:
    promtool = binary("promtool")
    done = subprocess.run(
        [promtool, "check", "config", str(CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deft-rules.yml" in done.stdout + done.stderr, "promtool did not check the rule file"


def test_kubernetes_config_discovers_deft_pods() -> None:
    """The in-cluster variant keeps deft pods (labels, annotation, port name as in deploy/k8s)."""
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keeps = {
        tuple(r["source_labels"]): r["regex"]
        for r in job["relabel_configs"]
        if r.get("action", "replace") == "keep"
    }
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    assert (
        keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]
        == pod["metadata"]["labels"]["app.kubernetes.io/name"]
    )
    assert (
        pod["metadata"]["annotations"]["prometheus.io/scrape"]
        == keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]
    )
    port_names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] in port_names
    assert config["rule_files"] == yaml.safe_load(CONFIG.read_text())["rule_files"]


def test_kubernetes_config_passes_promtool() -> None:
    done = subprocess.run(
        [binary("promtool"), "check", "config", str(KUBERNETES_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "kubernetes_sd_configs not found" in done.stdout + done.stderr:
        pytest.skip("this promtool was built without Kubernetes discovery (Debian's is): cannot check it")
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_structure() -> None:
    """Imports into Grafana: unique panel ids, a layout, queries through the data-source variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicated panel ids"
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], f"panel {panel['title']!r} has no query"
    exprs = " ".join(e for _, e in dashboard_exprs())
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le) (rate(deft_request_latency_seconds_bucket" in exprs
        )


# ------------------------------------------------------------------------------ live Prometheus


class Prometheus:
    def __init__(self, config: Path, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {DEADLINE_S}s:\n{self.log()}")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as e:  # 400/422 carry the error as JSON
            return json.load(e)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def poll(self, expr: str, accept, what: str) -> list[dict[str, Any]]:
        """Query until ``accept(result)``; fails with the last answer after the deadline."""
        end, answer = time.monotonic() + DEADLINE_S, {}
        while time.monotonic() < end:
            answer = self.query(expr)
            assert answer.get("status") == "success", f"{expr}: {answer}"
            if accept(answer["data"]["result"]):
                return answer["data"]["result"]
            time.sleep(0.5)
        raise AssertionError(f"{what}: {expr} still gives {answer} after {DEADLINE_S}s\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def config_for_test(server_metrics_port: int, folder: Path) -> Path:
    """The shipped config with its static job aimed at the test server, scraping every second."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    jobs = [j for j in config["scrape_configs"] if j.get("static_configs")]
    assert [j["job_name"] for j in jobs] == ["deft"], "expected one static job named deft"
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{server_metrics_port}"]}]
    config["scrape_configs"] = jobs
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config.get("rule_files", [])]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "data").mkdir()
    prom = Prometheus(
        config_for_test(server.metrics_port, folder), folder / "data", folder / "prometheus.log"
    )
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def generated(server, prometheus) -> int:
    """Images generated through the client once Prometheus watches the server."""
    from deft_client import DeftClient

    with DeftClient(server.address, timeout=120) as client:
        images = client.generate("a lighthouse at dusk", steps=2, seed=7, num_images=2)
    assert len(images) == 2
    return len(images)


def test_prometheus_scrapes_the_server(prometheus) -> None:
    up = prometheus.poll('up{job="deft"}', lambda r: r and r[0]["value"][1] == "1", "target never up")
    assert len(up) == 1


def test_latency_query_after_generating(prometheus, generated) -> None:
    result = prometheus.poll(
        "sum(deft_request_latency_seconds_count)",
        lambda r: r and float(r[0]["value"][1]) >= 1,
        "no request latency recorded",
    )
    assert float(result[0]["value"][1]) == 1  # one GenerateOnce call
    images = prometheus.poll(
        "sum(deft_images_generated_total)",
        lambda r: r and float(r[0]["value"][1]) >= generated,
        "images not counted",
    )
    assert float(images[0]["value"][1]) == generated
    ok = prometheus.poll('sum(deft_requests_total{status="ok"})', lambda r: bool(r), "no ok requests")
    assert float(ok[0]["value"][1]) == 1


def test_alert_rules_load_and_evaluate(prometheus) -> None:
    expected = {
        r["alert"]
        for g in yaml.safe_load((PROMETHEUS_DIR / "deft-rules.yml").read_text())["groups"]
        for r in g["rules"]
    }
    end, rules = time.monotonic() + DEADLINE_S, []
    while time.monotonic() < end:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if {r["name"] for r in rules} == expected and all(r["health"] == "ok" for r in rules):
            break
        time.sleep(0.5)
    assert {r["name"]: r["health"] for r in rules} == dict.fromkeys(expected, "ok"), rules
    # a healthy idle server fires none of them
    assert all(r["state"] == "inactive" for r in rules), rules


def test_dashboard_queries_run_and_name_real_metrics(server, prometheus, generated) -> None:
    exprs = dashboard_exprs()
    titles = {title for title, _ in exprs}
    for needed in ("Request latency", "Requests/s by status", "Images/s", "Batch size per forward"):
        assert needed in titles, f"dashboard lacks the {needed!r} panel"
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        exposed = {
            sample.name
            for family in text_string_to_metric_families(reply.read().decode())
            for sample in family.samples
        }
    used = set().union(*(metric_names(e) for _, e in exprs))
    assert not used - exposed, f"the dashboard queries metrics the server does not expose: {used - exposed}"
    for needed in ("deft_request_latency_seconds_bucket", "deft_requests_waiting", "deft_batch_size_bucket"):
        assert needed in used, f"no panel queries {needed}"
    for title, expr in exprs:
        # every query parses and, once the server has generated, returns data (catches wrong labels)
        prometheus.poll(fill(expr), lambda r: bool(r), f"panel {title!r} shows no data")

"""The Kubernetes manifests in configs/deploy/kubernetes: every `pijax:` metric they name is
served by `/metrics` of a running server, the probes and ports match what the server offers, and
every serve.py flag they pass exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from http_harness import HTTP_TIMEOUT_S, start_http, stop_http

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "configs" / "deploy" / "kubernetes"
METRIC_RE = re.compile(r"(?<![\w/.-])pijax:[a-z_]+")  # not an image tag (".../pijax:latest")


def documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        # Embedded YAML (the endpoint picker's config file in a ConfigMap) must parse too.
    for d in docs:
        if d["kind"] == "ConfigMap":
            for text in d["data"].values():
                assert yaml.safe_load(text)
    return docs


def strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def by_kind(kind: str, name: str) -> dict:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(scope="module")
def base_url(server):
    api = start_http(server)
    yield f"http://127.0.0.1:{api.port}"
    stop_http(server, api)


def served_metric_names(body: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1] != "#"}


def test_every_referenced_metric_is_served(base_url):
    referenced = {m for d in documents() for s in strings(d) for m in METRIC_RE.findall(s)}
    # The endpoint picker needs queue, running and KV utilization at least.
    assert {
        "pijax:num_requests_waiting",
        "pijax:num_requests_running",
        "pijax:kv_cache_usage_perc",
    } <= referenced
    body = httpx.get(f"{base_url}/metrics", timeout=HTTP_TIMEOUT_S).text
    served = served_metric_names(body)
    missing = sorted(referenced - served)
    assert not missing, missing
    # Each is labelled with the model name, as the protocol's scrapers expect.
    for name in referenced:
        lines = [line for line in body.splitlines() if line.startswith(name + "{")]
        assert lines and all('model_name="tiny-random"' in line for line in lines), name


def test_probes_ports_and_flags_match_the_server(base_url):
    pod = by_kind("Deployment", "pijax")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = dict(a.split("=", 1) for a in container["args"])
    assert int(args["--http_port"]) == ports["http"] and int(args["--port"]) == ports["grpc"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == "http"
    assert httpx.get(f"{base_url}{probe['path']}", timeout=HTTP_TIMEOUT_S).status_code == 200
    helpfull = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), "--helpfull"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    ).stdout
    defined = set(re.findall(r"^\s+--(?:\[no\])?([a-z_]+):", helpfull, re.MULTILINE))
    assert {"http_port", "api_keys", "model"} <= defined, helpfull[-2000:]
    unknown = [a for a in args if a.removeprefix("--") not in defined]
    assert not unknown, unknown
    # The API-key file comes from the Secret, mounted where --api_keys points.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert args["--api_keys"].startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == by_kind("Secret", "pijax-api-keys")["metadata"]["name"]
    model = next(m for m in container["volumeMounts"] if m["name"] == "model")
    assert args["--model"].startswith(model["mountPath"] + "/") and model["readOnly"]


def test_pool_selects_the_pods_and_targets_the_http_port():
    pool = by_kind("InferencePool", "pijax")["spec"]
    deployment = by_kind("Deployment", "pijax")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    http = next(
        p["containerPort"]
        for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        if p["name"] == "http"
    )
    assert [p["number"] for p in pool["targetPorts"]] == [http]
    epp = by_kind("Service", pool["endpointPickerRef"]["name"])
    assert pool["endpointPickerRef"]["port"]["number"] in [p["port"] for p in epp["spec"]["ports"]]

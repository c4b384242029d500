"""`reclaimer report --cluster`: the real `kubernetes` client against the fake API server's pods/proxy, which forwards
to real daemon HTTP servers (one node up, one down, one hanging, one forbidden...). Run through the CLI entry point."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reclaimer.app.cli import main
from reclaimer.export.metrics import Metrics
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import CycleSnapshot
from reclaimer.export.server import BearerToken, make_app
from tests.support.export_fixtures import GIB, SnapshotBuilder, node_snapshot, serve_in_thread
from tests.support.fake_kube import FakeKube, Reply, status_body

NS = "gpu-reclaimer"
LABELS = {"app.kubernetes.io/name": "gpu-reclaimer", "app.kubernetes.io/component": "node-agent"}
K_BIG = "99999999-0000-4000-8000-000000000001"

pytestmark = pytest.mark.timeout(120)


@dataclass
class FixedView:
    snap: CycleSnapshot

    def snapshot(self) -> CycleSnapshot:
        return self.snap

    def health(self, now: float) -> tuple[bool, str]:
        return True, "ok"

    def readiness(self, now: float) -> tuple[bool, dict[str, Any]]:
        return True, {}


def second_node(now: float) -> CycleSnapshot:
    """gpu-node-2: one kernel idle 3 h on 70 GiB, the worst waste in the cluster."""
    b = SnapshotBuilder(now=now, node="gpu-node-2", mode="enforce")
    g = b.gpu(7, memory_used=70 * GIB, idle_seconds=3 * 3600)
    b.kernel(K_BIG, {g: [(4242, 70 * GIB, 0.0)]}, Verdict.WARN, namespace="vision", pod="jupyter-zoe",
             pod_uid=str(uuid.uuid4()), user="zoe", reason="idle 3h; reclaim in 4m", idle_seconds=3 * 3600,
             eta_seconds=240)
    return b.build()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: nothing listens there


@contextlib.contextmanager
def hanging_server() -> Iterator[str]:
    """Accepts connections and never answers: a wedged daemon."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conns.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        srv.close()


def add_daemon(api: FakeKube, node: str, phase: str = "Running") -> dict[str, Any]:
    return api.add_pod(f"gpu-reclaimer-{node[-1]}x", namespace=NS, node=node, labels=LABELS, phase=phase,
                       container_ports=[("http-metrics", 9400)], pod_ip=f"10.1.0.{node[-1]}", ready=True)


def run_cli(tmp_path: Path, api: FakeKube, *extra: str) -> tuple[int, str, str]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["report", "--cluster", "--kubeconfig", str(kubeconfig), *extra])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    """gpu-node-1 answers (the busy little node of the export tests); gpu-node-2 is down (its port is closed)."""
    for var in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG"):
        monkeypatch.delenv(var, raising=False)
    now = time.time()
    with FakeKube() as api, serve_in_thread(make_app(FixedView(node_snapshot(now=now)), Metrics(lambda: None,
                                                                                              lambda: {}))) as up:
        api.proxy_to(add_daemon(api, "gpu-node-1"), up)
        api.proxy_to(add_daemon(api, "gpu-node-2"), f"http://127.0.0.1:{closed_port()}")
        api.add_pod("jupyter-alice", namespace="ml-team", node="gpu-node-1", labels={"app": "jupyterhub"})
        yield api


def test_two_nodes_one_down_json(two_nodes: FakeKube, tmp_path: Path) -> None:
    code, out, err = run_cli(tmp_path, two_nodes, "-o", "json")
    assert code == 1, err  # some node did not answer: not a clean bill of health
    merged = json.loads(out)
    assert [n["node"] for n in merged["nodes"]] == ["gpu-node-1"], merged["unanswered"]
    (down,) = merged["unanswered"]
    assert down["node"] == "gpu-node-2" and down["pod"] == "gpu-reclaimer-2x"
    assert "HTTP 503" in down["reason"] and "connection refused" in down["reason"]
    assert {k["node"] for k in merged["kernels"]} == {"gpu-node-1"}
    assert len(merged["kernels"]) == 5
    assert merged["summary"]["nodes_answered"] == 1 and merged["summary"]["nodes_unanswered"] == 1
    # Found by the label selector in the daemons' namespace only (the notebook pod is not asked).
    lists = two_nodes.requests_to("GET", r"^/api/v1/namespaces/gpu-reclaimer/pods$")
    assert lists and lists[0].query["labelSelector"] == ",".join(f"{k}={v}" for k, v in LABELS.items())
    proxied = {r.path for r in two_nodes.requests_to("GET", r"/proxy/")}
    assert proxied == {f"/api/v1/namespaces/{NS}/pods/gpu-reclaimer-{i}x:9400/proxy/report" for i in (1, 2)}


def test_both_up_merges_sorted_by_waste_as_a_table(two_nodes: FakeKube, tmp_path: Path) -> None:
    with serve_in_thread(make_app(FixedView(second_node(time.time())), Metrics(lambda: None, lambda: {}))) as up2:
        two_nodes.proxy_to(two_nodes.pods[(NS, "gpu-reclaimer-2x")], up2)
        code, out, err = run_cli(tmp_path, two_nodes, "-o", "table")
        _, js, _ = run_cli(tmp_path, two_nodes, "-o", "json")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("cluster  2 of 2 nodes answered (1 dry-run, 1 enforce; dry-run verdicts show")
    header = next(i for i, line in enumerate(lines) if line.startswith("NODE"))
    first, second = lines[header + 1], lines[header + 2]
    assert first.startswith("gpu-node-2") and "jupyter-zoe" in first  # 70 GiB x 3 h beats 20 GiB x 47 min
    assert second.startswith("gpu-node-1") and "research" in second  # the allocated T4 (16 GiB x 1 h)
    assert "did not answer" not in out
    merged = json.loads(js)
    wastes = [k["node"] for k in merged["kernels"]]
    assert wastes[0] == "gpu-node-2" and len(wastes) == 6
    assert merged["summary"]["gpus_held_idle"] == 4  # alice's, bob's, the allocated T4, zoe's


def test_forbidden_pending_and_impostor_nodes_are_named(two_nodes: FakeKube, tmp_path: Path) -> None:
    two_nodes.proxy_responses[(NS, "gpu-reclaimer-2x")] = Reply(403, status_body(
        403, "Forbidden", 'pods "gpu-reclaimer-2x" is forbidden: User "oncall" cannot get resource "pods/proxy" in '
        'API group "" in the namespace "gpu-reclaimer"'))
    add_daemon(two_nodes, "gpu-node-3", phase="Pending")
    # gpu-node-4's pod proxies to gpu-node-1's daemon: a report that names another node is not gpu-node-4's.
    two_nodes.proxy_to(add_daemon(two_nodes, "gpu-node-4"), two_nodes.proxy_targets[(NS, "gpu-reclaimer-1x")])
    code, out, _ = run_cli(tmp_path, two_nodes, "-o", "json")
    assert code == 1
    reasons = {u["node"]: u["reason"] for u in json.loads(out)["unanswered"]}
    assert set(reasons) == {"gpu-node-2", "gpu-node-3", "gpu-node-4"}
    assert "HTTP 403" in reasons["gpu-node-2"] and "pods/proxy" in reasons["gpu-node-2"]
    assert reasons["gpu-node-3"] == "pod is Pending"
    assert "answered as node 'gpu-node-1'" in reasons["gpu-node-4"]


@pytest.mark.e2e  # waits out a real 3 s deadline
def test_a_hanging_node_costs_at_most_the_deadline(two_nodes: FakeKube, tmp_path: Path) -> None:
    with hanging_server() as hung:
        two_nodes.proxy_to(two_nodes.pods[(NS, "gpu-reclaimer-2x")], hung)
        start = time.monotonic()
        code, out, _ = run_cli(tmp_path, two_nodes, "-o", "json", "--deadline", "3s")
        elapsed = time.monotonic() - start
    assert code == 1
    merged = json.loads(out)
    assert [n["node"] for n in merged["nodes"]] == ["gpu-node-1"]  # the healthy node is still reported
    (late,) = merged["unanswered"]
    assert late["node"] == "gpu-node-2" and ("3s" in late["reason"])
    assert elapsed < 3 + 5  # the deadline plus start-up, not the client's default timeouts


def test_concurrency_is_bounded(two_nodes: FakeKube, tmp_path: Path) -> None:
    up = two_nodes.proxy_targets[(NS, "gpu-reclaimer-1x")]
    for i in range(3, 9):
        pod = two_nodes.add_pod(f"gpu-reclaimer-n{i}", namespace=NS, node=f"gpu-node-{i}", labels=LABELS,
                                container_ports=[("http-metrics", 9400)], pod_ip=f"10.1.0.{i}", ready=True)
        two_nodes.proxy_to(pod, up)  # they answer as gpu-node-1: counted, then rejected
    code, out, _ = run_cli(tmp_path, two_nodes, "-o", "json", "--concurrency", "2")
    assert code == 1
    assert len(json.loads(out)["unanswered"]) == 7
    assert 1 <= two_nodes.proxy_max_in_flight <= 2


def test_daemon_token_reaches_the_daemon_through_the_proxy(two_nodes: FakeKube, tmp_path: Path) -> None:
    """The API server drops Authorization before proxying: the token travels as X-Reclaimer-Token."""
    token_file = tmp_path / "listen-token"
    token_file.write_text("s3cret-daemon-token\n")
    snap = second_node(time.time())
    app = make_app(FixedView(snap), Metrics(lambda: None, lambda: {}), BearerToken(str(token_file)))
    with serve_in_thread(app) as guarded:
        two_nodes.proxy_to(two_nodes.pods[(NS, "gpu-reclaimer-2x")], guarded)
        code, out, _ = run_cli(tmp_path, two_nodes, "-o", "json")
        assert code == 1
        (refused,) = json.loads(out)["unanswered"]
        assert "HTTP 401" in refused["reason"] and "--token-file" in refused["reason"]
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token\n")
        code, out, _ = run_cli(tmp_path, two_nodes, "-o", "json", "--token-file", str(wrong))
        assert code == 1 and "HTTP 401" in json.loads(out)["unanswered"][0]["reason"]
        code, out, err = run_cli(tmp_path, two_nodes, "-o", "json", "--token-file", str(token_file))
    assert code == 0, err
    assert "s3cret" not in out + err
    assert [n["node"] for n in json.loads(out)["nodes"]] == ["gpu-node-1", "gpu-node-2"]


def test_no_daemons_is_an_error_naming_the_selector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeKube() as api:
        code, out, err = run_cli(tmp_path, api, "--namespace", "elsewhere")
    assert code == 1 and out == ""
    assert "no daemon pods in namespace elsewhere" in err and "app.kubernetes.io/name=gpu-reclaimer" in err


def test_cluster_and_from_exclude_each_other(tmp_path: Path) -> None:
    with FakeKube() as api:
        code, _, err = run_cli(tmp_path, api, "--from", "http://127.0.0.1:9400")
    assert code == 2 and "--cluster and --from" in err


def test_a_node_answering_something_else_is_named_not_merged(two_nodes: FakeKube, tmp_path: Path) -> None:
    """Another service on the daemon's port (HTML, or JSON that is not a report) never enters the merged report."""
    from aiohttp import web

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html>login</html>", content_type="text/html")

    async def other_json(_: web.Request) -> web.Response:
        return web.json_response({"node": "gpu-node-2", "kernels": "none"})

    for handler, expected in ((html, "not JSON"), (other_json, "report.generated_at: required field is missing")):
        app = web.Application()
        app.router.add_get("/report", handler)
        with serve_in_thread(app) as other:
            two_nodes.proxy_to(two_nodes.pods[(NS, "gpu-reclaimer-2x")], other)
            code, out, _ = run_cli(tmp_path, two_nodes, "-o", "json")
        assert code == 1
        merged = json.loads(out)
        (bad,) = merged["unanswered"]
        assert bad["node"] == "gpu-node-2" and "not a gpu-reclaimer report" in bad["reason"], bad
        assert expected in bad["reason"]
        assert {k["node"] for k in merged["kernels"]} == {"gpu-node-1"}


def test_a_gpu_node_without_a_daemon_pod_is_named(two_nodes: FakeKube, tmp_path: Path) -> None:
    """A GPU node the DaemonSet does not cover (a taint, a missing label) must not vanish from the report."""
    for name, gpus in (("gpu-node-1", 8), ("gpu-node-2", 8), ("gpu-node-9", 4), ("cpu-node-1", 0)):
        two_nodes.add_node(name, gpus)
    code, out, _ = run_cli(tmp_path, two_nodes, "-o", "json")
    assert code == 1
    merged = json.loads(out)
    reasons = {u["node"]: u["reason"] for u in merged["unanswered"]}
    assert set(reasons) == {"gpu-node-2", "gpu-node-9"}  # the CPU node is not expected to run a daemon
    assert reasons["gpu-node-9"].startswith("no gpu-reclaimer pod on this GPU node")
    assert merged["notes"] == []


def test_without_rights_to_list_nodes_the_report_says_what_it_cannot_see(two_nodes: FakeKube, tmp_path: Path) -> None:
    two_nodes.node_list_response = Reply(403, status_body(403, "Forbidden", 'nodes is forbidden: User "oncall" cannot '
                                                          'list resource "nodes" in API group "" at the cluster scope'))
    code, out, _ = run_cli(tmp_path, two_nodes, "-o", "table")
    assert code == 1
    assert "Note: cannot list nodes (HTTP 403: nodes is forbidden" in out
    assert "GPU nodes without a daemon pod are not shown" in out

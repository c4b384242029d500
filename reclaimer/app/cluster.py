"""`reclaimer report --cluster`: every daemon's ``/report`` through the API server's pod proxy, merged.

Runs with the caller's own credentials (kubeconfig, or the in-cluster service account): it needs ``list`` on pods and
``get`` on ``pods/proxy`` in the daemons' namespace; with ``list`` on nodes it also names GPU nodes that have no
daemon pod at all. Daemon pods are found by label selector; each is
asked once, at most ``concurrency`` at a time, each request bounded by ``timeout`` and the whole by ``deadline``.
A node that does not answer is named with the reason, never silently left out. Rendering is pure
(``report.merge_reports`` / ``table.render_cluster_table``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from reclaimer.core.config import KubernetesSettings
from reclaimer.core.errors import ReclaimerError
from reclaimer.export.report import Report, ReportSchemaError, report_from_json
from reclaimer.export.server import PROXY_TOKEN_HEADER
from reclaimer.observe.kube import KubeError, _cut, _load_configuration, _prepare, raw_response

DEFAULT_NAMESPACE = "gpu-reclaimer"
DEFAULT_SELECTOR = "app.kubernetes.io/name=gpu-reclaimer,app.kubernetes.io/component=node-agent"
DEFAULT_PORT_NAME = "http-metrics"
DEFAULT_PORT = 9400
DEFAULT_CONCURRENCY = 16
DEFAULT_TIMEOUT = 10.0
DEFAULT_DEADLINE = 30.0
MAX_REPORT_BYTES = 32 * 1024 * 1024  # a node report is KBs; a runaway answer must not exhaust the caller's memory


@dataclass(frozen=True, slots=True)
class DaemonPod:
    """One daemon pod: where it runs and which port serves ``/report``."""

    name: str
    namespace: str
    node: str
    port: int
    phase: str | None
    ready: bool


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A node whose report is missing, and why (one line an on-call engineer can act on)."""

    node: str
    pod: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    namespace: str = DEFAULT_NAMESPACE
    selector: str = DEFAULT_SELECTOR
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float = DEFAULT_TIMEOUT  # one node's request
    deadline: float = DEFAULT_DEADLINE  # the whole command


# --------------------------------------------------------------------------- finding the daemons


def _port_of(pod: Mapping[str, Any]) -> int:
    containers = (pod.get("spec") or {}).get("containers") or []
    ports = [p for c in containers for p in (c.get("ports") or [])]
    for p in ports:
        if p.get("name") == DEFAULT_PORT_NAME and isinstance(p.get("containerPort"), int):
            return int(p["containerPort"])
    return DEFAULT_PORT


def _ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def daemon_pod_from_json(pod: Mapping[str, Any]) -> DaemonPod:
    meta = pod.get("metadata") or {}
    return DaemonPod(
        name=str(meta.get("name") or "?"),
        namespace=str(meta.get("namespace") or "?"),
        node=str((pod.get("spec") or {}).get("nodeName") or "(unscheduled)"),
        port=_port_of(pod),
        phase=(pod.get("status") or {}).get("phase"),
        ready=_ready(pod),
    )


def _api_reason(exc: ApiException) -> str:
    """The API server's own message (a metav1.Status body), cut to one line."""
    message = ""
    try:
        body = json.loads(exc.body) if exc.body else {}
        message = str(body.get("message") or "") if isinstance(body, dict) else ""
    except (ValueError, TypeError):
        message = str(exc.body or "")[:200]
    return _cut(" ".join(f"HTTP {exc.status}: {message or exc.reason or ''}".split()))


def list_daemon_pods(api: k8s.CoreV1Api, options: ClusterOptions) -> list[DaemonPod]:
    """The daemon pods matching the selector; ``KubeError`` names the namespace, the selector and the cause."""
    try:
        resp = api.list_namespaced_pod(
            options.namespace, label_selector=options.selector, _request_timeout=options.timeout, _preload_content=False
        )
        items = json.loads(raw_response(resp).data).get("items") or []
    except ApiException as exc:
        hint = " (you need list on pods in that namespace)" if exc.status == 403 else ""
        raise KubeError(
            f"cannot list daemon pods in namespace {options.namespace} with selector "
            f"{options.selector!r}: {_api_reason(exc)}{hint}"
        ) from None
    except Exception as exc:  # urllib3 connection / timeout errors, bad JSON
        raise KubeError(
            f"cannot list daemon pods in namespace {options.namespace}: {_cut(str(exc)) or type(exc).__name__}"
        ) from None
    return sorted((daemon_pod_from_json(p) for p in items), key=lambda p: (p.node, p.name))


# --------------------------------------------------------------------------- one node


class NodeUnanswered(ReclaimerError):
    """One node's report could not be read; the message is the reason shown to the user."""


def fetch_report(api: k8s.CoreV1Api, pod: DaemonPod, timeout: float) -> Report:
    """GET ``/report`` of one daemon through ``pods/proxy``; validated. Raises ``NodeUnanswered`` with the reason."""
    try:
        resp = api.connect_get_namespaced_pod_proxy_with_path(
            f"{pod.name}:{pod.port}", pod.namespace, "report", _preload_content=False, _request_timeout=timeout
        )
        raw = raw_response(resp).read(MAX_REPORT_BYTES + 1)
    except ApiException as exc:
        reason = _api_reason(exc)
        if exc.status == 403:
            reason += " (you need get on pods/proxy in that namespace)"
        elif exc.status == 401 and "token" not in reason.lower():
            reason += " (the daemon requires a token: pass --token-file)"
        raise NodeUnanswered(reason) from None
    except Exception as exc:  # urllib3 timeouts and connection errors
        text = str(exc)
        if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
            raise NodeUnanswered(f"no answer within {timeout:g}s") from None
        raise NodeUnanswered(f"cannot reach the API server: {_cut(text) or type(exc).__name__}") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise NodeUnanswered(f"report larger than {MAX_REPORT_BYTES // (1024 * 1024)} MiB")
    try:
        return report_from_json(json.loads(raw))
    except ValueError as exc:  # bad JSON or ReportSchemaError
        what = str(exc) if isinstance(exc, ReportSchemaError) else "not JSON"
        raise NodeUnanswered(f"answered something that is not a gpu-reclaimer report: {_cut(what)}") from None


# --------------------------------------------------------------------------- all nodes


@dataclass
class ClusterResult:
    reports: list[Report]
    unanswered: list[Unanswered]
    pods: int
    notes: list[str]


GPU_RESOURCE = "nvidia.com/gpu"


def gpu_nodes(api: k8s.CoreV1Api, timeout: float) -> tuple[set[str] | None, str | None]:
    """Names of the nodes with GPUs (``nvidia.com/gpu`` in their capacity), or (None, why) when they cannot be listed
    (listing nodes is cluster-scoped: an on-call role may lack it)."""
    try:
        resp = api.list_node(_request_timeout=timeout, _preload_content=False)
        items = json.loads(raw_response(resp).data).get("items") or []
    except ApiException as exc:
        return None, f"cannot list nodes ({_api_reason(exc)}): GPU nodes without a daemon pod are not shown"
    except Exception as exc:
        return (
            None,
            f"cannot list nodes ({_cut(str(exc)) or type(exc).__name__}): GPU nodes without a daemon pod are not shown",
        )
    names: set[str] = set()
    for node in items:
        capacity = (node.get("status") or {}).get("capacity") or {}
        if str(capacity.get(GPU_RESOURCE, "0")).strip() not in ("", "0"):
            names.add(str((node.get("metadata") or {}).get("name")))
    return names, None


def collect(api: k8s.CoreV1Api, options: ClusterOptions, clock: Callable[[], float] = time.monotonic) -> ClusterResult:
    """Every daemon's report, at most ``options.concurrency`` requests in flight, all within ``options.deadline``."""
    start = clock()
    pods = list_daemon_pods(api, options)
    unanswered: list[Unanswered] = []
    notes: list[str] = []
    with_gpus, why = gpu_nodes(api, options.timeout)
    if why:
        notes.append(why)
    for node in sorted((with_gpus or set()) - {p.node for p in pods}):
        # A GPU node the DaemonSet does not cover would otherwise be missing from the report without a word.
        unanswered.append(
            Unanswered(
                node,
                "-",
                "no gpu-reclaimer pod on this GPU node (DaemonSet nodeSelector or tolerations do not match it?)",
            )
        )
    to_ask: list[DaemonPod] = []
    for pod in pods:
        if pod.phase != "Running":
            unanswered.append(Unanswered(pod.node, pod.name, f"pod is {pod.phase or 'in an unknown phase'}"))
        else:
            to_ask.append(pod)  # not Ready still answers /report (e.g. a gateway is down): ask anyway
    reports: list[Report] = []
    pool = ThreadPoolExecutor(max_workers=max(1, options.concurrency), thread_name_prefix="cluster-report")
    try:
        pending: dict[Future[Report], DaemonPod] = {}
        queue = list(to_ask)

        def submit() -> None:
            while queue and len(pending) < options.concurrency:
                left = options.deadline - (clock() - start)
                if left <= 0:
                    return
                pod = queue.pop(0)
                pending[pool.submit(fetch_report, api, pod, min(options.timeout, left))] = pod

        submit()
        while pending:
            left = options.deadline - (clock() - start)
            if left <= 0:
                break
            done, _ = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for fut in done:
                pod = pending.pop(fut)
                try:
                    report = fut.result()
                except NodeUnanswered as exc:
                    unanswered.append(Unanswered(pod.node, pod.name, str(exc)))
                    continue
                except Exception as exc:  # a bug must not hide the other nodes
                    unanswered.append(Unanswered(pod.node, pod.name, f"error: {type(exc).__name__}: {_cut(str(exc))}"))
                    continue
                if report.node != pod.node:
                    unanswered.append(
                        Unanswered(
                            pod.node,
                            pod.name,
                            f"answered as node {report.node!r}, but the pod runs on {pod.node!r}: report ignored",
                        )
                    )
                    continue
                reports.append(report)
            submit()
        for pod in [*pending.values(), *queue]:
            unanswered.append(Unanswered(pod.node, pod.name, f"no answer within the {options.deadline:g}s deadline"))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a hung request must not hold the command past its deadline
    return ClusterResult(reports, sorted(unanswered, key=lambda u: (u.node, u.pod)), len(pods), notes)


def core_api(kubeconfig: str | None, timeout: float, token: str | None = None) -> k8s.CoreV1Api:
    """A CoreV1Api from ``kubeconfig`` (else in-cluster, else $KUBECONFIG / ~/.kube/config).

    ``token``: the daemons' listen_token_file value. The API server authenticates the caller and drops the
    ``Authorization`` header before proxying, so it travels as ``X-Reclaimer-Token`` (server.PROXY_TOKEN_HEADER).
    """
    cfg = _prepare(_load_configuration(KubernetesSettings(kubeconfig=kubeconfig, timeout=timeout)))
    api_client = k8s.ApiClient(cfg)
    if token:
        api_client.set_default_header(PROXY_TOKEN_HEADER, token)
    return k8s.CoreV1Api(api_client)


def run_cluster_report(args: Any) -> int:
    """`reclaimer report --cluster`: print the merged table or JSON. Exit 0 when every node answered, 1 when some
    did not (the report still shows the others), ``KubeError`` (exit 1, one line) when no daemon could be listed."""
    import sys

    from reclaimer.export.report import merge_reports, render_json
    from reclaimer.export.table import render_cluster_table

    token = None
    if args.token_file:
        from reclaimer.export.server import _read_token_file

        token = _read_token_file(args.token_file)
    options = ClusterOptions(
        namespace=args.namespace,
        selector=args.selector,
        concurrency=args.concurrency,
        timeout=min(DEFAULT_TIMEOUT, args.deadline),
        deadline=args.deadline,
    )
    api = core_api(args.kubeconfig, options.timeout, token)
    result = collect(api, options)
    if result.pods == 0:
        raise KubeError(
            f"no daemon pods in namespace {options.namespace} match {options.selector!r}: "
            "is gpu-reclaimer installed there (kubectl apply -k deploy)?"
        )
    merged = merge_reports(
        result.reports,
        [{"node": u.node, "pod": u.pod, "reason": u.reason} for u in result.unanswered],
        time.time(),
        result.notes,
    )
    width = None
    if args.output != "json" and sys.stdout.isatty():
        import shutil

        width = shutil.get_terminal_size().columns
    sys.stdout.write(render_json(merged) if args.output == "json" else render_cluster_table(merged, width))
    sys.stdout.write("\n")
    return 0 if not result.unanswered else 1

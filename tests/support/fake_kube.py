"""A small Kubernetes API server (aiohttp) speaking the subset gpu-reclaimer uses, for the REAL `kubernetes` client.

    with FakeKube() as api:                 # serves on 127.0.0.1:<free port> from a background thread
        pod = api.add_pod("nb-alice", node="node-1", labels={...})
        kube = api.kube_client(node_name="node-1")
        api.eviction_response = pdb_blocked()   # script the next evictions; None = the real behaviour
        ...
        assert api.deletes == []                # DELETE pod is recorded so tests can prove it never happens
        api.proxy_to(pod, "http://127.0.0.1:9400")   # pods/proxy forwards to a real server ("down": a closed port)

The server runs on its own thread and event loop, so sync code (the kube client) and async tests can both use it.
Every request is recorded as ``Recorded(method, path, query, body)``. Like the real API server it checks what
matters: the uid precondition of an eviction (409 on mismatch), the fields events.k8s.io/v1 requires (422),
and the field and label selectors it understands (400 otherwise). Its pods/proxy, like the real one, drops the
caller's ``Authorization`` header before forwarding and answers 503 "error trying to reach service" when the pod's
port does not answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes import client as k8s

from reclaimer.core.config import KubernetesSettings
from reclaimer.observe.kube import KubeClient

MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class Reply:
    """A scripted response: status, JSON body, extra headers."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: Mapping[str, str]
    body: Any  # parsed JSON, or None


def status_body(code: int, reason: str, message: str, causes: Sequence[Mapping[str, str]] = (),
                retry_after: int | None = None, name: str | None = None) -> dict[str, Any]:
    """A metav1.Status failure as the API server writes it."""
    details: dict[str, Any] = {}
    if name:
        details.update(name=name, kind="pods")
    if causes:
        details["causes"] = list(causes)
    if retry_after:
        details["retryAfterSeconds"] = retry_after
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


# ----------------------------------------------------------------------- scripted eviction replies (real wording)


def pdb_blocked(pdb: str = "nb-pdb", retry_after: int | None = None) -> Reply:
    """429 from a PodDisruptionBudget (retry_after: the 'still being processed' variant, which sets Retry-After)."""
    body = status_body(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.",
                       causes=[{"reason": "DisruptionBudget",
                                "message": f"The disruption budget {pdb} needs 1 healthy pods and has 1 currently"}],
                       retry_after=retry_after)
    return Reply(429, body, {"Retry-After": str(retry_after)} if retry_after else {})


def retry_after(seconds: int | str) -> Reply:
    """429 throttling (API priority and fairness) with a Retry-After header."""
    body = status_body(429, "TooManyRequests", "Too many requests, please try again later.",
                       retry_after=seconds if isinstance(seconds, int) else None)
    return Reply(429, body, {"Retry-After": str(seconds)})


def multiple_pdbs() -> Reply:
    return Reply(500, status_body(500, "InternalError", "Internal error occurred: This pod has more than one "
                                  "PodDisruptionBudget, which the eviction subresource does not support."))


def forbidden(name: str = "pod") -> Reply:
    return Reply(403, status_body(403, "Forbidden", f'pods "{name}" is forbidden: User '
                                  '"system:serviceaccount:gpu-reclaimer:gpu-reclaimer" cannot create resource '
                                  '"pods/eviction" in API group "" in the namespace "default"'))


def not_found(name: str = "pod") -> Reply:
    return Reply(404, status_body(404, "NotFound", f'pods "{name}" not found', name=name))


def server_error(message: str = "etcdserver: request timed out") -> Reply:
    return Reply(500, status_body(500, "InternalError", f"Internal error occurred: {message}"))


# ----------------------------------------------------------------------- the server


class FakeKube:
    """State, recorder and aiohttp app of the fake API server. Use as a context manager (threaded server)."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.events: list[dict[str, Any]] = []
        self.eviction_response: Reply | None = None  # None: check the uid precondition, evict (201) or 404
        self.event_response: Reply | None = None  # None: validate and record (201)
        self.list_response: Reply | None = None  # None: list pods
        self.proxy_targets: dict[tuple[str, str], str] = {}  # pod -> base URL that pods/proxy forwards to
        self.proxy_responses: dict[tuple[str, str], Reply] = {}  # pod -> scripted pods/proxy reply (e.g. 403)
        self.proxy_in_flight = 0
        self.nodes: dict[str, dict[str, Any]] = {}
        self.node_list_response: Reply | None = None  # None: list the nodes
        self.proxy_max_in_flight = 0
        # Kubeflow Notebooks (kubeflow.org/v1), by (namespace, name); ``notebook_response`` scripts the next GET/PATCH.
        self.notebooks: dict[tuple[str, str], dict[str, Any]] = {}
        self.notebook_response: Reply | None = None
        # Like Kubeflow's notebook-controller: a Notebook annotated kubeflow-resource-stopped is scaled to 0 (its pods,
        # labelled notebook-name, are deleted). False: the annotation is stored and nothing else happens.
        self.notebook_controller = True
        # When set, a request without "Authorization: Bearer <required_token>" gets 401 Unauthorized, as a real API
        # server answers a token it does not know (or an expired projected token).
        self.required_token: str | None = None
        self.url = ""
        self._lock = threading.Lock()
        self._resource_version = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ state helpers

    def add_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        node: str | None = "node-1",
        uid: str | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        owner: tuple[str, str] | None = None,
        phase: str = "Running",
        start_time: str | None = "2026-01-01T00:00:00Z",
        deletion_timestamp: str | None = None,
        container_ids: Sequence[str] = (),
        init_container_ids: Sequence[str] = (),
        ephemeral_container_ids: Sequence[str] = (),
        container_ports: Sequence[tuple[str, int]] = (),
        pod_ip: str | None = None,
        ready: bool | None = None,
    ) -> dict[str, Any]:
        """Store a pod (JSON as the API returns it) and return it. ``owner`` is (kind, name)."""
        uid = uid or str(uuid.uuid4())
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid,
                                "resourceVersion": str(self._next_rv()), "labels": dict(labels or {}),
                                "annotations": dict(annotations or {})}
        if deletion_timestamp:
            meta["deletionTimestamp"] = deletion_timestamp
        if owner:
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": owner[0], "name": owner[1],
                                        "uid": str(uuid.uuid4()), "controller": True}]

        def statuses(ids: Sequence[str], prefix: str) -> list[dict[str, Any]]:
            return [{"name": f"{prefix}{i}", "containerID": cid, "ready": True, "restartCount": 0,
                     "image": "jupyter/base-notebook", "imageID": "", "state": {"running": {}}}
                    for i, cid in enumerate(ids)]

        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": meta,
            "spec": {"containers": [{"name": "notebook", "image": "jupyter/base-notebook",
                                     **({"ports": [{"name": n, "containerPort": p, "protocol": "TCP"}
                                                   for n, p in container_ports]} if container_ports else {})}],
                     **({"nodeName": node} if node else {})},
            "status": {"phase": phase,
                       **({"podIP": pod_ip} if pod_ip else {}),
                       **({"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
                          if ready is not None else {}),
                       **({"startTime": start_time} if start_time and phase != "Pending" else {}),
                       # A running pod always reports its containers; one without ids still shows them running.
                       "containerStatuses": statuses(container_ids, "c") or (
                           [{"name": "notebook", "ready": True, "started": True, "restartCount": 0,
                             "image": "jupyter/base-notebook", "imageID": "", "state": {"running": {}}}]
                           if phase == "Running" else []),
                       "initContainerStatuses": statuses(init_container_ids, "init"),
                       "ephemeralContainerStatuses": statuses(ephemeral_container_ids, "debug")},
        }
        with self._lock:
            self.pods[(namespace, name)] = pod
        return pod

    def add_raw_pod(self, pod: dict[str, Any]) -> None:
        """Store a pod exactly as given (for malformed-input tests)."""
        meta = pod.get("metadata") or {}
        with self._lock:
            self.pods[(meta.get("namespace", "default"), meta.get("name", f"raw-{len(self.pods)}"))] = pod

    def add_node(self, name: str, gpus: int = 0) -> dict[str, Any]:
        """Store a node whose capacity lists ``gpus`` nvidia.com/gpu (none when 0)."""
        capacity = {"cpu": "16", "memory": "128Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        node = {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name, "uid": str(uuid.uuid4())},
                "status": {"capacity": capacity, "allocatable": dict(capacity)}}
        with self._lock:
            self.nodes[name] = node
        return node

    def proxy_to(self, pod: Mapping[str, Any], base_url: str) -> None:
        """Make pods/proxy of ``pod`` forward to ``base_url`` (a real server; a closed port plays a dead daemon)."""
        meta = pod["metadata"]
        self.proxy_targets[(meta["namespace"], meta["name"])] = base_url.rstrip("/")

    def _next_rv(self) -> int:
        self._resource_version += 1
        return self._resource_version

    def requests_to(self, method: str, pattern: str) -> list[Recorded]:
        """Recorded requests with that method whose path matches the regex ``pattern``."""
        with self._lock:
            return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    @property
    def deletes(self) -> list[Recorded]:
        return self.requests_to("DELETE", r"/pods/")

    @property
    def evictions(self) -> list[Recorded]:
        return self.requests_to("POST", r"/eviction$")

    # ------------------------------------------------------------------ the app

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/v1/pods", self._list_pods)
        app.router.add_get("/api/v1/nodes", self._list_nodes)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list_pods)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/proxy/{path:.*}", self._proxy)
        app.router.add_delete("/api/v1/namespaces/{ns}/pods/{name}", self._delete_pod)
        app.router.add_post("/api/v1/namespaces/{ns}/pods/{name}/eviction", self._evict)
        app.router.add_post("/apis/events.k8s.io/v1/namespaces/{ns}/events", self._create_event)
        app.router.add_get("/apis/kubeflow.org/v1/namespaces/{ns}/notebooks/{name}", self._get_notebook)
        app.router.add_patch("/apis/kubeflow.org/v1/namespaces/{ns}/notebooks/{name}", self._patch_notebook)
        return app

    # ------------------------------------------------------------------ Kubeflow notebooks

    def add_notebook(self, name: str, *, namespace: str = "default", annotations: Mapping[str, str] | None = None,
                     pod: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Store a Notebook; with ``pod`` (from ``add_notebook_pod``) the notebook owns it through its StatefulSet."""
        nb = {"apiVersion": "kubeflow.org/v1", "kind": "Notebook",
              "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                           "resourceVersion": str(self._next_rv()), "annotations": dict(annotations or {})},
              "spec": {"template": {"spec": {"containers": [{"name": name, "image": "kubeflownotebookswg/jupyter"}]}}}}
        with self._lock:
            self.notebooks[(namespace, name)] = nb
        return nb

    def add_notebook_pod(self, name: str, *, namespace: str = "default", **kw: Any) -> dict[str, Any]:
        """The pod Kubeflow's notebook-controller makes for Notebook ``name``: ``<name>-0`` of StatefulSet ``name``,
        labelled ``notebook-name`` and ``statefulset``."""
        labels = {"notebook-name": name, "statefulset": name, "app": name, **kw.pop("labels", {})}
        return self.add_pod(f"{name}-0", namespace=namespace, owner=("StatefulSet", name), labels=labels, **kw)

    async def _get_notebook(self, request: web.Request) -> web.Response:
        if self.notebook_response is not None:
            return self._reply(self.notebook_response)
        key = (request.match_info["ns"], request.match_info["name"])
        with self._lock:
            nb = self.notebooks.get(key)
        return web.json_response(nb) if nb else self._reply(not_found(key[1]))

    async def _patch_notebook(self, request: web.Request) -> web.Response:
        if self.notebook_response is not None:
            return self._reply(self.notebook_response)
        if request.content_type != "application/merge-patch+json":
            return self._reply(Reply(415, status_body(415, "UnsupportedMediaType",
                                                      f"expected a merge patch, got {request.content_type}")))
        key = (request.match_info["ns"], request.match_info["name"])
        patch = request["json"]
        with self._lock:
            nb = self.notebooks.get(key)
            if nb is None:
                return self._reply(not_found(key[1]))
            annotations = ((patch or {}).get("metadata") or {}).get("annotations") or {}
            nb["metadata"]["annotations"].update(annotations)
            nb["metadata"]["resourceVersion"] = str(self._next_rv())
            if self.notebook_controller and "kubeflow-resource-stopped" in nb["metadata"]["annotations"]:
                for pod_key, pod in list(self.pods.items()):
                    if pod_key[0] == key[0] and pod["metadata"]["labels"].get("notebook-name") == key[1]:
                        del self.pods[pod_key]
        return web.json_response(nb)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, dict(request.query), body))
        request["json"] = body
        if self.required_token is not None and request.headers.get("Authorization") != f"Bearer {self.required_token}":
            return self._reply(Reply(401, status_body(401, "Unauthorized", "Unauthorized")))
        return await handler(request)

    @staticmethod
    def _reply(reply: Reply) -> web.Response:
        return web.json_response(dict(reply.body), status=reply.status, headers=dict(reply.headers))

    async def _list_pods(self, request: web.Request) -> web.Response:
        if self.list_response is not None:
            return self._reply(self.list_response)
        try:
            wanted = _field_selector(request.query.get("fieldSelector", ""))
        except ValueError as exc:
            return self._reply(Reply(400, status_body(400, "BadRequest", str(exc))))
        ns = request.match_info.get("ns")
        with self._lock:
            items = [p for (pns, _), p in sorted(self.pods.items()) if ns is None or pns == ns]
        items = [p for p in items if all(_field(p, k) == v for k, v in wanted.items())]
        try:
            matches = _label_selector(request.query.get("labelSelector", ""))
        except ValueError as exc:
            return self._reply(Reply(400, status_body(400, "BadRequest", str(exc))))
        items = [p for p in items if matches((p.get("metadata") or {}).get("labels") or {})]
        start = int(request.query.get("continue") or 0)
        limit = int(request.query.get("limit") or 0) or len(items)
        page, rest = items[start:start + limit], items[start + limit:]
        meta: dict[str, Any] = {"resourceVersion": str(self._resource_version)}
        if rest:
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(rest)
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page})

    async def _list_nodes(self, request: web.Request) -> web.Response:
        if self.node_list_response is not None:
            return self._reply(self.node_list_response)
        with self._lock:
            items = [n for _, n in sorted(self.nodes.items())]
        return web.json_response({"kind": "NodeList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self._resource_version)}, "items": items})

    async def _get_pod(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        with self._lock:
            pod = self.pods.get(key)
        return web.json_response(pod) if pod else self._reply(not_found(key[1]))

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        """GET pods/{name[:port]}/proxy/{path}: forwarded like the API server does (Authorization dropped)."""
        ns, target = request.match_info["ns"], request.match_info["name"]
        name, _, port = target.partition(":")
        key = (ns, name)
        if key in self.proxy_responses:
            return self._reply(self.proxy_responses[key])
        with self._lock:
            pod = self.pods.get(key)
        if pod is None:
            return self._reply(not_found(name))
        ip = (pod.get("status") or {}).get("podIP") or "10.0.0.1"
        base = self.proxy_targets.get(key)
        unreachable = Reply(503, status_body(503, "ServiceUnavailable", f"error trying to reach service: dial tcp "
                                             f"{ip}:{port or 80}: connect: connection refused"))
        if base is None:
            return self._reply(unreachable)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "host", "content-length", "connection")}
        self.proxy_in_flight += 1
        self.proxy_max_in_flight = max(self.proxy_max_in_flight, self.proxy_in_flight)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/{request.match_info['path']}", headers=headers,
                                       allow_redirects=False) as upstream:
                    body = await upstream.read()
                    return web.Response(body=body, status=upstream.status,
                                        content_type=upstream.content_type or "application/octet-stream")
        except aiohttp.ClientConnectionError:
            return self._reply(unreachable)
        finally:
            self.proxy_in_flight -= 1

    async def _delete_pod(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        with self._lock:
            pod = self.pods.pop(key, None)
        return web.json_response(pod) if pod else self._reply(not_found(key[1]))

    async def _evict(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if self.eviction_response is not None:
            return self._reply(self.eviction_response)
        body = request["json"] if isinstance(request["json"], dict) else {}
        if body.get("kind") != "Eviction" or (body.get("metadata") or {}).get("name") != key[1]:
            return self._reply(Reply(400, status_body(400, "BadRequest", "name in URL does not match the Eviction")))
        with self._lock:
            pod = self.pods.get(key)
            if pod is None:
                return self._reply(not_found(key[1]))
            want = ((body.get("deleteOptions") or {}).get("preconditions") or {}).get("uid")
            have = pod["metadata"]["uid"]
            if want is not None and want != have:
                return self._reply(Reply(409, status_body(
                    409, "Conflict", f'Operation cannot be fulfilled on pods "{key[1]}": the UID in the precondition '
                    f"({want}) does not match the UID in record ({have}). The object might have been deleted and "
                    "then recreated", name=key[1])))
            if request.query.get("dryRun") != "All":
                del self.pods[key]
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}, status=201)

    async def _create_event(self, request: web.Request) -> web.Response:
        if self.event_response is not None:
            return self._reply(self.event_response)
        body = request["json"] if isinstance(request["json"], dict) else {}
        problems = _event_problems(body, request.match_info["ns"])
        if problems:
            return self._reply(Reply(422, status_body(422, "Invalid", "Event is invalid: " + "; ".join(problems))))
        with self._lock:
            self.events.append(body)
        return web.json_response(body, status=201)

    # ------------------------------------------------------------------ running it

    def start(self) -> FakeKube:
        """Serve on 127.0.0.1:<free port> from a daemon thread; sets ``url``."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._runner = web.AppRunner(self.make_app(), access_log=None)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, "127.0.0.1", 0)
                loop.run_until_complete(site.start())
                port = self._runner.addresses[0][1]
                self.url = f"http://127.0.0.1:{port}"
            except BaseException as exc:  # surfaced to start()'s caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-kube", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("fake kube API server did not start within 30 s")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop = self._thread = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configuration(self) -> k8s.Configuration:
        """A client Configuration pointing at this server."""
        cfg = k8s.Configuration()
        cfg.host = self.url
        return cfg

    def kube_client(self, settings: KubernetesSettings | None = None, *, node_name: str = "node-1",
                    page_size: int = 500) -> KubeClient:
        """A real KubeClient talking to this server."""
        return KubeClient.for_configuration(self.configuration(), settings or KubernetesSettings(timeout=5.0),
                                            node_name=node_name, page_size=page_size)

    def kubeconfig(self, token: str = "fake-token-not-a-secret") -> str:
        """A kubeconfig YAML document pointing at this server (for ``KubeClient.from_settings``)."""
        return (
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters:\n- name: fake\n  cluster: {{server: '{self.url}'}}\n"
            f"users:\n- name: fake\n  user: {{token: {token}}}\n"
            "contexts:\n- name: fake\n  context: {cluster: fake, user: fake}\n"
        )


def _field_selector(text: str) -> dict[str, str]:
    """``spec.nodeName=x,metadata.namespace=y`` -> dict; unsupported fields are a 400 like the real server."""
    out: dict[str, str] = {}
    for term in filter(None, text.split(",")):
        m = re.match(r"^([A-Za-z.]+)==?(.*)$", term)
        if not m or m.group(1) not in ("spec.nodeName", "metadata.namespace", "metadata.name", "status.phase"):
            raise ValueError(f'"{term}" is not a known field selector: only "metadata.name", "metadata.namespace", '
                             '"spec.nodeName", "status.phase"')
        out[m.group(1)] = m.group(2)
    return out


def _label_selector(text: str) -> Any:
    """``a=b,c!=d,e`` -> a predicate over a labels dict (equality and existence, as kubectl writes them)."""
    terms: list[tuple[str, str, str | None]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.match(r"^([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)$", term)
        if m:
            terms.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
        elif re.match(r"^!?[A-Za-z0-9./_-]+$", term):
            terms.append((term.lstrip("!"), "absent" if term.startswith("!") else "exists", None))
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")

    def matches(labels: Mapping[str, str]) -> bool:
        for key, op, value in terms:
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
            if op == "exists" and key not in labels:
                return False
            if op == "absent" and key in labels:
                return False
        return True

    return matches


def _field(pod: Mapping[str, Any], path: str) -> Any:
    value: Any = pod
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _event_problems(body: Mapping[str, Any], namespace: str) -> list[str]:
    """What events.k8s.io/v1 validation would reject in ``body``."""
    problems: list[str] = []
    meta = body.get("metadata") or {}
    if not (meta.get("name") or meta.get("generateName")):
        problems.append("metadata.name: Required value")
    if meta.get("namespace", namespace) != namespace:
        problems.append("metadata.namespace: does not match the namespace in the URL")
    if not MICRO_TIME.match(str(body.get("eventTime", ""))):
        problems.append(f"eventTime: Invalid value: {body.get('eventTime')!r}: must be RFC3339 with microseconds")
    for key in ("reportingController", "reportingInstance", "action", "reason"):
        value = body.get(key)
        if not value:
            problems.append(f"{key}: Required value")
        elif len(str(value)) > 128:
            problems.append(f"{key}: Too long: may not be longer than 128")
    if len(str(body.get("note", "")).encode("utf-8")) > 1024:
        problems.append("note: Too long: may not be longer than 1024")
    if body.get("type") not in ("Normal", "Warning"):
        problems.append("type: Unsupported value")
    regarding = body.get("regarding") or {}
    if not regarding.get("kind") or not regarding.get("name"):
        problems.append("regarding: Required value")
    return problems

"""Kubernetes API adapter: pod metadata for this node, evictions and events.k8s.io Events.

The daemon's adapter to the Kubernetes API (app/cluster.py also uses the client, for ``report --cluster``).
Every call is synchronous (callers run it via ``asyncio.to_thread``),
carries ``_request_timeout`` from the settings and is tried once: the caller retries on its next cycle.

Pod cache: a cheap periodic LIST (``spec.nodeName=<node>``, paginated) at most every ``resync_interval``, driven
by the daemon through ``PodCache.refresh_if_due`` each decide cycle. A list, not a watch: one node's pods are few,
a list has no resourceVersion bookkeeping or reconnect logic, and a failed list simply keeps the last good data
(marked not ``up``, with its age) until the next one succeeds.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from reclaimer.core import actionkinds
from reclaimer.core.actionkinds import KUBEFLOW_STOP_ANNOTATION
from reclaimer.core.config import KubernetesSettings
from reclaimer.core.errors import ReclaimerError
from reclaimer.core.kernelids import is_kernel_id
from reclaimer.core.model import OwnerRef, PodInfo
from reclaimer.core.redact import redact_text
from reclaimer.core.results import (
    ALREADY_GONE,
    BLOCKED_PDB,
    CONFLICT,
    DONE,
    FAILED,
    FORBIDDEN,
    RETRY_AFTER,
    SUCCESS,
    AdapterOutcome,
)

if TYPE_CHECKING:
    import urllib3

log = structlog.get_logger(__name__)

REPORTING_CONTROLLER = "reclaimer.io/gpu-reclaimer"
NOTEBOOK_GROUP, NOTEBOOK_VERSION, NOTEBOOK_PLURAL = "kubeflow.org", "v1", "notebooks"  # Kubeflow's Notebook CRD
EVENT_ACTIONS = frozenset({*actionkinds.EVENT_ACTIONS.values(), "Warn"})
EVENT_REASONS = frozenset(
    {
        "GPUIdle",
        "GPUIdleWarning",
        "EvictionBlockedByPDB",
        *(s.failure_event for s in actionkinds.KINDS.values() if s.failure_event),
    }
)
EVENT_TYPES = frozenset({"Normal", "Warning"})

_NOTE_MAX_BYTES = 1024  # events.k8s.io/v1 rejects a longer note
_FIELD_MAX = 128  # reportingInstance, action and reason limits in events.k8s.io/v1
_DETAIL_MAX = 300
_RUNTIME_PREFIX = re.compile(r"^[a-z0-9.+-]+://", re.I)


class KubeError(ReclaimerError):
    """A Kubernetes API request failed; the message is one line naming the call and the cause."""


class KubeUnavailable(KubeError):
    """No usable cluster configuration (no in-cluster service account, no kubeconfig): run without Kubernetes."""


@dataclass(frozen=True, slots=True)
class EvictionResult:
    """AdapterOutcome of one eviction request. ``result`` is one of ``reclaimer.core.results.EVICTION_RESULTS``."""

    result: str
    detail: str = ""
    retry_after: float | None = None  # seconds the API server asked us to wait (Retry-After / retryAfterSeconds)


# --------------------------------------------------------------------------- pure mapping helpers


def strip_runtime_prefix(container_id: str) -> str:
    """``containerd://abc`` / ``cri-o://abc`` / ``docker://abc`` -> ``abc`` (bare ids pass through)."""
    return _RUNTIME_PREFIX.sub("", container_id.strip())


def pod_info_from_json(obj: Mapping[str, Any], user_label: str) -> PodInfo:
    """Map one pod as the API returns it (JSON, camelCase) to ``PodInfo``; ``ValueError`` names what is missing.

    The user comes from ``user_label`` as an annotation (KubeSpawner keeps the unescaped name there) or else a label.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"pod is not an object: {type(obj).__name__}")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    uid, namespace, name = meta.get("uid"), meta.get("namespace"), meta.get("name")
    missing = [
        k for k, v in (("metadata.uid", uid), ("metadata.namespace", namespace), ("metadata.name", name)) if not v
    ]
    if missing:
        raise ValueError(f"pod {namespace or '?'}/{name or '?'} lacks {', '.join(missing)}")
    labels = _str_map(meta.get("labels"))
    annotations = _str_map(meta.get("annotations"))
    owners, owners_known = _owners(meta.get("ownerReferences"))
    owner = owners[0] if owners else None
    first = owner if owner is None or owner.controller else next((o for o in owners if o.controller), owner)
    container_ids: list[str] = []
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            cid = cs.get("containerID") if isinstance(cs, Mapping) else None
            if cid:  # a waiting container has no id yet
                bare = strip_runtime_prefix(str(cid))
                if bare and bare not in container_ids:
                    container_ids.append(bare)
    ports: list[tuple[str, int]] = []
    for container in spec.get("containers") or ():
        for port in (container.get("ports") or ()) if isinstance(container, Mapping) else ():
            if isinstance(port, Mapping) and type(port.get("containerPort")) is int and port.get("name"):
                ports.append((str(port["name"]), port["containerPort"]))
    pod_ip = status.get("podIP")
    return PodInfo(
        started_at=_timestamp(status.get("startTime")),
        deleting=meta.get("deletionTimestamp") is not None,
        containers_running=_containers_running(status.get("containerStatuses")),
        uid=str(uid),
        namespace=str(namespace),
        name=str(name),
        node_name=spec.get("nodeName"),
        labels=labels,
        annotations=annotations,
        owner_kind=first.kind if first else None,
        owner_name=first.name if first else None,
        user=annotations.get(user_label) or labels.get(user_label) or None,
        phase=status.get("phase"),
        container_ids=tuple(container_ids),
        owners=owners,
        owners_known=owners_known,
        ip=pod_ip if isinstance(pod_ip, str) and pod_ip else None,
        ports=tuple(ports),
    )


def _owners(raw: Any) -> tuple[tuple[OwnerRef, ...], bool]:
    """(owner references, whether they could all be read). A reference without kind and name, or whose
    ``controller`` is not a boolean, makes the pod's controller unknown: nothing that depends on it may act."""
    if raw is None:
        return (), True
    if not isinstance(raw, list):
        return (), False
    owners: list[OwnerRef] = []
    known = True
    for ref in raw:
        if not isinstance(ref, Mapping) or not ref.get("kind") or not ref.get("name"):
            known = False
            continue
        controller = ref.get("controller", False)
        if controller is None:
            controller = False
        if not isinstance(controller, bool):
            known = False
            controller = True  # fail closed: a controller we cannot rule out
        owners.append(OwnerRef(str(ref["kind"]), str(ref["name"]), str(ref.get("apiVersion") or ""), controller))
    return tuple(owners), known


def _timestamp(value: Any) -> float | None:
    """An RFC 3339 API timestamp (``2026-01-02T03:04:05Z``) as POSIX seconds; None when absent or unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def _containers_running(statuses: Any) -> bool | None:
    """Whether every (non-init) container is running and not marked ``started: false``; None when not reported."""
    if not isinstance(statuses, list):
        return None
    if not statuses:
        return False
    for cs in statuses:
        state = cs.get("state") if isinstance(cs, Mapping) else None
        if not isinstance(state, Mapping) or "running" not in state or cs.get("started") is False:
            return False
    return True


def _page_parts(page: Any) -> tuple[list[Any] | None, str | None]:
    """(items, continue token) of a PodList page; items None when the page is not a PodList."""
    if not isinstance(page, Mapping):
        return None, None
    items = page.get("items")
    meta = page.get("metadata")
    if items is None:
        items = []  # an empty list may be serialized as null
    if not isinstance(items, list) or not isinstance(meta or {}, Mapping):
        return None, None
    return items, (meta or {}).get("continue") or None


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def scrub_note(note: str) -> str:
    """An Event note safe to publish: token-like values redacted, cut to 1 KiB of UTF-8 on a character boundary."""
    note = redact_text(note)
    data = note.encode("utf-8")
    if len(data) <= _NOTE_MAX_BYTES:
        return note
    return data[: _NOTE_MAX_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def _micro_time(t: datetime) -> datetime:
    # MicroTime must carry six fraction digits; isoformat() drops the fraction when it is zero.
    return t.replace(microsecond=1) if t.microsecond == 0 else t


def _event_name(pod_name: str) -> str:
    """``<pod>.<hex nanoseconds>`` like client-go's recorder, kept within a 253-character DNS subdomain."""
    suffix = f".{time.time_ns():x}"
    return pod_name[: 253 - len(suffix)].rstrip("-.") + suffix


def _retry_after_seconds(headers: Mapping[str, str] | None, status: Mapping[str, Any], now: float) -> float | None:
    """Seconds from a Retry-After header (delta or HTTP date), else the Status body's details.retryAfterSeconds."""
    raw = (headers or {}).get("Retry-After")
    if raw:
        raw = raw.strip()
        try:
            seconds = float(raw)
            if math.isfinite(seconds):
                return max(0.0, seconds)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(raw)
            return max(0.0, when.timestamp() - now)
        except (TypeError, ValueError):
            log.warning("unparsable Retry-After header", value=raw[:64])
    details = status.get("details") if isinstance(status.get("details"), Mapping) else {}
    secs = details.get("retryAfterSeconds") if details else None
    return float(secs) if isinstance(secs, (int, float)) and not isinstance(secs, bool) and secs > 0 else None


def _status_body(exc: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _is_pdb_block(status: Mapping[str, Any]) -> bool:
    details = status.get("details") if isinstance(status.get("details"), Mapping) else {}
    causes = (details.get("causes") or []) if details else []
    if any(isinstance(c, Mapping) and c.get("reason") == "DisruptionBudget" for c in causes):
        return True
    return "disruption budget" in str(status.get("message", "")).lower()


def raw_response(resp: object) -> urllib3.BaseHTTPResponse:
    """The undecoded answer of a client call made with ``_preload_content=False`` (the generated client's annotations
    name the decoded model it returns otherwise)."""
    return cast("urllib3.BaseHTTPResponse", resp)


def describe_error(exc: BaseException) -> str:
    """One line for logs and results: HTTP status and the API's own message, or the transport error; no headers."""
    if isinstance(exc, ApiException):
        status = _status_body(exc)
        message = status.get("message") or (exc.body or "")  # a non-Status body (proxy HTML) is cut below
        text = f"HTTP {exc.status} {exc.reason or ''}".rstrip()
        return _cut(f"{text}: {message}" if message else text)
    return _cut(f"{type(exc).__name__}: {exc}")


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


# --------------------------------------------------------------------------- the client


def _prepare(configuration: k8s.Configuration) -> k8s.Configuration:
    # One try per call: urllib3 would otherwise retry connection errors three times, tripling the timeout.
    configuration.retries = False
    return configuration


def _load_configuration(k: KubernetesSettings) -> k8s.Configuration:
    """Explicit kubeconfig, else in-cluster (KUBERNETES_SERVICE_HOST set), else $KUBECONFIG / ~/.kube/config."""
    cfg = k8s.Configuration()
    in_cluster = not k.kubeconfig and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    path = k.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    source = "in-cluster service account" if in_cluster else f"kubeconfig {path}"
    try:
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:  # persist_config=False: a token refresh must never rewrite the operator's kubeconfig
            k8s_config.load_kube_config(
                config_file=os.path.expanduser(path), client_configuration=cfg, persist_config=False
            )
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        raise KubeUnavailable(f"no usable Kubernetes configuration ({source}): {_cut(str(exc))}") from None
    return cfg


class KubeClient:
    """The Kubernetes calls the daemon makes. Construct with ``from_settings`` (real cluster) or
    ``for_configuration`` / an injected ``ApiClient`` (tests)."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        settings: KubernetesSettings | None = None,
        *,
        node_name: str | None = None,
        page_size: int = 500,
    ) -> None:
        self.settings = settings or KubernetesSettings()
        self.node_name = node_name or os.environ.get("NODE_NAME") or socket.gethostname()
        self.page_size = page_size
        self._api = api_client
        self._core = k8s.CoreV1Api(api_client)
        self._events = k8s.EventsV1Api(api_client)
        self._custom = k8s.CustomObjectsApi(api_client)
        self._log = log.bind(node=self.node_name)
        # Why the API server refused our credential even after re-reading it (None: not refused). The daemon halts
        # every action while it is set (docs/tokens.md, Rotation).
        self.rejected: str | None = None
        self._reload: Callable[[], bool] | None = None
        self._guard_credentials()

    @classmethod
    def from_settings(cls, k: KubernetesSettings, *, node_name: str | None = None) -> KubeClient:
        """A client for the configured cluster; ``KubeUnavailable`` when no configuration can be loaded."""
        if k.enabled is False:
            raise KubeUnavailable("kubernetes.enabled is false")
        cfg = _prepare(_load_configuration(k))
        client = cls(k8s.ApiClient(cfg), k, node_name=node_name)

        def reload() -> bool:
            """Read the credential again (the service-account token or the kubeconfig); True when it changed."""
            try:
                fresh = _load_configuration(k)
            except KubeUnavailable as exc:
                log.warning("kubernetes credential could not be read again", error=str(exc))
                return False
            changed = fresh.api_key != cfg.api_key
            cfg.api_key = fresh.api_key
            cfg.api_key_prefix = fresh.api_key_prefix
            # The loaders install a hook that refreshes the key from their own copy of the credential: take the new one.
            cfg.refresh_api_key_hook = getattr(fresh, "refresh_api_key_hook", None)
            return bool(changed)

        client._reload = reload
        return client

    def _guard_credentials(self) -> None:
        """Every API call: a 401 re-reads the credential once (the next call uses it if it changed); a 401 that
        re-reading does not answer sets ``rejected``; any call that succeeds clears it."""
        # kubernetes-client >= 32 raises for an HTTP error in _call_with_legacy_options, older ones in call_api.
        name = "_call_with_legacy_options" if hasattr(self._api, "_call_with_legacy_options") else "call_api"
        call = getattr(self._api, name)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                result = call(*args, **kwargs)
            except ApiException as exc:
                if exc.status == 401 and (self._reload is None or not self._reload()):
                    self._refused()
                raise
            if self.rejected is not None:
                self._log.info("kubernetes credential accepted again")
            self.rejected = None
            return result

        setattr(self._api, name, guarded)

    def _refused(self) -> None:
        reason = "the API server refused the service-account credential (HTTP 401) and re-reading it did not help"
        if self.rejected is None:
            self._log.error(
                "credential refused; actions halted until it is accepted", owner="kubernetes", reason=reason
            )
        self.rejected = reason

    @classmethod
    def for_configuration(
        cls, configuration: k8s.Configuration, settings: KubernetesSettings | None = None, **kwargs: Any
    ) -> KubeClient:
        """A client for an explicit ``Configuration`` (e.g. ``host=http://127.0.0.1:PORT`` in tests)."""
        return cls(k8s.ApiClient(_prepare(configuration)), settings, **kwargs)

    def __repr__(self) -> str:  # the configuration holds a bearer token: show the host only
        return f"KubeClient(host={self._api.configuration.host!r}, node={self.node_name!r})"

    def close(self) -> None:
        self._api.close()

    @property
    def _timeout(self) -> float:
        return float(self.settings.timeout)

    # ------------------------------------------------------------------ pods

    def list_pods_on_node(self, node_name: str | None = None) -> list[PodInfo]:
        """Every pod bound to ``node_name`` (default: this client's node), all pages; ``KubeError`` on failure.

        A pod the API returns malformed is skipped with a log line naming it.
        """
        node = node_name or self.node_name
        selector = f"spec.nodeName={node}"
        pods: list[PodInfo] = []
        token: str | None = None
        seen_tokens: set[str] = set()
        while True:
            try:
                resp = self._core.list_pod_for_all_namespaces(
                    field_selector=selector,
                    limit=self.page_size,
                    _continue=token,
                    _request_timeout=self._timeout,
                    _preload_content=False,
                )
                page = json.loads(raw_response(resp).data)
            except Exception as exc:  # ApiException, urllib3 transport errors, a body that is not JSON
                raise KubeError(f"listing pods on node {node}: {describe_error(exc)}") from None
            items, token = _page_parts(page)
            if items is None:
                raise KubeError(f"listing pods on node {node}: the answer is not a PodList")
            pods.extend(self._map_pods(items, node))
            if token is None:
                return pods
            if token in seen_tokens:
                raise KubeError(f"listing pods on node {node}: the API server repeated a continue token")
            seen_tokens.add(token)

    def _map_pods(self, items: Iterable[Any], node: str) -> list[PodInfo]:
        out: list[PodInfo] = []
        for item in items:
            try:
                pod = pod_info_from_json(item, self.settings.user_label)
            except (ValueError, AttributeError, TypeError) as exc:
                self._log.warning("skipping malformed pod", error=str(exc))
                continue
            if pod.node_name != node:  # identity binds the node, whatever the server did with the selector
                self._log.warning(
                    "skipping pod on another node", namespace=pod.namespace, pod=pod.name, pod_node=pod.node_name
                )
                continue
            out.append(pod)
        return out

    def get_pod(self, namespace: str, name: str) -> PodInfo | None:
        """The pod as it is now (``None`` when it is gone); ``KubeError`` on any other failure."""
        try:
            resp = self._core.read_namespaced_pod(
                name, namespace, _request_timeout=self._timeout, _preload_content=False
            )
            return pod_info_from_json(json.loads(raw_response(resp).data), self.settings.user_label)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeError(f"reading pod {namespace}/{name}: {describe_error(exc)}") from None
        except Exception as exc:
            raise KubeError(f"reading pod {namespace}/{name}: {describe_error(exc)}") from None

    # ------------------------------------------------------------------ eviction

    def evict(self, namespace: str, name: str, uid: str, dry_run: bool = False) -> EvictionResult:
        """Ask the API server to evict the pod through policy/v1 Eviction, bound to ``uid``; never raises.

        Never sets gracePeriodSeconds, never retries, never falls back to DELETE. ``dry_run`` is the
        server-side dry run (``dryRun=All``): validated and admitted, not persisted.
        """
        elog = self._log.bind(namespace=namespace, pod=name, pod_uid=uid, dry_run=dry_run)
        if not uid:
            elog.error("refusing to evict a pod without its uid")
            return EvictionResult(FAILED, "refusing to evict without the pod uid (identity must bind)")
        body = k8s.V1Eviction(
            api_version="policy/v1",
            kind="Eviction",
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
            delete_options=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid=uid)),
        )
        try:
            resp = self._core.create_namespaced_pod_eviction(
                name,
                namespace,
                body,
                dry_run="All" if dry_run else None,
                _request_timeout=self._timeout,
                _preload_content=False,
            )
            raw_response(resp).read()
            result = EvictionResult(SUCCESS, f"evicted {namespace}/{name}" + (" (server dry-run)" if dry_run else ""))
        except ApiException as exc:
            result = self._eviction_failure(exc)
        except Exception as exc:  # transport error or timeout: unknown whether it landed; next cycle asks again
            result = EvictionResult(FAILED, describe_error(exc))
        level = "info" if result.result in DONE else "warning"
        getattr(elog, level)("eviction", result=result.result, detail=result.detail, retry_after=result.retry_after)
        return result

    @staticmethod
    def _eviction_failure(exc: ApiException) -> EvictionResult:
        status = _status_body(exc)
        detail = describe_error(exc)
        code = exc.status
        if code == 404:
            return EvictionResult(ALREADY_GONE, detail)
        if code == 429:
            retry = _retry_after_seconds(exc.headers, status, time.time())
            if _is_pdb_block(status):
                return EvictionResult(BLOCKED_PDB, _cut(_pdb_detail(status) or detail), retry)
            return EvictionResult(RETRY_AFTER, detail, retry)
        if code == 403:
            return EvictionResult(FORBIDDEN, detail)
        if code == 409:
            return EvictionResult(CONFLICT, detail)
        return EvictionResult(FAILED, detail)  # 500 (several PDBs) and anything unexpected

    # ------------------------------------------------------------------ Kubeflow notebooks

    def stop_notebook(self, namespace: str, name: str, now: float | None = None) -> AdapterOutcome:
        """Stop a Kubeflow Notebook as Kubeflow's culler does: the ``kubeflow-resource-stopped`` annotation (RFC 3339
        UTC time) by a merge patch; the notebook-controller then scales it to 0. Never raises.

        ("success" | "already-gone" | "failed", detail): a Notebook that is gone or already carries the annotation is
        "already-gone" (nothing patched twice); RBAC: ``kubeflow.org notebooks get, patch`` (enforce overlay).
        """
        what = f"Notebook {namespace}/{name}"
        try:
            notebook = self._custom.get_namespaced_custom_object(
                NOTEBOOK_GROUP, NOTEBOOK_VERSION, namespace, NOTEBOOK_PLURAL, name, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return ALREADY_GONE, f"{what} no longer exists"
            return FAILED, f"reading {what}: {describe_error(exc)}"
        except Exception as exc:
            return FAILED, f"reading {what}: {describe_error(exc)}"
        meta = notebook.get("metadata") if isinstance(notebook, Mapping) else None
        annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
        if isinstance(annotations, Mapping) and KUBEFLOW_STOP_ANNOTATION in annotations:
            return (
                ALREADY_GONE,
                f"{what} is already stopped ({KUBEFLOW_STOP_ANNOTATION}="
                f"{str(annotations[KUBEFLOW_STOP_ANNOTATION])[:40]})",
            )
        value = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"metadata": {"annotations": {KUBEFLOW_STOP_ANNOTATION: value}}}
        try:
            self._custom.patch_namespaced_custom_object(
                NOTEBOOK_GROUP, NOTEBOOK_VERSION, namespace, NOTEBOOK_PLURAL, name, body, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return ALREADY_GONE, f"{what} no longer exists"
            return FAILED, f"stopping {what}: {describe_error(exc)}"
        except Exception as exc:
            return FAILED, f"stopping {what}: {describe_error(exc)}"
        self._log.info("notebook stopped", namespace=namespace, notebook=name, annotation=value)
        return SUCCESS, f"{what} stopped ({KUBEFLOW_STOP_ANNOTATION}={value}); its controller scales it to 0"

    # ------------------------------------------------------------------ events

    def create_event(self, pod: PodInfo, *, reason: str, action: str, note: str, type: str = "Normal") -> bool:
        """Create an events.k8s.io/v1 Event about ``pod``; False (logged) on any failure, never raises."""
        elog = self._log.bind(namespace=pod.namespace, pod=pod.name, reason=reason, action=action)
        problem = _event_problem(reason, action, type)
        if problem:
            elog.error("event not sent: invalid event", problem=problem)
            return False
        now = _micro_time(datetime.now(timezone.utc))
        body = k8s.EventsV1Event(
            api_version="events.k8s.io/v1",
            kind="Event",
            metadata=k8s.V1ObjectMeta(name=_event_name(pod.name), namespace=pod.namespace),
            event_time=now,
            reporting_controller=REPORTING_CONTROLLER,
            reporting_instance=f"{REPORTING_CONTROLLER}-{self.node_name}"[:_FIELD_MAX],
            action=action,
            reason=reason,
            note=scrub_note(note),
            type=type,
            regarding=k8s.V1ObjectReference(
                api_version="v1", kind="Pod", uid=pod.uid, name=pod.name, namespace=pod.namespace
            ),
        )
        try:
            resp = self._events.create_namespaced_event(
                pod.namespace, body, _request_timeout=self._timeout, _preload_content=False
            )
            raw_response(resp).read()
        except Exception as exc:  # an Event failure must never change an action's outcome
            elog.warning("event not created", error=describe_error(exc))
            return False
        elog.info("event created", type=type)
        return True


def _event_problem(reason: str, action: str, type: str) -> str | None:
    if reason not in EVENT_REASONS:
        return f"unknown reason {reason!r} (expected one of {sorted(EVENT_REASONS)})"
    if action not in EVENT_ACTIONS:
        return f"unknown action {action!r} (expected one of {sorted(EVENT_ACTIONS)})"
    if type not in EVENT_TYPES:
        return f"unknown type {type!r} (expected Normal or Warning)"
    return None


def _pdb_detail(status: Mapping[str, Any]) -> str:
    details = status.get("details") if isinstance(status.get("details"), Mapping) else {}
    causes = [c for c in ((details.get("causes") or []) if details else []) if isinstance(c, Mapping)]
    messages = [str(c.get("message")) for c in causes if c.get("reason") == "DisruptionBudget" and c.get("message")]
    return "; ".join(messages) or str(status.get("message") or "")


# --------------------------------------------------------------------------- the pod cache


class PodLister(Protocol):
    def list_pods_on_node(self, node_name: str | None = None) -> list[PodInfo]: ...


@dataclass(frozen=True, slots=True)
class _PodIndex:
    by_uid: Mapping[str, PodInfo] = field(default_factory=dict)
    by_container: Mapping[str, PodInfo] = field(default_factory=dict)
    kernel_ids: Mapping[str, str] = field(default_factory=dict)


class PodCache:
    """This node's pods, refreshed by a periodic list; readers never block on I/O.

    A failed refresh keeps the last good data; ``up`` turns False and ``age_seconds`` keeps growing.
    """

    def __init__(
        self,
        client: PodLister,
        node_name: str,
        settings: KubernetesSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.settings = settings or KubernetesSettings()
        self.clock = clock
        self.last_attempt_at: float | None = None
        self.last_success_at: float | None = None
        self.last_error: str | None = None
        self.up = False  # True while the latest refresh succeeded
        self._index = _PodIndex()
        self._refresh_lock = threading.Lock()  # one list at a time when a slow refresh overlaps the next cycle
        self._bad_kernel_labels: set[str] = set()

    def refresh(self) -> bool:
        """List the node's pods now and swap them in; False (last data kept, ``up`` False) on failure."""
        with self._refresh_lock:
            self.last_attempt_at = self.clock()
            try:
                pods = self.client.list_pods_on_node(self.node_name)
            except Exception as exc:
                self.up = False
                self.last_error = str(exc) if isinstance(exc, ReclaimerError) else describe_error(exc)
                log.warning(
                    "pod list failed; keeping last known pods",
                    node=self.node_name,
                    error=self.last_error,
                    age_seconds=self.age_seconds(),
                )
                return False
            self._index = self._build(pods)
            self.last_success_at = self.clock()
            self.last_error = None
            self.up = True
            return True

    def refresh_if_due(self, now: float | None = None) -> bool:
        """Refresh when ``resync_interval`` has passed since the last attempt; returns ``up``."""
        now = self.clock() if now is None else now
        if self.last_attempt_at is None or now - self.last_attempt_at >= self.settings.resync_interval:
            return self.refresh()
        return self.up

    def age_seconds(self, now: float | None = None) -> float | None:
        """Seconds since the last successful refresh; None before the first one."""
        if self.last_success_at is None:
            return None
        return max(0.0, (self.clock() if now is None else now) - self.last_success_at)

    def _build(self, pods: Iterable[PodInfo]) -> _PodIndex:
        by_uid: dict[str, PodInfo] = {}
        by_container: dict[str, PodInfo] = {}
        kernel_ids: dict[str, str] = {}
        label = self.settings.kernel_id_label
        for pod in pods:
            by_uid[pod.uid] = pod
            for cid in pod.container_ids:
                by_container[cid] = pod
            kid = pod.labels.get(label)
            if kid is None:
                continue
            if is_kernel_id(kid):
                kernel_ids[pod.uid] = kid
            elif pod.uid not in self._bad_kernel_labels:
                self._bad_kernel_labels.add(pod.uid)
                log.warning(
                    "ignoring non-UUID kernel id label",
                    namespace=pod.namespace,
                    pod=pod.name,
                    label=label,
                    value=kid[:64],
                )
        self._bad_kernel_labels &= by_uid.keys()  # warned once per live pod; bounded by the pods on this node
        return _PodIndex(by_uid, by_container, kernel_ids)

    def pods(self) -> tuple[PodInfo, ...]:
        return tuple(self._index.by_uid.values())

    def by_uid(self, uid: str) -> PodInfo | None:
        return self._index.by_uid.get(uid)

    def by_container_id(self, container_id: str) -> PodInfo | None:
        """The pod running that container (prefixed or bare id)."""
        return self._index.by_container.get(strip_runtime_prefix(container_id))

    def kernel_ids(self) -> dict[str, str]:
        """pod uid -> kernel id from the ``kernel_id_label`` (canonical UUIDs only)."""
        return dict(self._index.kernel_ids)

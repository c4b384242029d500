"""Kubeflow notebooks: the notebook server of a Notebook's pod, asked for its kernels; the stop annotation.

A notebook pod is a StatefulSet pod labelled ``notebook-name`` (reclaimer.core.actionkinds.kubeflow_notebook). Its
server is reached at a URL built from the configured template (``kubeflow.notebook_url``, by default
``http://{name}.{namespace}.svc/notebook/{namespace}/{name}`` as Kubeflow's own culler does) and only for a name and
namespace that are valid DNS labels: never a URL read from the pod. Same request safety as every gateway
(reclaimer.observe.jupyter_rest.RestEndpoint): header token only, no redirects, capped bodies, timeouts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable

from reclaimer.core.config import KubeflowSettings
from reclaimer.core.kernelids import is_kernel_id
from reclaimer.core.keys import KUBEFLOW_CREDENTIAL
from reclaimer.core.model import NotebookRef
from reclaimer.core.results import ALREADY_GONE, FAILED, SUCCESS, AdapterOutcome
from reclaimer.core.sources import KUBEFLOW_GATEWAY
from reclaimer.observe.jupyter_rest import (
    ERROR_BODY_LIMIT,
    LIST_BODY_LIMIT,
    SHUTDOWN_TIMEOUT_FACTOR,
    BadAnswer,
    RestEndpoint,
    SessionFactory,
    answer_clock_skew,
    parse_kernel_listing,
    tls_context,
)
from reclaimer.observe.tokens import TokenSource

MAX_NOTEBOOK_CLIENTS = 256  # notebook servers remembered between cycles (one per notebook pod on the node)
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")


def is_dns_label(value: object) -> bool:
    """RFC 1123 label: what a Kubernetes namespace and a Service name (the Notebook's name) must be."""
    return isinstance(value, str) and _DNS_LABEL.fullmatch(value) is not None


def notebook_url(template: str, namespace: str, name: str) -> str | None:
    """The notebook server's base URL from the template; None unless both are valid DNS labels."""
    if not (is_dns_label(namespace) and is_dns_label(name)):
        return None
    return template.replace("{namespace}", namespace).replace("{name}", name).rstrip("/")


class NotebookServers:
    """Lists the kernels of Kubeflow notebook servers. Never raises for a server's failure: the ref says unknown."""

    def __init__(
        self,
        settings: KubeflowSettings,
        session_factory: SessionFactory | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        # Re-read when its file changes, one re-read after a refusal (issue 10 item 6), like the gateways' tokens.
        self.credential = TokenSource.from_settings(settings.token_env, settings.token_file, KUBEFLOW_CREDENTIAL)
        self._session_factory = session_factory
        self._clock = clock
        self._endpoints: dict[tuple[str, str], RestEndpoint] = {}

    def __repr__(self) -> str:
        return f"NotebookServers(template={self.settings.notebook_url!r})"

    def _endpoint(self, namespace: str, name: str, url: str) -> RestEndpoint:
        key = (namespace, name)
        if key not in self._endpoints:
            self._endpoints[key] = RestEndpoint(
                f"notebook {namespace}/{name}",
                url,
                self.credential,
                timeout=self.settings.timeout,
                tls=tls_context(url, None, True, KUBEFLOW_CREDENTIAL),
                session_factory=self._session_factory,
                untracked=True,  # watching is not using: Kubeflow's own culler reads the same activity
            )
        return self._endpoints[key]

    async def kernels(self, namespace: str, name: str) -> NotebookRef:
        """``GET <notebook url>/api/kernels``: every kernel of the notebook server, or None with the error."""
        url = notebook_url(self.settings.notebook_url, namespace, name)
        if url is None:
            return NotebookRef(namespace, name, None, "notebook name or namespace is not a DNS label; not contacted")
        answer = await self._endpoint(namespace, name, url).request("GET", "/api/kernels", limit=LIST_BODY_LIMIT)
        now = self._clock()
        if answer.error is not None:
            return NotebookRef(namespace, name, None, f"notebook server: {answer.error}", now)
        try:
            kernels = parse_kernel_listing(answer.body, KUBEFLOW_GATEWAY, now, answer_clock_skew(answer, now))
        except BadAnswer as exc:
            return NotebookRef(namespace, name, None, f"notebook server: {exc}", now)
        return NotebookRef(namespace, name, tuple(kernels), None, now)

    async def shutdown_kernel(self, namespace: str, name: str, kernel_id: str) -> AdapterOutcome:
        """``DELETE <notebook url>/api/kernels/{id}`` for a kernel seen only through its notebook server."""
        url = notebook_url(self.settings.notebook_url, namespace, name)
        if url is None or not is_kernel_id(kernel_id):
            return FAILED, "not a DNS-label notebook or not a canonical kernel id; no request made"
        answer = await self._endpoint(namespace, name, url).request(
            "DELETE",
            "/api/kernels/" + kernel_id,
            limit=ERROR_BODY_LIMIT,
            timeout=self.settings.timeout * SHUTDOWN_TIMEOUT_FACTOR,
        )
        if answer.status in (200, 202, 204):
            return SUCCESS, f"kernel shut down in notebook {namespace}/{name}"
        if answer.status == 404:
            return ALREADY_GONE, f"notebook {namespace}/{name} no longer has the kernel"
        return FAILED, f"notebook {namespace}/{name}: {answer.error or f'unexpected HTTP {answer.status}'}"

    async def prune(self, live: Iterable[tuple[str, str]]) -> None:
        """Forget the servers of notebooks no longer on this node (and close their sessions)."""
        keep = set(live)
        gone = [k for k in self._endpoints if k not in keep]
        if len(self._endpoints) - len(gone) > MAX_NOTEBOOK_CLIENTS:
            gone += [k for k in list(self._endpoints)[: len(self._endpoints) - MAX_NOTEBOOK_CLIENTS] if k not in gone]
        await asyncio.gather(*(self._endpoints.pop(k).close() for k in gone), return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self._endpoints.values()), return_exceptions=True)
        self._endpoints.clear()

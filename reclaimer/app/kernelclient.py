"""A minimal Jupyter client over a gateway's REST + websocket API, for the demo and the end-to-end tests.

Starting a kernel over REST leaves it `starting` until a client talks to it; ``execute`` runs code the way a
notebook would, so the kernel's state and last_activity change for real.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timezone
from typing import Any

import aiohttp

READY_RETRY = 3.0  # seconds between kernel_info_requests while the channel is not known live


class KernelClientError(Exception):
    pass


class ChannelClosed(KernelClientError):
    """The kernel's websocket closed before any answer to our request: nothing was seen running (a fresh kernel whose
    server dropped the channel while it was still starting)."""


def _msg(msg_type: str, content: dict[str, Any], session: str, channel: str = "shell") -> dict[str, Any]:
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "username": "reclaimer-demo",
            "session": session,
            "msg_type": msg_type,
            "version": "5.3",
            "date": datetime.now(timezone.utc).isoformat(),
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


class GatewayRest:
    """Start, list and stop kernels on one gateway (token in the Authorization header)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0):
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"token {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession(timeout=self.timeout, headers=self.headers) as s,
            s.request(method, self.base + path, json=body) as r,
        ):
            if r.status >= 400:
                raise KernelClientError(f"{method} {path}: HTTP {r.status}: {(await r.text())[:200]}")
            if r.status == 204:
                return None
            return await r.json(content_type=None)

    async def start_kernel(self, name: str = "python3", env: dict[str, str] | None = None) -> str:
        """``env``: the start request's kernel environment (Enterprise Gateway wants ``KERNEL_USERNAME``)."""
        body = await self._request("POST", "/api/kernels", {"name": name, **({"env": env} if env else {})})
        return str(body["id"])

    async def kernel(self, kernel_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/api/kernels/{kernel_id}")

    async def shutdown(self, kernel_id: str) -> None:
        try:
            await self._request("DELETE", f"/api/kernels/{kernel_id}")
        except KernelClientError as exc:
            if "HTTP 404" not in str(exc):
                raise

    async def interrupt(self, kernel_id: str) -> None:
        await self._request("POST", f"/api/kernels/{kernel_id}/interrupt")

    async def execute(
        self, kernel_id: str, code: str, *, wait: bool = True, silent: bool = False, timeout: float = 60.0
    ) -> str:
        """Run ``code``; return its stdout when ``wait`` (else return once the kernel has accepted it: busy)."""
        ws_url = self.base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        session_id = uuid.uuid4().hex
        req = _msg(
            "execute_request",
            {
                "code": code,
                "silent": silent,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
            session_id,
        )
        msg_id = req["header"]["msg_id"]
        out: list[str] = []
        asked: set[str] = set()

        async def ask_ready(ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
            info = _msg("kernel_info_request", {}, session_id)
            asked.add(info["header"]["msg_id"])
            await ws.send_str(json.dumps(info))

        async def converse(ws: aiohttp.ClientWebSocketResponse[bool]) -> str:
            # First a kernel_info_request, asked again every READY_RETRY seconds until an IOPub status answers one:
            # only then is the server's IOPub subscription for this channel known to be live. Code sent earlier can
            # lose its output to ZMQ's slow joiner and leave this call waiting for an answer that went nowhere
            # (seen under load on a fresh kernel). kernel_info is idempotent; the code is sent once.
            ready = False
            await ask_ready(ws)
            while True:
                try:
                    m = await ws.receive(timeout=None if ready else READY_RETRY)
                except (TimeoutError, asyncio.TimeoutError):
                    await ask_ready(ws)
                    continue
                if m.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
                if m.type != aiohttp.WSMsgType.TEXT:
                    continue
                msg = json.loads(m.data)
                parent = msg.get("parent_header", {}).get("msg_id")
                t = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
                if not ready:
                    if parent in asked and t == "status":
                        ready = True
                        await ws.send_str(json.dumps(req))
                    continue
                if parent != msg_id:
                    continue
                if t == "status" and msg["content"].get("execution_state") == "busy" and not wait:
                    return ""
                if t == "stream" and msg["content"].get("name") == "stdout":
                    out.append(msg["content"].get("text", ""))
                if t == "error":
                    raise KernelClientError(
                        f"kernel error: {msg['content'].get('ename')}: {msg['content'].get('evalue')}"
                    )
                if t == "status" and msg["content"].get("execution_state") == "idle":
                    return "".join(out)
            raise ChannelClosed("websocket closed before the kernel answered")

        async with (
            aiohttp.ClientSession(headers=self.headers) as s,
            s.ws_connect(ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws,
        ):
            try:
                return await asyncio.wait_for(converse(ws), timeout)
            except (TimeoutError, asyncio.TimeoutError):
                raise KernelClientError(f"kernel did not answer within {timeout:g}s") from None

    async def wait_state(self, kernel_id: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the kernel model until ``execution_state == state`` (deadline, not sleep-as-sync)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        model: dict[str, Any] = {}
        while loop.time() < deadline:
            model = await self.kernel(kernel_id)
            if model.get("execution_state") == state:
                return model
            await asyncio.sleep(0.1)
        raise KernelClientError(f"kernel {kernel_id} did not reach {state!r}; last: {model.get('execution_state')!r}")

    async def pid(self, kernel_id: str, attempts: int = 3) -> int:
        """The kernel's process id, as it reports it. Asking is idempotent, so a channel closed before any answer (a
        kernel still starting) is asked again, a few times."""
        code = "import os; print(os.getpid())"
        for attempt in range(1, attempts):
            try:
                return int((await self.execute(kernel_id, code)).strip())
            except ChannelClosed:
                await asyncio.sleep(0.5 * attempt)  # back-off between attempts, not synchronisation
        return int((await self.execute(kernel_id, code)).strip())

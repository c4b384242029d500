"""Real Jupyter servers for tests: Kernel Gateway, Jupyter Server and JupyterHub on 127.0.0.1, plus kernel helpers.

Each server runs as a subprocess in its own session (process group) with its own runtime dir; readiness is polled
until a deadline. Tokens travel in the environment, never on a command line. Helpers talk to kernels the way a
notebook does (REST + the websocket channels), so a kernel's state and last_activity change for real:

    gw = start_kernel_gateway(tmp, token, list_kernels=True)     # .url .token .stop()
    kid = await start_kernel(gw.url, gw.token)
    await wake_kernel(gw.url, gw.token, kid)                     # "starting" -> "idle"
    out = await run_code(gw.url, gw.token, kid, "print(1)")      # stdout
    await run_code(gw.url, gw.token, kid, "import time; time.sleep(30)", wait=False)   # busy now
    pid = await kernel_pid(gw.url, gw.token, kid)

Shared servers, as fixtures registered for every test module by tests/conftest.py (``pytest_plugins``; ask for them
by name, never import them: an imported fixture is a second, per-module definition that boots its own server):
``kernel_gateway`` (listing on, plus the demo's reserved kernelspec), ``kernel_gateway_unlisted`` (listing off: 403),
``jupyter_server``, ``jupyterhub``, ``enterprise_gateway`` (Enterprise Gateway 3.x from its own virtualenv, see
``enterprise_gateway_venv``; start its kernels with ``env=eg.extra["kernel_env"]``). Each server boots once per test
session; a module sees it without the kernels earlier modules left behind (they are shut down when a module that used
the server ends). A test that changes a server's configuration or kills it starts its own with ``start_*``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reclaimer.app.kernelclient import GatewayRest, KernelClientError

READY_TIMEOUT = 90.0  # generous: 2 loaded CI cores start a Jupyter server in a few seconds, rarely more


class JupyterTestError(RuntimeError):
    pass


BOOTS: dict[str, int] = {}  # server name -> how many this process started (reported at the end of a test run)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class JupyterProcess:
    """A server subprocess: ``url`` is its base URL, ``token`` the API token it accepts."""

    name: str
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the server shuts its kernels / servers down), then SIGKILL the whole process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("JUPYTER_TOKEN", "KG_AUTH_TOKEN", "JUPYTERHUB_API_TOKEN"):
        env.pop(key, None)
    env.update(
        JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
        JUPYTER_CONFIG_DIR=str(workdir / "config"),
        IPYTHONDIR=str(workdir / "ipython"),
        HOME=str(workdir / "home"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    for sub in ("runtime", "config", "ipython", "home"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    return env


def _die_with_parent() -> None:
    # A test run killed mid-way (timeout, ^C) must not leave servers behind: SIGTERM them when pytest dies.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(name: str, cmd: list[str], workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"{name}.log"
    BOOTS[name] = BOOTS.get(name, 0) + 1
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    return proc, log_path


def wait_http(handle: JupyterProcess, path: str, timeout: float = READY_TIMEOUT, headers: dict[str, str] | None = None,
              ok: tuple[int, ...] = (200,)) -> None:
    """Poll ``handle.url + path`` until it answers one of ``ok`` (deadline); fail early if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise JupyterTestError(f"{handle.name} exited ({handle.proc.returncode}):\n{handle.log_tail()}")
        request = urllib.request.Request(handle.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status in ok:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)  # polling interval, not synchronisation: the deadline decides
    handle.stop()
    raise JupyterTestError(f"{handle.name} not ready within {timeout:.0f}s ({last}):\n{handle.log_tail()}")


def start_kernel_gateway(workdir: Path, token: str, list_kernels: bool = True, timeout: float = READY_TIMEOUT,
                         env: dict[str, str] | None = None) -> JupyterProcess:
    """A real ``jupyter kernelgateway`` (websocket personality) on a free loopback port, token required; ``env`` adds
    variables (e.g. ``JUPYTER_PATH`` for extra kernelspecs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}",
           "--KernelGatewayApp.port_retries=0", f"--JupyterWebsocketPersonality.list_kernels={list_kernels}"]
    proc, log_path = _spawn("kernelgateway", cmd, workdir, _env(workdir, KG_AUTH_TOKEN=token, **(env or {})))
    handle = JupyterProcess("kernel gateway", f"http://127.0.0.1:{port}", token, proc, workdir, log_path)
    wait_http(handle, "/api", timeout, headers=auth(token))
    return handle


def start_jupyter_server(workdir: Path, token: str, timeout: float = READY_TIMEOUT,
                         env: dict[str, str] | None = None, base_url: str = "/") -> JupyterProcess:
    """A real ``jupyter server`` on a free loopback port, token required, root dir inside ``workdir``; ``env`` adds
    variables (e.g. ``JUPYTER_PATH`` for extra kernelspecs); ``base_url`` serves it under a path (``url`` includes it,
    e.g. ``/notebook/<namespace>/<name>/`` as a Kubeflow notebook server)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "notebooks").mkdir(exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={workdir / 'notebooks'}",
           f"--ServerApp.base_url={base_url}"]
    proc, log_path = _spawn("jupyter-server", cmd, workdir, _env(workdir, JUPYTER_TOKEN=token, **(env or {})))
    handle = JupyterProcess("jupyter server", f"http://127.0.0.1:{port}{base_url.rstrip('/')}", token, proc, workdir,
                            log_path, extra={"port": port})
    wait_http(handle, "/api/kernels", timeout, headers=auth(token))
    return handle


EG_REQUIREMENTS = Path(__file__).with_name("enterprise-gateway-requirements.txt")
EG_USER = "alice"  # Enterprise Gateway refuses kernels for root unless the start request names another user


def enterprise_gateway_venv() -> Path:
    """The virtualenv that runs Enterprise Gateway: $RECLAIMER_EG_VENV, else ~/.cache/reclaimer/eg-venv; created
    (pip, from tests/support/enterprise-gateway-requirements.txt) when missing. .ci/run creates it ahead of time."""
    venv = Path(os.environ.get("RECLAIMER_EG_VENV") or Path.home() / ".cache" / "reclaimer" / "eg-venv")
    if not (venv / "bin" / "jupyter-enterprisegateway").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(EG_REQUIREMENTS)],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise JupyterTestError(f"cannot install Enterprise Gateway into {venv}:\n{done.stderr[-2000:]}")
    return venv


def start_enterprise_gateway(workdir: Path, token: str, list_kernels: bool = False, cull_idle_timeout: int = 0,
                             timeout: float = READY_TIMEOUT) -> JupyterProcess:
    """A real Jupyter Enterprise Gateway (3.x, its own virtualenv) on a free loopback port, running local kernels.

    ``EG_AUTH_TOKEN`` is the token; listing kernels is refused (403) unless ``list_kernels`` (``EG_LIST_KERNELS``);
    ``cull_idle_timeout`` > 0 turns EG's own idle culler on (checked every second).
    """
    venv = enterprise_gateway_venv()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(venv / "bin" / "jupyter-enterprisegateway"), "--EnterpriseGatewayApp.ip=127.0.0.1",
           f"--EnterpriseGatewayApp.port={port}", "--EnterpriseGatewayApp.port_retries=0"]
    if cull_idle_timeout:
        cmd += [f"--RemoteMappingKernelManager.cull_idle_timeout={cull_idle_timeout}",
                "--RemoteMappingKernelManager.cull_interval=1"]
    env = _env(workdir, EG_AUTH_TOKEN=token, EG_LIST_KERNELS="true" if list_kernels else "false")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # kernels start with the venv's python
    proc, log_path = _spawn("enterprise-gateway", cmd, workdir, env)
    handle = JupyterProcess("enterprise gateway", f"http://127.0.0.1:{port}", token, proc, workdir, log_path,
                            extra={"kernel_env": {"KERNEL_USERNAME": EG_USER}})
    wait_http(handle, "/api", timeout, headers=auth(token))
    return handle


def start_jupyter_server_with_gateway(workdir: Path, token: str, gateway: JupyterProcess,
                                      timeout: float = READY_TIMEOUT) -> JupyterProcess:
    """A real ``jupyter server --gateway-url``: its kernels run on ``gateway``, and both answer for their ids."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "notebooks").mkdir(exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={workdir / 'notebooks'}",
           f"--gateway-url={gateway.url}"]
    env = _env(workdir, JUPYTER_TOKEN=token, JUPYTER_GATEWAY_AUTH_TOKEN=gateway.token,
               **gateway.extra.get("kernel_env", {}))  # KERNEL_* variables travel with each start request
    proc, log_path = _spawn("jupyter-server-gateway", cmd, workdir, env)
    handle = JupyterProcess("jupyter server (gateway)", f"http://127.0.0.1:{port}", token, proc, workdir, log_path)
    wait_http(handle, "/api/kernels", timeout, headers=auth(token), ok=(200, 403))
    return handle


_HUB_CONFIG = """\
import os
c = get_config()
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {proxy_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.should_start = True
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {home!r} + "/{{username}}"
c.Spawner.args = ["--allow-root"]
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.http_timeout = 60
c.Spawner.start_timeout = 60
c.JupyterHub.db_url = "sqlite:///:memory:"
c.JupyterHub.allow_named_servers = True
c.JupyterHub.api_page_default_limit = {page_limit}
c.JupyterHub.cookie_secret_file = {cookie_secret!r}
c.JupyterHub.pid_file = {pid_file!r}
c.Authenticator.allowed_users = set({users!r})
c.JupyterHub.load_groups = {groups!r}
# Activity reaches the hub within a second (defaults: 300 s), so a test can see whether a request counted as activity.
c.JupyterHub.last_activity_interval = 1
c.JupyterHub.activity_resolution = 0  # every use of a token counts at once (default: at most every 30 s)
c.Spawner.environment = {{
    "JUPYTERHUB_ACTIVITY_INTERVAL": "1",
    "JUPYTER_CONFIG_DIR": {singleuser_config!r},  # records every request's headers (see _SINGLEUSER_CONFIG)
    "RECLAIMER_TEST_HEADER_LOG": {header_log!r},
}}
c.JupyterHub.load_roles = [
    # What the reclaimer needs (docs/tokens.md): list user servers with their state, stop them, and mint tokens
    # that open one server each. No access:servers: the hub token never goes to a user's server.
    {{"name": "reclaimer", "scopes": ["list:users", "read:users:name", "read:users:groups", "read:servers",
                                      "delete:servers", "admin:server_state", "tokens"], "services": ["reclaimer"]}},
    {{"name": "test-admin", "scopes": ["admin:users", "admin:servers", "access:servers"], "services": ["test-admin"]}},
]
c.JupyterHub.services = [
    {{"name": "reclaimer", "api_token": os.environ["RECLAIMER_TEST_HUB_TOKEN"]}},
    {{"name": "test-admin", "api_token": os.environ["RECLAIMER_TEST_HUB_ADMIN_TOKEN"]}},
]
"""


# A single-user server that writes down every request it gets, headers included: what a user who logs their own
# server's requests would see.
_SINGLEUSER_CONFIG = """\
import json, os


def _record(handler):
    with open(os.environ["RECLAIMER_TEST_HEADER_LOG"], "a") as fh:
        fh.write(json.dumps({"server": handler.settings.get("base_url"), "method": handler.request.method,
                             "uri": handler.request.uri, "status": handler.get_status(),
                             "headers": dict(handler.request.headers)}) + "\\n")


c = get_config()
c.ServerApp.tornado_settings = {"log_function": _record}
"""


def header_log(hub: JupyterProcess) -> list[dict[str, Any]]:
    """Every request the hub's single-user servers got so far: {"server", "method", "uri", "status", "headers"}."""
    path = Path(hub.extra["header_log"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hub_available() -> bool:
    """True when ``jupyterhub`` and ``configurable-http-proxy`` (npm) are installed."""
    return shutil.which("configurable-http-proxy") is not None and _has_module("jupyterhub")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


HUB_GROUPS = {"research": {"users": ["alice"]}, "course": {"users": ["bob"]}}


def start_jupyterhub(workdir: Path, token: str, users: tuple[str, ...] = ("alice", "bob"), page_limit: int = 1,
                     timeout: float = READY_TIMEOUT,
                     groups: dict[str, dict[str, list[str]]] | None = None) -> JupyterProcess:
    """A real JupyterHub (DummyAuthenticator, SimpleLocalProcessSpawner, configurable-http-proxy) on loopback.

    ``url`` is the proxy's public URL (serves /hub/api and /user/...); ``token`` a least-privilege service token
    for the reclaimer; ``extra["admin_token"]`` may start servers. ``page_limit`` is small to force pagination.
    """
    if not hub_available():
        raise JupyterTestError("JupyterHub tests need `pip install jupyterhub` and "
                               "`npm install -g configurable-http-proxy`")
    workdir.mkdir(parents=True, exist_ok=True)
    proxy_port, hub_port, api_port = free_port(), free_port(), free_port()
    secret = workdir / "cookie_secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o600)
    admin_token = secrets.token_hex(24)
    singleuser = shutil.which("jupyterhub-singleuser") or "jupyterhub-singleuser"
    singleuser_config = workdir / "singleuser-config"
    singleuser_config.mkdir(exist_ok=True)
    (singleuser_config / "jupyter_server_config.py").write_text(_SINGLEUSER_CONFIG)
    headers = workdir / "singleuser-headers.jsonl"
    (workdir / "jupyterhub_config.py").write_text(_HUB_CONFIG.format(
        proxy_port=proxy_port, hub_port=hub_port, proxy_api_port=api_port, home=str(workdir / "users"),
        singleuser=singleuser, page_limit=page_limit, cookie_secret=str(secret), users=tuple(users),
        pid_file=str(workdir / "jupyterhub.pid"), groups=HUB_GROUPS if groups is None else groups,
        singleuser_config=str(singleuser_config), header_log=str(headers),
    ))
    env = _env(workdir, RECLAIMER_TEST_HUB_TOKEN=token, RECLAIMER_TEST_HUB_ADMIN_TOKEN=admin_token)
    cmd = [sys.executable, "-m", "jupyterhub", "-f", str(workdir / "jupyterhub_config.py")]
    proc, log_path = _spawn("jupyterhub", cmd, workdir, env)
    handle = JupyterProcess("jupyterhub", f"http://127.0.0.1:{proxy_port}", token, proc, workdir, log_path,
                            extra={"admin_token": admin_token, "hub_url": f"http://127.0.0.1:{hub_port}",
                                   "header_log": str(headers), "users": tuple(users)})
    wait_http(handle, "/hub/api/", timeout, headers=auth(admin_token))
    return handle


def hub_request(hub: JupyterProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A blocking admin call to the hub (for fixtures): (status, parsed JSON or None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(hub.url + path, data=data, method=method,
                                     headers=auth(hub.extra["admin_token"]))
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw.startswith(b"{") else None


def spawn_servers(hub: JupyterProcess, *servers: tuple[str, str], timeout: float = READY_TIMEOUT,
                  options: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Start user servers ((user, server name), "" = default) through the hub API, all at once, and poll until the
    hub says each is ready; returns their models. ``options``: a server's user_options (e.g. ``{"profile": "gpu"}``,
    what KubeSpawner's profile form sends)."""
    for user, server_name in servers:
        _, model = hub_request(hub, "GET", f"/hub/api/users/{user}")
        if ((model or {}).get("servers", {}).get(server_name) or {}).get("ready"):
            continue  # already running (another test module of this session started it)
        path = f"/hub/api/users/{user}/" + (f"servers/{server_name}" if server_name else "server")
        status, body = hub_request(hub, "POST", path, (options or {}).get((user, server_name), {}))
        if status not in (201, 202):
            raise JupyterTestError(f"spawning {user}/{server_name}: HTTP {status} {body}")
    deadline = time.monotonic() + timeout
    ready: dict[tuple[str, str], dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for user, server_name in servers:
            _, model = hub_request(hub, "GET", f"/hub/api/users/{user}")
            server = (model or {}).get("servers", {}).get(server_name)
            if server and server.get("ready"):
                ready[(user, server_name)] = server
        if len(ready) == len(servers):
            return ready
        time.sleep(0.1)  # polling interval; the deadline decides
    raise JupyterTestError(f"servers {sorted(set(servers) - set(ready))} not ready within {timeout:.0f}s:\n"
                           f"{hub.log_tail()}")


# --------------------------------------------------------------------------- kernels, as a notebook drives them


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def _gateway(url: str, token: str, timeout: float = 60.0) -> GatewayRest:
    return GatewayRest(url, token, timeout=timeout)


async def _call(coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    except KernelClientError as exc:
        raise JupyterTestError(str(exc)) from None


STARTED: list[tuple[str, str, str]] = []  # (url, token, kernel id) of every kernel start_kernel started


async def start_kernel(url: str, token: str, name: str = "python3", env: dict[str, str] | None = None) -> str:
    """POST /api/kernels; returns the new kernel's id (the kernel says "starting" until a client talks to it).
    ``env``: the kernel's environment in the start request (Enterprise Gateway needs ``KERNEL_USERNAME``)."""
    kernel_id = await _call(_gateway(url, token).start_kernel(name, env))
    STARTED.append((url, token, kernel_id))
    return kernel_id


async def kernel_model(url: str, token: str, kernel_id: str) -> dict[str, Any]:
    return await _call(_gateway(url, token).kernel(kernel_id))


async def interrupt_kernel(url: str, token: str, kernel_id: str) -> None:
    await _call(_gateway(url, token).interrupt(kernel_id))


async def shutdown_kernel(url: str, token: str, kernel_id: str) -> None:
    """DELETE /api/kernels/{id}; a kernel already gone is fine."""
    with contextlib.suppress(JupyterTestError):
        await _call(_gateway(url, token).shutdown(kernel_id))


async def run_code(url: str, token: str, kernel_id: str, code: str, wait: bool = True, silent: bool = False,
                   timeout: float = 60.0) -> str:
    """Execute ``code`` over the kernel's websocket. ``wait``: return its stdout once it finished (an error in the
    code raises); otherwise return "" as soon as the kernel reports busy with it (it keeps running)."""
    return await _call(_gateway(url, token).execute(kernel_id, code, wait=wait, silent=silent, timeout=timeout))


async def wait_for_state(url: str, token: str, kernel_id: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the kernel model until ``execution_state == state`` (deadline); returns the model."""
    return await _call(_gateway(url, token).wait_state(kernel_id, state, timeout))


async def wake_kernel(url: str, token: str, kernel_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Talk to a fresh kernel so it leaves "starting"; returns its model once it reports "idle".

    The server learns the state from the kernel's IOPub status messages. Under load a server may subscribe after the
    first execution's messages went out (ZMQ's slow joiner: seen with Enterprise Gateway's jupyter_server 1.x), so the
    kernel is talked to again, every 10 s, until the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        await run_code(url, token, kernel_id, "pass")
        remaining = deadline - time.monotonic()
        try:
            return await wait_for_state(url, token, kernel_id, "idle", timeout=max(1.0, min(10.0, remaining)))
        except JupyterTestError:
            if time.monotonic() >= deadline:
                raise


async def kernel_pid(url: str, token: str, kernel_id: str) -> int:
    """The kernel process's PID, as the kernel itself reports it."""
    return await _call(_gateway(url, token).pid(kernel_id))


# --------------------------------------------------------------------------- shared servers


def _blocking(method: str, url: str, token: str) -> Any:
    """One blocking API call for fixture housekeeping; the parsed JSON answer, or None on any failure."""
    request = urllib.request.Request(url, method=method, headers=auth(token))
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return None


def _server_kernel_ids(base: str, token: str) -> list[str]:
    listed = _blocking("GET", f"{base}/api/kernels?no_track_activity=1", token)
    return [k["id"] for k in listed if isinstance(k, dict) and "id" in k] if isinstance(listed, list) else []


def end_leftover_kernels(handle: JupyterProcess, listable: bool) -> None:
    """Shut down the kernels left on a shared server: every listed one where listing works, else those ``start_kernel``
    started there; on a hub, every kernel of every running user server. Failures are ignored (the kernel may be gone).
    """
    targets: list[tuple[str, str, str]] = []
    if "admin_token" in handle.extra:  # a hub: its users' servers, through the proxy
        admin = handle.extra["admin_token"]
        for user in handle.extra.get("users", ()):
            model = _blocking("GET", f"{handle.url}/hub/api/users/{user}", admin) or {}
            for server in (model.get("servers") or {}).values():
                if server.get("ready") and isinstance(server.get("url"), str):
                    base = handle.url + server["url"].rstrip("/")
                    targets += [(base, admin, kid) for kid in _server_kernel_ids(base, admin)]
    elif listable:
        targets = [(handle.url, handle.token, kid) for kid in _server_kernel_ids(handle.url, handle.token)]
    else:
        targets = [entry for entry in STARTED if entry[0] == handle.url]
    for base, token, kid in targets:
        _blocking("DELETE", f"{base}/api/kernels/{kid}", token)
    STARTED[:] = [entry for entry in STARTED if entry not in targets]


def _shared(handle: JupyterProcess) -> JupyterProcess:
    if handle.proc.poll() is not None:
        raise JupyterTestError(f"the shared {handle.name} exited ({handle.proc.returncode}); a test must not stop a "
                               f"shared server (start a private one with start_*):\n{handle.log_tail()}")
    return handle


@pytest.fixture(scope="session")
def _kernel_gateway_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterProcess]:
    from reclaimer.app.demo import _write_reserved_kernelspec

    workdir = tmp_path_factory.mktemp("kg")
    _write_reserved_kernelspec(workdir / "share")  # the demo's exempt kernelspec (tests/test_e2e.py)
    handle = start_kernel_gateway(workdir, secrets.token_hex(16), list_kernels=True,
                                  env={"JUPYTER_PATH": str(workdir / "share")})
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def kernel_gateway(_kernel_gateway_session: JupyterProcess) -> Iterator[JupyterProcess]:
    """A Kernel Gateway that lists kernels (``--JupyterWebsocketPersonality.list_kernels=True``) and offers the
    demo's reserved kernelspec (``reclaimer.app.demo.RESERVED_KERNEL``) beside python3."""
    yield _shared(_kernel_gateway_session)
    end_leftover_kernels(_kernel_gateway_session, listable=True)


@pytest.fixture(scope="session")
def _kernel_gateway_unlisted_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterProcess]:
    handle = start_kernel_gateway(tmp_path_factory.mktemp("kg-unlisted"), secrets.token_hex(16), list_kernels=False)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def kernel_gateway_unlisted(_kernel_gateway_unlisted_session: JupyterProcess) -> Iterator[JupyterProcess]:
    """A Kernel Gateway with its default: listing kernels is forbidden (403)."""
    yield _shared(_kernel_gateway_unlisted_session)
    end_leftover_kernels(_kernel_gateway_unlisted_session, listable=False)


@pytest.fixture(scope="session")
def _jupyter_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterProcess]:
    handle = start_jupyter_server(tmp_path_factory.mktemp("jupyter-server"), secrets.token_hex(16))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def jupyter_server(_jupyter_server_session: JupyterProcess) -> Iterator[JupyterProcess]:
    """A Jupyter Server (token auth, root dir in a temporary directory)."""
    yield _shared(_jupyter_server_session)
    end_leftover_kernels(_jupyter_server_session, listable=True)


@pytest.fixture(scope="session")
def _enterprise_gateway_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterProcess]:
    handle = start_enterprise_gateway(tmp_path_factory.mktemp("eg"), secrets.token_hex(16))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def enterprise_gateway(_enterprise_gateway_session: JupyterProcess) -> Iterator[JupyterProcess]:
    """A real Enterprise Gateway with its defaults: token auth, listing refused (403), no culling of its own."""
    yield _shared(_enterprise_gateway_session)
    end_leftover_kernels(_enterprise_gateway_session, listable=False)


@pytest.fixture(scope="session")
def _jupyterhub_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterProcess]:
    handle = start_jupyterhub(tmp_path_factory.mktemp("jupyterhub"), secrets.token_hex(16))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def jupyterhub(_jupyterhub_session: JupyterProcess) -> Iterator[JupyterProcess]:
    """A JupyterHub with users alice (group research) and bob (group course), pagination at one user per page. User
    servers that earlier modules started stay running (``spawn_servers`` reuses them), without their kernels."""
    yield _shared(_jupyterhub_session)
    end_leftover_kernels(_jupyterhub_session, listable=True)


SHARED_SERVER_FIXTURES = frozenset({"kernel_gateway", "kernel_gateway_unlisted", "jupyter_server", "enterprise_gateway",
                                    "jupyterhub"})


__all__ = [
    "BOOTS", "EG_USER", "SHARED_SERVER_FIXTURES", "STARTED", "JupyterProcess", "JupyterTestError", "auth",
    "end_leftover_kernels", "enterprise_gateway_venv", "free_port", "header_log", "hub_available", "hub_request",
    "interrupt_kernel", "kernel_model", "kernel_pid",
    "run_code", "shutdown_kernel", "spawn_servers", "start_enterprise_gateway", "start_jupyter_server",
    "start_jupyter_server_with_gateway", "start_jupyterhub", "start_kernel",
    "start_kernel_gateway", "wait_for_state", "wait_http", "wake_kernel",
]

"""Faithful models of the cullers people run today, each from its documented semantics, source cited.

Every model reads only what the real tool reads (kernel models, hub activity, DCGM utilisation per pod) from the
simulated world, on the tool's own period, and acts as the tool does. None of them looks at what we look at;
that is the point of the comparison, and each model's docstring says what it is blind to.
"""

from __future__ import annotations

from bench.replay.world import Server, World


class NoCulling:
    """Nothing is ever shut down: the baseline for what is held idle."""

    name = "no culling"
    period = 3600.0
    window = 0.0

    def __init__(self) -> None:
        self.world: World | None = None

    def describe(self) -> str:
        return "nothing is shut down"

    def attach(self, world: World) -> None:
        self.world = world

    def act(self, now: float) -> None:
        pass


class JupyterServerCuller:
    """Jupyter Server's (and Enterprise Gateway's) idle-kernel culling.

    Source: jupyter_server/services/kernels/kernelmanager.py, ``MappingKernelManager.cull_kernel_if_idle``:
    a kernel is shut down when ``now - kernel.last_activity > cull_idle_timeout`` AND (``cull_busy`` or
    ``execution_state != "busy"``) AND (``cull_connected`` or no websocket connection), checked every
    ``cull_interval`` (default 300 s). Enterprise Gateway inherits it (``--RemoteKernelManager.cull_idle_timeout``,
    docs/source/operators/config-culling.md). ``last_activity`` moves on IOPub traffic
    (``start_watching_activity``/``record_activity``; in jupyter_server 2.x only for tracked message types or
    while busy). It shuts down kernels only: inside a notebook pod that frees GPU memory, never the allocation.

    Blind to: the GPU (a child process training on it while the kernel is idle is culled with the kernel); with
    ``cull_connected`` False, any kernel with an open tab is never culled.
    """

    def __init__(self, cull_idle_timeout: float = 3600.0, *, cull_connected: bool = False, cull_busy: bool = False,
                 cull_interval: float = 300.0) -> None:
        self.timeout = cull_idle_timeout
        self.cull_connected = cull_connected
        self.cull_busy = cull_busy
        self.period = cull_interval
        self.window = cull_idle_timeout
        self.name = f"jupyter/EG culler{' +connected' if cull_connected else ''}"
        self.world: World | None = None

    def describe(self) -> str:
        return (f"cull_idle_timeout={self.timeout:g}, cull_interval={self.period:g}, "
                f"cull_connected={self.cull_connected}, cull_busy={self.cull_busy}")

    def attach(self, world: World) -> None:
        self.world = world

    def act(self, now: float) -> None:
        world = self.world
        assert world is not None
        for k in [k for k in world.kernels.values() if k.alive()]:
            is_idle_time = now - k.last_activity(now) > self.timeout
            is_idle_execute = self.cull_busy or not k.busy(now)
            connections = 1 if k.server.tab_open else 0
            is_idle_connected = self.cull_connected or not connections
            if is_idle_time and is_idle_execute and is_idle_connected:
                world.shutdown_kernel(k, self.name, "shutdown kernel", self.window)


class KubeflowCuller:
    """Kubeflow's notebook-controller culler.

    Source: kubeflow/kubeflow components/notebook-controller/pkg/culler/culler.go. Every
    ``IDLENESS_CHECK_PERIOD`` minutes (default 1) ``UpdateNotebookLastActivityAnnotation`` GETs the server's
    ``/api/kernels``: with no annotation yet it is set to now; with no kernels (or a failed GET) it is left alone;
    if any kernel's ``execution_state`` is not ``idle`` it becomes now; otherwise the newest kernel
    ``last_activity``. ``NotebookNeedsCulling`` is true once now is past annotation + ``CULL_IDLE_TIME`` (minutes,
    default 1440 = one day; set to 60 here to compare at the same hour), and the controller then sets
    ``kubeflow-resource-stopped``: the StatefulSet goes to 0 replicas, the whole notebook pod (and every kernel in
    it) ends, and the GPU allocation is released.

    Blind to: the GPU (a GPU child of an idle kernel does not keep it); connections do not matter, but a busy
    CPU-only kernel keeps the whole notebook (correctly) -- and so does a kernel left busy forever.
    """

    def __init__(self, cull_idle_time: float = 3600.0, *, check_period: float = 60.0) -> None:
        self.cull_idle_time = cull_idle_time
        self.period = check_period
        self.window = cull_idle_time
        self.name = "kubeflow culler" + ("" if cull_idle_time == 3600.0 else f" {cull_idle_time / 3600:g}h")
        self.annotation: dict[tuple[str, int], float] = {}
        self.world: World | None = None

    def describe(self) -> str:
        return f"CULL_IDLE_TIME={self.cull_idle_time / 60:g} min, IDLENESS_CHECK_PERIOD={self.period / 60:g} min"

    def attach(self, world: World) -> None:
        self.world = world

    def act(self, now: float) -> None:
        world = self.world
        assert world is not None
        for s in [s for s in world.servers.values() if s.alive()]:
            key = (s.id, s.incarnation)
            if key not in self.annotation:
                self.annotation[key] = now
                continue
            kernels = s.live_kernels()
            if kernels:
                if any(k.busy(now) for k in kernels):
                    self.annotation[key] = now
                else:
                    self.annotation[key] = max(k.last_activity(now) for k in kernels)
            if now > self.annotation[key] + self.cull_idle_time:
                world.stop_server(s, self.name, "stop notebook", self.window)


class HubIdleCuller:
    """jupyterhub-idle-culler.

    Source: jupyterhub/jupyterhub-idle-culler jupyterhub_idle_culler/__init__.py, ``cull_idle``/``handle_server``:
    every ``cull_every`` seconds (default timeout/2; Zero to JupyterHub sets ``cull.every`` 600) a server whose
    ``now - last_activity >= timeout`` (Zero to JupyterHub's ``cull.timeout`` 3600) is stopped (DELETE
    /users/{name}/server): the pod ends, every kernel in it, and the allocation is released. The hub's
    ``last_activity`` comes from configurable-http-proxy's route activity (updated on every proxied request and on
    websocket data: lib/configproxy.js ``handleProxy``) and from the single-user server's activity reports of its
    ``last_activity()`` (jupyter_server ServerWebApplication: API requests and kernel activity), both polled every
    few minutes (``JupyterHub.last_activity_interval`` 300 s).

    Blind to: the GPU and execution state: an open tab keeps the server forever; a long silent cell (busy, no
    output) with the tab closed looks inactive and is culled mid-run.
    """

    def __init__(self, timeout: float = 3600.0, *, cull_every: float = 600.0) -> None:
        self.timeout = timeout
        self.period = cull_every
        self.window = timeout
        self.name = "jupyterhub-idle-culler"
        self.world: World | None = None

    def describe(self) -> str:
        return f"--timeout={self.timeout:g} --cull-every={self.period:g}"

    def attach(self, world: World) -> None:
        self.world = world

    def act(self, now: float) -> None:
        world = self.world
        assert world is not None
        for s in [s for s in world.servers.values() if s.alive()]:
            if now - s.hub_last_activity >= self.timeout:
                world.stop_server(s, self.name, "stop server", self.window)


class GpuUtilCuller:
    """A GPU-utilisation-only culler, as gpu-pruner.

    Source: wseaton/gpu-pruner gpu-pruner/src/query.promql.j2 and src/main.rs: every ``--check-interval`` (180 s)
    it asks Prometheus for pods whose ``max_over_time`` DCGM utilisation over ``--duration`` minutes (30) is
    below ``--idle-threshold`` (0.01), skips pods younger than duration + ``--grace-period`` (300 s) or Pending,
    walks owner references to a Deployment/ReplicaSet/StatefulSet/Notebook/InferenceService
    (``find_root_object``) and scales it to 0 replicas. DCGM labels a GPU with the pod it is allocated to, so a
    pod holding a GPU with no process at all is seen (at 0). A notebook pod (Kubeflow Notebook / StatefulSet) is
    stopped whole; a kernel pod of Enterprise Gateway or elastic-jupyter-operator has no owner of those kinds, so
    gpu-pruner finds no root object and leaves it alone.

    Blind to: kernels: a silent CPU-only phase of a running cell (data loading with the VRAM held), or a busy
    CPU-only kernel next to an idle GPU kernel, is stopped mid-run.
    """

    def __init__(self, duration: float = 1800.0, *, check_interval: float = 180.0, grace_period: float = 300.0,
                 idle_threshold: float = 0.01) -> None:
        self.duration = duration
        self.period = check_interval
        self.grace = grace_period
        self.threshold = idle_threshold
        self.window = duration
        self.name = "gpu-util culler"
        self.world: World | None = None

    def describe(self) -> str:
        return (f"--duration={self.duration / 60:g} --check-interval={self.period:g} "
                f"--grace-period={self.grace:g} --idle-threshold={self.threshold:g}")

    def attach(self, world: World) -> None:
        self.world = world

    def act(self, now: float) -> None:
        world = self.world
        assert world is not None
        for pod in list(world.holders()):
            if pod.created_at > now - self.duration - self.grace:
                continue
            if pod.last_nonzero >= now - self.duration:
                continue
            owner = world.owner(pod.uid)
            if isinstance(owner, Server):  # the notebook pod's StatefulSet / Notebook
                world.stop_server(owner, self.name, "scale to 0", self.window)
            # a kernel pod: no root object gpu-pruner can scale -> skipped

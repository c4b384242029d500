"""Issue 14: the action kinds are one table (reclaimer.core.actionkinds.KINDS), and every layer asks it.

``test_every_kind_is_planned_executed_verified_and_reported`` walks the table: for each executable kind the policy
plans it, the dry-run executor records it, the live executor carries it out through the operation its row names
(the real ``kubernetes`` client against the fake API server for evictions and Notebooks; recording stand-ins for the
gateway and the hub, whose clients are tested against real servers in test_gateway/test_hub), the result is verified
(GPU memory; the allocation where the kind recovers one), and the report and the metrics name it. A row without its
executor method, or with a target, need or whole-target check the policy does not know, fails there (the negative
controls below patch such a row in).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import pytest

from reclaimer.act import actions
from reclaimer.act.actions import DryRunExecutor, LiveExecutor
from reclaimer.core import actionkinds, policy
from reclaimer.core.config import PolicySettings
from reclaimer.core.actions import ActionKind, Recovers
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import ActionResult, Candidate, CycleSnapshot, Decision, GpuSample, NotebookRef, OwnerRef, PodGpuAllocation, SamplerSnapshot
from reclaimer.core.policy import decide
from reclaimer.export.metrics import Metrics
from reclaimer.export.report import build_report, render_json
from reclaimer.core.sources import KUBEFLOW_GATEWAY
from tests.support.fake_kube import FakeKube
from tests.support.policy_fixtures import (
    KID,
    NODE,
    NOW,
    UUID0,
    WARNED,
    activity,
    kernel,
    make_settings,
    pod,
    server,
    snapshot,
    warn_then_execute,
)
from tests.support.policy_fixtures import (
    policy as policy_fields,
)

NS, NB = "team-a", "nb-alice"


# --------------------------------------------------------------------------- one case per kind (at least)


def _allocated(c: Candidate) -> Candidate:
    return replace(c, allocated=True, allocated_gpus=(UUID0,))


def _notebook_kernel() -> Candidate:
    nb_pod = replace(
        pod(f"{NB}-0", NS, labels={"notebook-name": NB, "statefulset": NB}, user=None),
        owners=(OwnerRef("StatefulSet", NB, "apps/v1", True),),
    )
    c = kernel(act=activity(gateway=KUBEFLOW_GATEWAY), pod_info=nb_pod, user=None, gateway=KUBEFLOW_GATEWAY)
    return replace(_allocated(c), notebook=NotebookRef(NS, NB, (activity(gateway=KUBEFLOW_GATEWAY),), None, NOW - 1))


@dataclass(frozen=True)
class Case:
    kind: ActionKind
    candidate: Callable[[], Candidate]
    call: tuple[Any, ...]  # the one mutating call the live executor must make, and nothing else
    recovers: Recovers


CASES = [
    pytest.param(
        Case(ActionKind.SHUTDOWN_KERNEL, lambda: _allocated(kernel()), ("shutdown", KID), Recovers.MEMORY),
        id="shutdown-kernel-in-a-notebook-pod",
    ),
    pytest.param(
        Case(
            ActionKind.SHUTDOWN_KERNEL,
            lambda: replace(_allocated(kernel()), kernel_pod=True),
            ("shutdown", KID),
            Recovers.ALLOCATION,
        ),
        id="shutdown-kernel-of-its-own-pod",
    ),
    pytest.param(
        Case(
            ActionKind.STOP_SERVER,
            lambda: _allocated(kernel(server=server("alice", ""))),
            ("stop_server", "alice", ""),
            Recovers.ALLOCATION,
        ),
        id="stop-server",
    ),
    pytest.param(
        Case(
            ActionKind.EVICT_POD,
            lambda: _allocated(kernel()),
            ("evict", f"/api/v1/namespaces/{NS}/pods/jupyter-alice/eviction"),
            Recovers.ALLOCATION,
        ),
        id="evict-pod",
    ),
    pytest.param(
        Case(
            ActionKind.STOP_NOTEBOOK,
            _notebook_kernel,
            ("stop_notebook", f"/apis/kubeflow.org/v1/namespaces/{NS}/notebooks/{NB}"),
            Recovers.ALLOCATION,
        ),
        id="stop-notebook",
    ),
]


def test_every_executable_kind_has_a_case() -> None:
    """A new row must come with a case here, which the walk below then holds to the whole pipeline."""
    assert {p.values[0].kind for p in CASES} == set(actionkinds.EXECUTABLE)


# --------------------------------------------------------------------------- stand-ins for the gateway and the hub


class Recorder:
    """KernelStopper + ServerStopper that record each call (every mutating call lands in ``calls``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def shutdown(self, kernel_id: str) -> tuple[str, str]:
        self.calls.append(("shutdown", kernel_id))
        return "success", "shut down"

    async def stop_server(self, user: str, server_name: str = "") -> tuple[str, str]:
        self.calls.append(("stop_server", user, server_name))
        return "success", f"stopped {user}/{server_name}"

    async def shutdown_server_kernel(self, server: object, kernel_id: str) -> tuple[str, str]:
        self.calls.append(("shutdown_server_kernel", kernel_id))
        return "success", "shut down"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def api() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


def _mutations(api: FakeKube, recorder: Recorder) -> list[tuple[Any, ...]]:
    kube = [("evict", r.path) for r in api.evictions]
    kube += [("delete", r.path) for r in api.deletes]
    kube += [("stop_notebook", r.path) for r in api.requests_to("PATCH", r"/notebooks/")]
    return recorder.calls + kube


def _samples_without_processes(t: float) -> SamplerSnapshot:
    s = GpuSample(
        timestamp=t, index=0, uuid=UUID0, up=True, utilization=0.0, memory_used_bytes=0,
        memory_total_bytes=80 << 30, processes=(),
    )  # fmt: skip
    return SamplerSnapshot(devices=(), samples={UUID0: (s,)}, started_at=0.0, sample_interval=1.0)


async def _still(d: Decision) -> Decision:
    return d


# --------------------------------------------------------------------------- the walk


async def walk(case: Case, api: FakeKube) -> None:
    """Plan, dry-run, carry out, verify and report one case; AssertionError names the stage that fails."""
    spec = actionkinds.spec(case.kind)
    c = case.candidate()

    # Plan: the policy plans exactly this kind for a candidate that has what it needs and is idle as a whole.
    settings = make_settings(policies=[policy_fields(action=case.kind.value)])
    snap = snapshot()
    (d,) = decide([c], snap, settings, NOW, WARNED)
    assert (d.verdict, d.action) == (Verdict.RECLAIM, case.kind), f"plan: {d.verdict.value}: {d.reason}"
    assert actionkinds.recovers(d.action, d.candidate) is case.recovers, "plan: what it recovers"
    assert policy._target(d) is not None, f"plan: the policy knows no target key for ends={spec.ends!r}"

    # Dry-run: recorded as what enforce would do, nothing called.
    (dry,) = await DryRunExecutor().execute([d])
    assert (dry.result, dry.detail, dry.mode) == ("dry-run", "would act", "dry-run")

    # Live: the operation the row names runs, through its adapter, once, and nothing else is touched.
    if c.pod is not None and c.notebook is not None:
        api.add_notebook(NB, namespace=NS)
        api.add_notebook_pod(NB, namespace=NS, node=NODE, uid=c.pod.uid)
    elif c.pod is not None:
        api.add_pod(c.pod.name, namespace=c.pod.namespace, node=NODE, uid=c.pod.uid)
    recorder, clock = Recorder(), Clock(NOW)
    ex = LiveExecutor(kernels=recorder, servers=recorder, kube=api.kube_client(node_name=NODE), clock=clock,
                      verify_within=60)  # fmt: skip
    (done,) = await warn_then_execute(ex, [d], recheck=_still)
    assert done.result == "success", f"execute: {done.result}: {done.detail}"
    assert _mutations(api, recorder) == [case.call], "execute: the wrong adapter call"
    acted = [(e["reason"], e["action"]) for e in api.events if e["type"] == "Normal"]
    assert acted == [("GPUIdle", spec.event_action)], "execute: the Event"

    # Verify: the GPU memory (the process gone from the samples); the allocation where the kind recovers one.
    clock.t += 5
    (memory,) = ex.verify(_samples_without_processes(clock.t), clock.t)
    assert (memory.result, memory.reclaimed_bytes) == ("verified", 2 << 30), f"verify: {memory.detail}"
    released = await ex.verify_allocations([PodGpuAllocation(NS, "someone-else", "c", (UUID0,), (UUID0,))],
                                           clock.t, clock.t)  # fmt: skip
    if case.recovers is Recovers.ALLOCATION:
        assert [(r.result, r.released_gpus) for r in released] == [("released", 1)], "verify: the allocation"
    else:
        assert released == [] and ex.pending == 0, "verify: a memory-only action claims no allocation"

    # Reported: the report says what it recovers, the metrics count it under its own label.
    (entry,) = json.loads(render_json(build_report(CycleSnapshot(NODE, "enforce", NOW, snap, (d,)))))["kernels"]
    assert (entry["action"], entry["recovers"]) == (case.kind.value, case.recovers.value), "report"
    metrics = Metrics(lambda: None)
    for r in (dry, done, memory, *released):
        metrics.record_action(r)
    text = metrics.render()[0].decode()
    for r in (dry, done, memory, *released):
        line = f'reclaimer_actions_total{{action="{case.kind.value}",mode="{r.mode}",result="{r.result}"}} 1.0'
        assert line in text, f"metrics: {line}"


@pytest.mark.parametrize("case", CASES)
async def test_every_kind_is_planned_executed_verified_and_reported(case: Case, api: FakeKube) -> None:
    await walk(case, api)


# --------------------------------------------------------------------------- negative controls: a row missing a part


def _patched(monkeypatch: pytest.MonkeyPatch, kind: ActionKind, **fields: Any) -> None:
    monkeypatch.setitem(actionkinds.KINDS, kind, replace(actionkinds.KINDS[kind], **fields))


@pytest.mark.parametrize("case", CASES[2:4])
async def test_a_row_without_its_executor_method_fails_the_walk(
    case: Case, api: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patched(monkeypatch, case.kind, operation="reboot_node")
    with pytest.raises(AssertionError, match="execute: skipped: unknown action"):
        await walk(case, api)
    assert _mutations(api, Recorder()) == []  # and nothing was called


@pytest.mark.parametrize(
    "fields, stage",
    [
        pytest.param({"needs": "volume"}, "volume", id="unknown-need"),
        pytest.param({"ends": "volume"}, "volume", id="unknown-target"),
    ],
)
async def test_a_row_the_policy_does_not_know_fails_the_walk(
    fields: dict[str, str], stage: str, api: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patched(monkeypatch, ActionKind.EVICT_POD, **fields)
    with pytest.raises(KeyError, match=stage):
        await walk(CASES[3].values[0], api)


async def test_a_row_without_an_event_action_fails_the_walk(api: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    _patched(monkeypatch, ActionKind.EVICT_POD, event_action="Evict")
    with pytest.raises(AssertionError, match="execute: the Event"):
        await walk(CASES[3].values[0], api)


# --------------------------------------------------------------------------- the table itself


def test_the_table_is_complete_and_consistent() -> None:
    # Every kind but auto (a policy setting the policy resolves per candidate) has a row; auto reads as none.
    assert set(actionkinds.KINDS) == set(ActionKind) - {ActionKind.AUTO}
    assert actionkinds.spec(ActionKind.AUTO) is actionkinds.KINDS[ActionKind.NONE]
    # The configuration accepts exactly the kinds (and auto): a new kind is one more config value too.
    assert set(get_args(PolicySettings.model_fields["action"].annotation)) == {k.value for k in ActionKind}
    for kind, spec in actionkinds.KINDS.items():
        assert spec.kind is kind
        executable = kind in actionkinds.EXECUTABLE
        assert bool(spec.operation) is executable and bool(spec.event_action) is executable, kind
        assert not executable or spec.operation in actions.OPERATIONS, f"{kind.value}: no executor method"
        assert spec.needs in policy._NEEDS and spec.ends in policy._TARGETS, kind
        assert spec.whole in get_args(actionkinds.Whole), kind
        assert spec.summary, kind
    assert actions.LiveExecutor()._executors().keys() == set(actionkinds.EXECUTABLE)
    assert set(actionkinds.EVENT_ACTIONS) == set(actionkinds.EXECUTABLE)


@pytest.mark.parametrize(
    "policy_action, lists",
    [
        pytest.param("stop-server", True, id="stop-server"),
        pytest.param("evict-pod", True, id="evict-pod"),
        pytest.param("auto", True, id="auto-may-pick-either"),
        pytest.param("shutdown-kernel", False, id="shutdown-kernel"),
        pytest.param("stop-notebook", False, id="stop-notebook-lists-its-notebook-instead"),
        pytest.param("none", False, id="none"),
    ],
)
def test_which_policies_need_their_whole_target_listed(policy_action: str, lists: bool) -> None:
    """The daemon lists every kernel of a candidate's pod or server each cycle only where the action may end them."""
    assert actionkinds.may_end_target(policy_action) is lists


def test_a_result_of_each_kind_counts_under_its_own_label() -> None:
    """No executable kind falls into the metrics' ``other`` bucket (its label set comes from the table)."""
    metrics = Metrics(lambda: None)
    for kind in actionkinds.EXECUTABLE:
        d = Decision(_allocated(kernel()), Verdict.RECLAIM, kind, "idle", "p", 1800, 0)
        metrics.record_action(ActionResult(d, "success", "done", mode="enforce"))
    text = metrics.render()[0].decode()
    assert 'action="other"' not in text
    for kind in actionkinds.EXECUTABLE:
        assert f'reclaimer_actions_total{{action="{kind.value}",mode="enforce",result="success"}} 1.0' in text


def test_the_docs_name_every_kind_and_its_events() -> None:
    """An added row shows up where operators read about actions: the table of what each recovers and the Events."""
    root = Path(__file__).resolve().parent.parent
    configuration = (root / "docs" / "configuration.md").read_text()
    interface = (root / "docs" / "interface.md").read_text()
    for kind, spec in actionkinds.KINDS.items():
        assert f"\n| `{kind.value}` |" in configuration, f"docs/configuration.md: no row for {kind.value}"
        for name in (spec.event_action, spec.failure_event):
            assert name is None or re.search(rf"\b{name}\b", interface), f"docs/interface.md: no Event {name}"

"""One vocabulary in one place (issue 14): modes, verdicts, actions and their results, keys, kernel ids, sources.

Each vocabulary lives in one ``reclaimer.core`` module. These tests fail when one drifts: a contract value renamed,
a result the executors can produce that the metrics' label set lacks (or one the label set lists that nothing
produces), a parser that accepts a kernel id another refuses, or a module that spells a vocabulary string again.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

import reclaimer
from reclaimer.act.actions import DryRunExecutor, LiveExecutor
from reclaimer.core import keys, labels, modes, results, sources, views
from reclaimer.core.actions import ActionKind, ActionName, Recovers
from reclaimer.core.candidates import join
from reclaimer.core.config import KubernetesSettings, Settings, parse_settings
from reclaimer.core.kernelids import canonical_kernel_id, is_kernel_id
from reclaimer.core.model import (
    ActionResult,
    AttributedProcess,
    Candidate,
    Decision,
    GpuSample,
    PodGpuAllocation,
    PodInfo,
    ProcessSample,
    SamplerSnapshot,
)
from reclaimer.core.verdicts import Verdict
from reclaimer.export import metrics as metrics_mod
from reclaimer.export import report as report_mod
from reclaimer.export.metrics import Metrics
from reclaimer.observe import procfs
from reclaimer.observe.jupyter_rest import BadAnswer, parse_kernel_model
from reclaimer.observe.kube import EvictionResult, PodCache

PACKAGE = Path(reclaimer.__file__).parent
KID = "0a1b2c3d-0000-4000-8000-0000000000aa"
GIB = 1024**3
NOW = 1_000_000.0


# --------------------------------------------------------------------------- the contract's spelling


def test_the_vocabularies_spell_the_interface_contract() -> None:
    """The values are the interface contract (report JSON, metric labels, config): written out here, literally."""
    assert modes.MODES == ("dry-run", "enforce")
    assert get_args(modes.Mode) == modes.MODES
    assert [v.value for v in Verdict] == ["keep", "warn", "reclaim", "exempt", "unknown"]
    assert [a.value for a in ActionKind] == [
        "shutdown-kernel", "stop-server", "evict-pod", "stop-notebook", "auto", "none",
    ]  # fmt: skip
    assert set(get_args(ActionName)) == {a.value for a in ActionKind} and len(get_args(ActionName)) == len(ActionKind)
    assert [r.value for r in Recovers] == ["allocation", "memory", "none"]
    assert results.ACTION_RESULTS == (
        "success", "already-gone", "failed", "blocked", "skipped", "dry-run", "verified", "unverified", "released",
        "unreleased",
    )  # fmt: skip
    assert set(results.DONE) | {results.FAILED} == set(results.ADAPTER_RESULTS)
    assert set(get_args(results.AdapterResult)) == set(results.ADAPTER_RESULTS)
    assert results.EVICTION_RESULTS == (
        "success", "already-gone", "blocked-pdb", "retry-after", "failed", "forbidden", "conflict",
    )  # fmt: skip
    assert (keys.kernel_key(KID), keys.pod_key("u-1")) == (f"kernel:{KID}", "pod:u-1")
    assert (sources.HUB_GATEWAY, sources.KUBEFLOW_GATEWAY) == ("jupyterhub", "kubeflow")
    assert (keys.HUB_CREDENTIAL, keys.KUBEFLOW_CREDENTIAL, keys.KUBERNETES_CREDENTIAL) == ("hub", "kubeflow", "kubernetes")
    assert keys.gateway_credential("eg") == "gateway:eg"
    assert (labels.BREAKER_CAUSES, labels.NO_NAMESPACE) == (("mass-flip", "sustained"), "-")


def test_exporters_and_config_use_the_vocabularies() -> None:
    assert metrics_mod.RESULTS == results.ACTION_RESULTS
    assert metrics_mod.VERDICTS == report_mod.VERDICTS == tuple(v.value for v in Verdict)
    assert report_mod.RECOVERS == tuple(r.value for r in Recovers)
    for mode in modes.MODES:
        assert parse_settings(f"mode: {mode}\n").mode == mode
    assert Settings().mode == modes.DRY_RUN
    for name in get_args(ActionName):
        assert ActionKind(name).value == name


# --------------------------------------------------------------------------- results: produced == labelled


@dataclass
class Stopper:
    """A kernel/server/notebook adapter answering as scripted (the real ones are tested against real servers in
    test_actions, test_hub and test_kubeflow; here only the vocabulary of their answers matters)."""

    answer: results.AdapterOutcome = (results.SUCCESS, "done")

    async def shutdown(self, kernel_id: str) -> results.AdapterOutcome:
        return self.answer


@dataclass
class Evicter:
    """A pod adapter answering evictions as scripted; ``pod`` is what a later GET finds (None: gone)."""

    answer: EvictionResult
    pod: PodInfo | None = None
    events: list[str] = field(default_factory=list)

    def evict(self, namespace: str, name: str, uid: str) -> EvictionResult:
        return self.answer

    def create_event(self, pod: Any, *, reason: str, action: str, note: str, type: str = "Normal") -> bool:
        self.events.append(reason)
        return True

    def get_pod(self, namespace: str, name: str) -> PodInfo | None:
        return self.pod


POD = PodInfo(uid="uid-1", namespace="team-a", name="nb-alice", node_name="node-1")


def kernel_plan(verdict: Verdict = Verdict.RECLAIM) -> Decision:
    proc = AttributedProcess(pid=4242, starttime=7, gpu_uuid="GPU-0", used_memory_bytes=3 * GIB, sm_utilization=None,
                             kernel_id=KID, kernel_pid=4242)  # fmt: skip
    cand = Candidate(key=keys.kernel_key(KID), node="node-1", kernel_id=KID, gateway="eg", gpu_uuids=("GPU-0",),
                     processes=(proc,))  # fmt: skip
    return Decision(cand, verdict, ActionKind.SHUTDOWN_KERNEL, "idle", policy="p", idle_seconds=1800, eta_seconds=0)


def pod_plan() -> Decision:
    cand = Candidate(key=keys.pod_key(POD.uid), node="node-1", pod=POD, gpu_uuids=("GPU-0",), allocated=True)
    return Decision(cand, Verdict.RECLAIM, ActionKind.EVICT_POD, "idle", policy="p", idle_seconds=1800, eta_seconds=0)


def sampler(t: float, pids: tuple[int, ...]) -> SamplerSnapshot:
    sample = GpuSample(t, 0, "GPU-0", True, 0.0, GIB, 80 * GIB, tuple(ProcessSample(p, GIB) for p in pids))
    return SamplerSnapshot(devices=(), samples={"GPU-0": (sample,)}, started_at=0.0, sample_interval=1.0)


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


async def act(ex: LiveExecutor, plan: Decision) -> list[ActionResult]:
    """Warn in one cycle, act in the next (invariant 11), as the daemon does."""
    assert await ex.execute([replace(plan, verdict=Verdict.WARN)]) == []
    return await ex.execute([plan])


async def every_result() -> list[ActionResult]:
    """Drive the executors down every path that ends in a result: the results they can return."""
    out: list[ActionResult] = []
    out += await DryRunExecutor().execute([kernel_plan()])
    clock = Clock()
    # The reclaim comes in the cycle that warns: skipped (invariant 11, defence in depth).
    out += await LiveExecutor(kernels=Stopper(), clock=clock).execute([kernel_plan()])
    for answer in results.ADAPTER_RESULTS:
        ex = LiveExecutor(kernels=Stopper((answer, "scripted")), clock=clock, verify_within=60)
        out += await act(ex, kernel_plan())
        clock.t += 1
        out += ex.verify(sampler(clock.t, () if answer == results.SUCCESS else (4242,)), clock.t)
        clock.t += 120
        out += ex.verify(sampler(clock.t, (4242,)), clock.t)
    for answer in results.EVICTION_RESULTS:
        for pod in (None, POD):
            ev = Evicter(EvictionResult(answer, "scripted", retry_after=30.0), pod=pod)
            ex = LiveExecutor(kube=ev, clock=clock, verify_within=60)
            out += await act(ex, pod_plan())
            clock.t += 1
            out += await ex.verify_allocations(None, None, clock.t)
            clock.t += 120
            out += await ex.verify_allocations(None, None, clock.t)
    return out


async def test_every_result_the_executors_return_is_in_the_vocabulary_and_the_label_set() -> None:
    produced = await every_result()
    seen = {r.result for r in produced}
    assert seen <= set(results.ACTION_RESULTS), seen - set(results.ACTION_RESULTS)
    # ...and the other way round: the label set lists nothing the executors cannot produce.
    assert seen == set(results.ACTION_RESULTS), set(results.ACTION_RESULTS) - seen
    assert {r.mode for r in produced} == set(modes.MODES)
    metrics = Metrics(lambda: None)
    for r in produced:
        metrics.record_action(r)
    counted: dict[tuple[str, str, str], float] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == "reclaimer_actions_total":
                counted[(s.labels["action"], s.labels["result"], s.labels["mode"])] = s.value
    assert {k for k, v in counted.items() if v} == {(r.decision.action.value, r.result, r.mode) for r in produced}
    assert {result for _, result, _ in counted} == set(results.ACTION_RESULTS)  # zero series: the whole label set
    assert {mode for _, _, mode in counted} == set(modes.MODES)


# --------------------------------------------------------------------------- keys


def test_candidate_keys_come_from_the_keys_vocabulary() -> None:
    pod = PodInfo(uid="uid-k", namespace="ns", name="nb", node_name="node-1")
    proc = AttributedProcess(pid=1, starttime=1, gpu_uuid="GPU-0", used_memory_bytes=GIB, sm_utilization=None,
                             pod_uid=pod.uid, kernel_id=KID, kernel_pid=1)  # fmt: skip
    bare = PodInfo(uid="uid-bare", namespace="ns", name="train", node_name="node-1")
    joined = join(
        node="node-1", processes=[proc], pods_by_uid={pod.uid: pod, bare.uid: bare},
        allocations=[PodGpuAllocation("ns", "train", "c", ("GPU-1",))], activities={},
    )  # fmt: skip
    assert sorted(c.key for c in joined.candidates) == sorted([keys.kernel_key(KID), keys.pod_key(bare.uid)])
    # A pod candidate's key is also its kernel_id label value (metrics, report).
    assert {views.metric_kernel_id(c) for c in joined.candidates} == {KID, keys.pod_key(bare.uid)}
    assert keys.server_key("alice", "") == "server:alice/" and keys.notebook_key("ns", "nb") == "notebook:ns/nb"


# --------------------------------------------------------------------------- kernel ids: one pattern, every parser


def gateway_accepts(text: str) -> bool:
    try:
        parse_kernel_model({"id": text, "execution_state": "idle", "last_activity": "2026-01-01T00:00:00Z"}, "eg", NOW)
    except BadAnswer:
        return False
    return True


@dataclass
class Pods:
    pods: list[PodInfo]

    def list_pods_on_node(self, node_name: str | None = None) -> list[PodInfo]:
        return self.pods


def kube_label_accepts(text: str) -> bool:
    cache = PodCache(Pods([PodInfo(uid="u", namespace="ns", name="k", labels={"kernel_id": text})]), "node-1",
                     KubernetesSettings())  # fmt: skip
    assert cache.refresh()
    return cache.kernel_ids() == {"u": text}


def connection_file_id(text: str) -> str | None:
    return procfs.kernel_id_from_cmdline(["python", "-m", "ipykernel_launcher", "-f", f"/run/kernel-{text}.json"])


ODD_IDS = [
    pytest.param(KID, id="canonical"),
    pytest.param(KID.upper(), id="uppercase"),
    pytest.param(KID[:9] + KID[9:].upper(), id="mixed-case"),
    pytest.param(KID.replace("-", ""), id="no-dashes"),
    pytest.param(KID.replace("-", "_"), id="underscores"),
    pytest.param("{" + KID + "}", id="braces"),
    pytest.param("urn:uuid:" + KID, id="urn"),
    pytest.param(KID + "\n", id="trailing-newline"),
    pytest.param(" " + KID, id="leading-space"),
    pytest.param(KID[:-1], id="one-short"),
    pytest.param(KID + "0", id="one-long"),
    pytest.param(KID[:-1] + "g", id="not-hex"),
    pytest.param(KID[:-1] + "\uff10", id="fullwidth-digit"),
    pytest.param(KID + "/../x", id="traversal"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("text", ODD_IDS)
def test_a_kernel_id_accepted_by_one_parser_is_accepted_by_all(text: str) -> None:
    canonical = is_kernel_id(text)
    assert gateway_accepts(text) is canonical, "gateway listing"
    assert kube_label_accepts(text) is canonical, "kernel_id pod label"
    # A connection file may spell the id in capitals: it names the same kernel, lowercased, or nothing.
    named = connection_file_id(text)
    assert named == canonical_kernel_id(text)
    assert named is None or (is_kernel_id(named) and gateway_accepts(named) and kube_label_accepts(named))
    assert canonical is (named == text)


@given(st.from_regex(r"[0-9a-fA-F_-]{30,40}\n?", fullmatch=True) | st.uuids().map(str))
def test_kernel_id_parsers_agree_on_any_text(text: str) -> None:
    assert gateway_accepts(text) is is_kernel_id(text)
    named = connection_file_id(text)
    assert named == canonical_kernel_id(text)
    assert named is None or is_kernel_id(named)


# --------------------------------------------------------------------------- nothing spells a vocabulary again

VOCABULARY_MODULES = {"core/modes.py", "core/verdicts.py", "core/actions.py", "core/results.py", "core/keys.py",
                      "core/sources.py", "core/kernelids.py", "core/labels.py"}  # fmt: skip
# Strings that only a vocabulary means (common words such as "none", "unknown", "success" are prose elsewhere).
DISTINCTIVE = {
    *results.ACTION_RESULTS, *results.EVICTION_RESULTS, *modes.MODES, sources.HUB_GATEWAY, sources.KUBEFLOW_GATEWAY,
    *(a.value for a in ActionKind), *labels.BREAKER_CAUSES, keys.KERNEL_PREFIX, keys.POD_PREFIX, keys.SERVER_PREFIX, keys.NOTEBOOK_PREFIX,
} - {"none", "auto", "success", "failed", "blocked", "skipped", "verified", "released", "forbidden", "conflict"}  # fmt: skip
# Where such a string is not the vocabulary: (module, value) -> why.
ALLOWED = {
    ("app/cli.py", "enforce"): "the argparse dest of --enforce",
}


def _code_strings(path: Path) -> Iterator[tuple[int, str]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_module_spells_a_vocabulary_string_again() -> None:
    found = []
    used = set(ALLOWED)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in VOCABULARY_MODULES or "_podresources_pb" in rel:
            continue
        for line, value in _code_strings(path):
            if value in DISTINCTIVE and (rel, value) not in ALLOWED:
                found.append(f"{rel}:{line}: {value!r}")
            used.discard((rel, value))
    assert found == []
    assert used == set(), "allowed spellings that no longer occur: drop them from ALLOWED"


def test_one_uuid_pattern_for_kernel_ids() -> None:
    spelled = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if re.search(r"\{8\}-", path.read_text(encoding="utf-8"))
    ]
    assert spelled == ["core/kernelids.py"]

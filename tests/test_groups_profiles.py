"""Policies matching JupyterHub groups and KubeSpawner profiles (issue 13 item 5): "GPU profile for the research
group: 1 h; course group: 20 min" is one config. The policy table, the hub's user model parsed, and a real
JupyterHub with groups and a server started with a profile, end to end through the daemon."""

from __future__ import annotations

import dataclasses

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from reclaimer.observe import hub as hub_mod
from reclaimer.core.config import ConfigError, parse_settings
from reclaimer.app.daemon import Daemon, build_adapters
from reclaimer.app.demo import free_port
from reclaimer.observe.jupyter_rest import BadAnswer
from reclaimer.observe.hub import HubClient
from reclaimer.core.verdicts import Verdict
from reclaimer.core.model import Candidate, ProcessSample, ServerRef
from reclaimer.core.policy import choose_policy, decide
from reclaimer.core.model import PolicyState
from tests.support.jupyter_fixtures import (
    JupyterProcess,
    kernel_pid,
    spawn_servers,
    start_kernel,
)
from tests.support.nvml_fixtures import FakeGpu, FakeNvml, FakeProcess, gpu_uuid
from tests.support.policy_fixtures import NOW, WARNED, activity, kernel, make_settings, pod, series, snapshot

GIB = 1024**3

ONE_CONFIG = [
    {"name": "research-gpu", "match": {"groups": ["research"], "profiles": ["gpu"]}, "idle_after": "1h",
     "warn_before": "5m"},
    {"name": "course", "match": {"groups": ["course"]}, "idle_after": "20m", "warn_before": "5m"},
    {"name": "default", "idle_after": "4h", "warn_before": "10m"},
]


def server(user: str = "alice", *, groups: tuple[str, ...] | None = ("research",), profile: str | None = "gpu",
           options_known: bool = True) -> ServerRef:
    return ServerRef(user=user, server_name="", url=f"/user/{user}/", ready=True, groups=groups, profile=profile,
                     options_known=options_known)


def idle_kernel(minutes: float, srv: ServerRef | None, user: str | None = "alice", with_pod: bool = True) -> Candidate:
    return kernel(act=activity(idle_for=minutes * 60), server=srv, user=user,
                  pod_info=pod(user=user) if with_pod else None)


def verdict_of(c: Candidate, idle_minutes: float) -> Any:
    settings = make_settings(policies=ONE_CONFIG, limits={"max_fraction_per_cycle": 1.0})
    start = NOW - 6 * 3600
    snap = snapshot(series(start=start, processes=(ProcessSample(4242, 2 * GIB),)), started_at=start)
    c = dataclasses.replace(c, held_since=start)  # invariant 10: on its GPU since sampling began
    (d,) = decide([c], snap, settings, NOW, WARNED)  # invariant 11: warned long ago
    return d


@pytest.mark.parametrize(
    "candidate, idle_minutes, policy, verdict",
    [
        pytest.param(idle_kernel(40, server()), 40, "research-gpu", Verdict.KEEP, id="research-gpu-40m-kept"),
        pytest.param(idle_kernel(70, server()), 70, "research-gpu", Verdict.RECLAIM, id="research-gpu-70m-reclaimed"),
        pytest.param(idle_kernel(25, server("bob", groups=("course",), profile=None)), 25, "course", Verdict.RECLAIM,
                     id="course-25m-reclaimed"),
        pytest.param(idle_kernel(10, server("bob", groups=("course",), profile="gpu")), 10, "course", Verdict.KEEP,
                     id="course-10m-kept"),
        # Research with the cpu profile is not the research GPU policy: the next matching one decides.
        pytest.param(idle_kernel(70, server(profile="cpu")), 70, "default", Verdict.KEEP,
                     id="research-other-profile-falls-through"),
        pytest.param(idle_kernel(70, server(profile=None)), 70, "default", Verdict.KEEP,
                     id="no-profile-chosen-matches-no-profile"),
        # In both groups: the first policy wins (research-gpu, 1h), never the shorter course window.
        pytest.param(idle_kernel(25, server(groups=("course", "research"))), 25, "research-gpu", Verdict.KEEP,
                     id="both-groups-first-policy-wins"),
        # A kernel of no JupyterHub user (a plain gateway kernel) matches no group policy.
        pytest.param(idle_kernel(5 * 60, None, user=None, with_pod=False), 300, "default", Verdict.RECLAIM,
                     id="no-user-default-policy"),
    ],
)
def test_one_config_for_groups_and_profiles(candidate: Candidate, idle_minutes: float, policy: str,
                                            verdict: Verdict) -> None:
    d = verdict_of(candidate, idle_minutes)
    assert (d.policy, d.verdict) == (policy, verdict), d.reason


@pytest.mark.parametrize(
    "candidate, reason",
    [
        pytest.param(idle_kernel(25, server(groups=None)), "the hub did not return alice's groups "
                     "(does the token have read:users:groups?)", id="groups-not-shown"),
        pytest.param(idle_kernel(25, None), "no hub server of user alice is known this cycle", id="no-hub-server"),
        pytest.param(idle_kernel(25, server(profile=None, options_known=False)),
                     "the server's user_options are not readable", id="profile-unreadable"),
    ],
)
def test_unknown_hub_facts_are_unknown_never_a_shorter_policy(candidate: Candidate, reason: str) -> None:
    """Without the user's groups the course policy (20 min) must not be applied to a research user: unknown."""
    d = verdict_of(candidate, 25)
    assert d.verdict is Verdict.UNKNOWN and reason in d.reason and d.policy is None
    settings = make_settings(policies=ONE_CONFIG)
    assert choose_policy(candidate, settings, {})[0] is None


def test_config_accepts_groups_and_profiles_and_names_a_bad_value() -> None:
    settings = make_settings(policies=ONE_CONFIG)
    assert settings.policies[0].match.groups == ("research",) and settings.policies[0].match.profiles == ("gpu",)
    bad = yaml.safe_dump({"policies": [{"name": "p", "match": {"groups": "research"}}]})
    with pytest.raises(ConfigError, match=r"policies\[0\]\.match\.groups \(line \d+\): must be a list"):
        parse_settings(bad, "<test>")


# --------------------------------------------------------------------------- the hub's user model


@pytest.mark.parametrize(
    "user, groups, profile, known",
    [
        pytest.param({"groups": ["research", "admins"]}, ("admins", "research"), "gpu", True, id="groups-and-profile"),
        pytest.param({}, None, "gpu", True, id="no-groups-key-unknown"),
        pytest.param({"groups": []}, (), "gpu", True, id="no-groups"),
    ],
)
def test_hub_user_model_gives_groups_and_profile(user: dict[str, Any], groups: Any, profile: Any, known: bool) -> None:
    model = {"name": "alice", **user, "servers": {"": {"url": "/user/alice/", "ready": True,
                                                      "user_options": {"profile": "gpu"}}}}
    (ref,) = hub_mod._servers_of(model)
    assert (ref.groups, ref.profile, ref.options_known) == (groups, profile, known)


@pytest.mark.parametrize(
    "options, profile, known",
    [
        pytest.param({}, None, True, id="no-profile-chosen"),
        pytest.param(None, None, True, id="null-options"),
        pytest.param({"profile": 3}, None, False, id="not-a-string"),
        pytest.param("gpu", None, False, id="options-not-a-mapping"),
        pytest.param(..., None, False, id="options-not-shown"),
    ],
)
def test_hub_server_profile(options: Any, profile: Any, known: bool) -> None:
    model: dict[str, Any] = {"url": "/user/alice/", "ready": True}
    if options is not ...:
        model["user_options"] = options
    (ref,) = hub_mod._servers_of({"name": "alice", "groups": [], "servers": {"": model}})
    assert (ref.profile, ref.options_known) == (profile, known)


def test_hub_garbled_groups_are_a_bad_answer() -> None:
    with pytest.raises(BadAnswer, match="'groups' is not a list"):
        hub_mod._servers_of({"name": "alice", "groups": "research", "servers": {}})


# --------------------------------------------------------------------------- a real JupyterHub with groups


async def test_real_hub_gives_groups_and_the_servers_profile(jupyterhub: JupyterProcess,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    hub = jupyterhub
    await asyncio.to_thread(spawn_servers, hub, ("alice", "prof"), ("bob", "plain"),
                            options={("alice", "prof"): {"profile": "gpu"}})
    monkeypatch.setenv("GROUPS_HUB_TOKEN", hub.token)
    client = HubClient(parse_settings(f'hub: {{url: "{hub.url}", token_env: GROUPS_HUB_TOKEN}}').hub)
    try:
        servers = {(s.user, s.server_name): s for s in (await client.list_servers()) or ()}
    finally:
        await client.close()
    alice, bob = servers[("alice", "prof")], servers[("bob", "plain")]
    assert (alice.groups, alice.profile, alice.options_known) == (("research",), "gpu", True)
    assert (bob.groups, bob.profile, bob.options_known) == (("course",), None, True)


async def test_groups_and_profiles_e2e_against_a_real_hub(
    jupyterhub: JupyterProcess, fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One config, two users: bob (course group, short window) is reclaimed, alice (research group, GPU profile,
    long window) is kept with her policy named, both observed through the real hub."""
    hub = jupyterhub
    await asyncio.to_thread(spawn_servers, hub, ("alice", "gpu-e2e"), ("bob", "course-e2e"),
                            options={("alice", "gpu-e2e"): {"profile": "gpu"}})
    admin = hub.extra["admin_token"]
    kids, pids = {}, {}
    for user, name in (("alice", "gpu-e2e"), ("bob", "course-e2e")):
        url = f"{hub.url}/user/{user}/{name}"
        kids[user] = await start_kernel(url, admin)
        pids[user] = await kernel_pid(url, admin, kids[user])
    fake_nvml.write(gpus=[FakeGpu(uuid=gpu_uuid(0), util=0), FakeGpu(uuid=gpu_uuid(1), util=0)],
                    processes=[FakeProcess(pid=pids["alice"], gpu=0, memory=8 * GIB),
                               FakeProcess(pid=pids["bob"], gpu=1, memory=2 * GIB)])
    monkeypatch.setenv("GROUPS_E2E_TOKEN", hub.token)
    settings = parse_settings(f"""
mode: enforce
listen: 127.0.0.1:{free_port()}
sample_interval: 200ms
decide_interval: 500ms
gpu: {{backend: nvml, library_path: "{fake_nvml.lib_path}"}}
kubernetes: {{enabled: false}}
hub: {{url: "{hub.url}", token_env: GROUPS_E2E_TOKEN, timeout: 3s}}
policies:
  - {{name: research-gpu, match: {{groups: [research], profiles: [gpu]}}, idle_after: 1h, warn_before: 5m,
     action: shutdown-kernel}}
  - {{name: course, match: {{groups: [course]}}, idle_after: 3s, warn_before: 1s, action: shutdown-kernel}}
limits: {{max_fraction_per_cycle: 1.0}}
""")
    daemon = Daemon(settings, build_adapters(settings))
    seen: list[Any] = []
    daemon.on_cycle = lambda snap, results: seen.append((snap, list(results)))
    task = asyncio.create_task(daemon.run(serve=False))
    try:
        deadline = time.monotonic() + 60
        while not any(r.result == "success" for _, rs in seen for r in rs):
            assert time.monotonic() < deadline and not task.done(), [d.reason for s, _ in seen[-1:]
                                                                      for d in s.decisions]
            await asyncio.sleep(0.1)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 20)
    (done,) = [r for _, rs in seen for r in rs if r.result == "success"]
    assert done.decision.candidate.kernel_id == kids["bob"] and done.decision.policy == "course"
    alice = [d for s, _ in seen for d in s.decisions if d.candidate.kernel_id == kids["alice"]]
    observed = [d for d in alice if d.policy is not None]
    assert observed and all(d.policy == "research-gpu" and d.verdict is Verdict.KEEP for d in observed)
    assert not any(r.decision.candidate.kernel_id == kids["alice"] for _, rs in seen for r in rs)

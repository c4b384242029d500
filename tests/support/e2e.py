"""The ``e2e`` marker: which tests start real servers or processes, so ``pytest -m "not e2e"`` is the fast unit subset.

A pytest plugin (registered by tests/conftest.py):

- a test that uses a shared server fixture (``E2E_FIXTURES``) or a fixture decorated with ``@e2e_fixture`` (a module's
  own server or process), directly or through other fixtures, is marked ``e2e`` at collection, so a new test gets the
  marker by asking for the fixture;
- a test that starts a process itself (``subprocess``/``asyncio`` subprocesses: a private server, ``python -m
  reclaimer``, promtool, kubectl, ...) must carry ``@pytest.mark.e2e`` (or the module ``pytestmark``): a test without
  it that starts one fails, naming the command, so the unit subset cannot silently grow slow;
- a test module that imports a shared fixture by name (a second definition, so a second server per module) is refused
  at collection;
- the end of a run lists the servers started and the fake NVML builds, the numbers the suite's cost is made of.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import jupyter_fixtures, nvml_fixtures

# Fixtures that start (or share) a real server: a test that depends on one, directly or through another fixture, is e2e.
E2E_FIXTURES = jupyter_fixtures.SHARED_SERVER_FIXTURES
# Fixtures that must come from the plugins, once per session, never from a test module.
SHARED_FIXTURES = E2E_FIXTURES | {"fake_nvml_libs", "fake_nvml"}
# Session plumbing a unit test may set up: compiling the fake NVML (once per source, then cached).
PLUMBING_FIXTURES = frozenset({"fake_nvml_libs"})

_allowed = threading.local()
_E2E_FIXTURE_FUNCS: set[Any] = set()


def e2e_fixture(func: Any) -> Any:
    """Mark a fixture that starts a real server or process: every test using it is e2e. Put it under ``@pytest.fixture``:

        @pytest.fixture(scope="module")
        @e2e_fixture
        def prometheus(...): ...
    """
    _E2E_FIXTURE_FUNCS.add(func)
    return func


@contextlib.contextmanager
def subprocesses_allowed() -> Iterator[None]:
    """Let fixture plumbing (the fake NVML's compiler) start processes inside a unit test."""
    depth = getattr(_allowed, "depth", 0)
    _allowed.depth = depth + 1
    try:
        yield
    finally:
        _allowed.depth = depth


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    fixturemanager = config.pluginmanager.get_plugin("funcmanage")
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        e2e = bool(names & E2E_FIXTURES)
        for name in sorted(names):
            defs = fixturemanager.getfixturedefs(name, item) if fixturemanager else None
            if not defs:
                continue
            e2e = e2e or defs[-1].func in _E2E_FIXTURE_FUNCS
            if name in SHARED_FIXTURES and defs[-1].baseid:  # a plugin's fixture has no node id; a module's has its own
                raise pytest.UsageError(
                    f"{defs[-1].baseid} defines or imports the shared fixture {name!r}: remove it from that module "
                    "(tests/conftest.py registers it for every module; a second definition would start a second "
                    "server per module)")
        if e2e:
            item.add_marker(pytest.mark.e2e)


def _guarded(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is None


@contextlib.contextmanager
def _watch_processes(item: pytest.Item, phase: str) -> Iterator[None]:
    started: list[str] = []
    original = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def recording(self: Any, args: Any, *rest: Any, **kwargs: Any) -> Any:
        if not getattr(_allowed, "depth", 0):
            started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
        return original(self, args, *rest, **kwargs)

    subprocess.Popen._execute_child = recording  # type: ignore[attr-defined]
    try:
        yield
    finally:
        subprocess.Popen._execute_child = original  # type: ignore[attr-defined]
    if started:
        raise pytest.fail.Exception(
            f"{item.nodeid} started a process during {phase} ({started[0][:160]!r}"
            f"{f' and {len(started) - 1} more' if len(started) > 1 else ''}) but is not marked e2e: add "
            "@pytest.mark.e2e to the test (or @e2e_fixture from tests/support/e2e.py to the fixture that starts it) so "
            "`pytest -m 'not e2e'` stays fast",
            pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    if fixturedef.argname not in PLUMBING_FIXTURES:
        return (yield)
    with subprocesses_allowed():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    if not _guarded(item):
        return (yield)
    with _watch_processes(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if not _guarded(item):
        return (yield)
    with _watch_processes(item, "the test"):
        return (yield)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    boots = ", ".join(f"{name} {n}" for name, n in sorted(jupyter_fixtures.BOOTS.items()))
    builds = nvml_fixtures.BUILDS["count"]
    if boots or builds:
        terminalreporter.write_line(f"servers started by tests/support: {boots or 'none'}; fake NVML compiled "
                                    f"{builds} time(s) (else reused from its cache)")

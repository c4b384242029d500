"""The test infrastructure itself: shared fixtures come from the plugins only, the e2e marker is applied and enforced,
the fake NVML is compiled once per source, and a shared server reaches each module without earlier modules' kernels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support import nvml_fixtures
from tests.support.jupyter_fixtures import (
    STARTED,
    JupyterProcess,
    JupyterTestError,
    end_leftover_kernels,
    kernel_model,
    start_kernel,
)

# pytest-benchmark asks git for the commit at start-up: off, so the inner runs start no process of their own.
PLUGINS = ["-p", "tests.support.jupyter_fixtures", "-p", "tests.support.nvml_fixtures", "-p", "tests.support.e2e",
           "-p", "no:benchmark"]


def _collect(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*PLUGINS, "--collect-only", "-q", "-p", "no:cacheprovider", *args)


def test_a_test_using_a_shared_server_is_marked_e2e_without_saying_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="""
        import pytest

        @pytest.fixture
        def hub_users(jupyterhub):  # through another fixture counts too
            return jupyterhub

        def test_server(jupyter_server): pass
        def test_indirect(hub_users): pass
        def test_pure(): pass
        @pytest.mark.e2e
        def test_marked(): pass
    """)
    e2e = _collect(pytester, "-m", "e2e")
    assert e2e.ret == 0
    e2e.stdout.fnmatch_lines(["test_x.py::test_server", "test_x.py::test_indirect", "test_x.py::test_marked",
                              "3/4 tests collected (1 deselected)*"])
    unit = _collect(pytester, "-m", "not e2e")
    unit.stdout.fnmatch_lines(["test_x.py::test_pure", "1/4 tests collected (3 deselected)*"])


@pytest.mark.parametrize("source", [
    pytest.param("from tests.support.jupyter_fixtures import jupyter_server\n"
                 "def test_x(jupyter_server): pass\n", id="imported-server"),
    pytest.param("from tests.support.nvml_fixtures import fake_nvml, fake_nvml_libs\n"
                 "def test_x(fake_nvml): pass\n", id="imported-nvml"),
    pytest.param("import pytest\n@pytest.fixture(scope='session')\ndef kernel_gateway(): yield object()\n"
                 "def test_x(kernel_gateway): pass\n", id="redefined"),
])
def test_a_module_that_imports_or_redefines_a_shared_fixture_is_refused(pytester: pytest.Pytester,
                                                                         source: str) -> None:
    pytester.makepyfile(test_y=source)
    result = _collect(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_y.py defines or imports the shared fixture *: remove it from that module*"])


def test_positive_control_a_module_that_asks_for_shared_fixtures_by_name_is_accepted(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_z="from tests.support.nvml_fixtures import FakeGpu\n"
                               "def test_x(fake_nvml, kernel_gateway): assert FakeGpu\n")
    assert _collect(pytester).ret == 0


@pytest.mark.e2e  # the inner tests start processes (`true`)
def test_an_unmarked_test_that_starts_a_process_fails_naming_the_command(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_w="""
        import asyncio, subprocess
        import pytest
        from tests.support.e2e import e2e_fixture

        def test_run(): subprocess.run(["true"], check=True)

        async def test_asyncio():
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()

        @pytest.fixture
        def server():
            subprocess.run(["true", "from-a-fixture"], check=True)

        def test_through_a_fixture(server): pass

        @pytest.fixture
        @e2e_fixture
        def own_server():
            subprocess.run(["true"], check=True)

        def test_through_an_e2e_fixture(own_server): pass

        @pytest.mark.e2e
        def test_marked(): subprocess.run(["true"], check=True)

        def test_pure(): assert 1 + 1 == 2
    """)
    result = pytester.runpytest(*PLUGINS, "-p", "no:cacheprovider", "-o", "asyncio_mode=auto")
    result.assert_outcomes(passed=3, failed=2, errors=1)
    result.stdout.fnmatch_lines([
        "*test_w.py::test_through_a_fixture started a process during setup ('true from-a-fixture')*",
        "*test_w.py::test_run started a process during the test ('true') but is not marked e2e*",
        "*test_w.py::test_asyncio started a process during the test ('true') but is not marked e2e*",
    ])


@pytest.mark.e2e  # runs the compiler
def test_the_fake_nvml_is_compiled_once_per_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECLAIMER_FAKE_NVML_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nvml_fixtures, "_built", None)  # as in a fresh test run
    before = nvml_fixtures.BUILDS["count"]
    first = nvml_fixtures.build_fake_nvml()
    assert nvml_fixtures.BUILDS["count"] == before + 1
    assert all((d / nvml_fixtures.SONAME).is_file() and d.is_relative_to(tmp_path / "cache") for d in first.values())
    assert set(first) == set(nvml_fixtures.VARIANTS)

    monkeypatch.setattr(nvml_fixtures, "_built", None)  # the next run: the same source is not compiled again
    assert nvml_fixtures.build_fake_nvml() == first and nvml_fixtures.BUILDS["count"] == before + 1

    changed = tmp_path / "fake_nvml.c"  # positive control: a changed source is compiled, beside the old build
    changed.write_text(nvml_fixtures.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(nvml_fixtures, "SOURCE", changed)
    monkeypatch.setattr(nvml_fixtures, "_built", None)
    second = nvml_fixtures.build_fake_nvml()
    assert nvml_fixtures.BUILDS["count"] == before + 2 and second != first
    assert all((d / nvml_fixtures.SONAME).is_file() for d in (*first.values(), *second.values()))


async def _gone(handle: JupyterProcess, kid: str) -> bool:
    try:
        await kernel_model(handle.url, handle.token, kid)
    except JupyterTestError as exc:
        return "404" in str(exc)
    return False


async def test_leftover_kernels_are_shut_down_on_a_listing_server(jupyter_server: JupyterProcess) -> None:
    kids = [await start_kernel(jupyter_server.url, jupyter_server.token) for _ in range(2)]
    await asyncio.to_thread(end_leftover_kernels, jupyter_server, True)
    assert [await _gone(jupyter_server, kid) for kid in kids] == [True, True]


async def test_leftover_kernels_are_shut_down_where_listing_is_refused(kernel_gateway_unlisted: JupyterProcess) -> None:
    kg = kernel_gateway_unlisted
    kid = await start_kernel(kg.url, kg.token)
    assert (kg.url, kg.token, kid) in STARTED
    await asyncio.to_thread(end_leftover_kernels, kg, False)
    assert await _gone(kg, kid) and (kg.url, kg.token, kid) not in STARTED

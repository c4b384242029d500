"""The `reclaimer` command: parsing, environment defaults, help text, exit codes and dispatch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reclaimer.app.cli import EnvOption, build_parser, main, parse_args
from reclaimer.core.config import ConfigError, ConfigIssue, Settings
from reclaimer.core.errors import ReclaimerError, StartupError
from reclaimer.export.logs import reset_logging

REPO = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "reclaimer"

GOOD = """\
mode: dry-run
gateways:
  - {name: eg, url: "http://eg:8888", token_env: EG_TOKEN}
  - {name: js, url: "http://js:8888"}
policies:
  - name: short
    idle_after: 10m
    warn_before: 2m
    action: none
  - name: default
"""

BAD = """\
mode: dry-run
policies:
  - name: default
    idle_afer: 30m
limits:
  cooldown: soon
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts with no RECLAIMER_* variable; logging set up by a command is undone afterwards."""
    for name in [n for n in os.environ if n.startswith("RECLAIMER_")]:
        monkeypatch.delenv(name)
    yield
    reset_logging()


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


class Recorder:
    """Stands in for a not-yet-written or heavyweight subcommand module: records its call, returns ``result``."""

    def __init__(self, result: Any = 0) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.result = result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    module = types.ModuleType("reclaimer.app.daemon")
    module.run_daemon = Recorder()  # type: ignore[attr-defined]
    module.run_report = Recorder()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "reclaimer.app.daemon", module)
    return types.SimpleNamespace(run=module.run_daemon, report=module.run_report)


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    module = types.ModuleType("reclaimer.app.demo")
    recorder = Recorder()

    def run_demo(duration: float = 90.0, port: int = 9400, live: bool | None = None, keep_going: bool = False) -> int:
        return int(recorder(duration=duration, port=port, live=live, keep_going=keep_going))

    module.run_demo = run_demo  # type: ignore[attr-defined]
    module.missing_demo_dependencies = list  # type: ignore[attr-defined]  # the demo extra is installed
    module.DEMO_INSTALL = "pip install 'gpu-reclaimer[demo]'"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "reclaimer.app.demo", module)
    return recorder


# --------------------------------------------------------------------------- check-config


def test_check_config_ok_prints_a_summary(good_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(good_file)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{good_file}: OK"
    assert "mode: dry-run" in out and "gateways: 2: eg (http://eg:8888), js (http://js:8888)" in out
    assert "policies: 2" in out and "short: none after 10m" in out


def test_check_config_bad_lists_every_issue_with_lines(bad_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(bad_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{bad_file}: invalid configuration",
        "  policies[0].idle_afer (line 4): unknown key (check the spelling; unknown keys are errors)",
        "  limits.cooldown (line 6): not a duration: 'soon' (use e.g. 90s, 15m, 2h, 1h30m)",
    ]


def test_check_config_reads_the_file_from_the_environment(
    good_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECLAIMER_CONFIG", str(good_file))
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out.startswith(f"{good_file}: OK")


def test_check_config_without_a_file_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 2
    assert "FILE is required (or set RECLAIMER_CONFIG)" in capsys.readouterr().err


def test_missing_config_file_is_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err


# --------------------------------------------------------------------------- real processes


@pytest.mark.e2e
def test_python_dash_m_help_lists_the_commands() -> None:
    done = subprocess.run([sys.executable, "-m", "reclaimer", "--help"], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    for command in ("run", "report", "check-config", "demo"):
        assert command in done.stdout


@pytest.mark.e2e
def test_console_script_check_config_bad_file_exits_2_with_lines(bad_file: Path) -> None:
    assert CONSOLE_SCRIPT.exists(), "the package must be installed (pip install -e '.[test]')"
    done = subprocess.run([str(CONSOLE_SCRIPT), "check-config", str(bad_file)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "(line 4)" in done.stderr and "(line 6)" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.e2e
def test_console_script_bad_env_value_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "RECLAIMER_WINDOW": "forever"}
    done = subprocess.run([str(CONSOLE_SCRIPT), "report"], capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path)
    assert done.returncode == 2
    assert "RECLAIMER_WINDOW" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- environment defaults, flags win


@pytest.mark.parametrize(
    ("argv", "env", "attr", "expected"),
    [
        pytest.param(["report"], {}, "window", 10.0, id="window-default"),
        pytest.param(["report"], {"RECLAIMER_WINDOW": "30s"}, "window", 30.0, id="window-env"),
        pytest.param(["report", "--window", "1m"], {"RECLAIMER_WINDOW": "30s"}, "window", 60.0, id="window-flag-wins"),
        pytest.param(["report"], {}, "output", "table", id="output-default"),
        pytest.param(["report"], {"RECLAIMER_OUTPUT": "json"}, "output", "json", id="output-env"),
        pytest.param(["report", "-o", "table"], {"RECLAIMER_OUTPUT": "json"}, "output", "table",
                     id="output-flag-wins"),
        pytest.param(["report"], {}, "from", None, id="from-default"),
        pytest.param(["report"], {"RECLAIMER_FROM": "http://n1:9400/"}, "from", "http://n1:9400", id="from-env"),
        pytest.param(["report", "--from", "http://n2:9400"], {"RECLAIMER_FROM": "http://n1:9400"}, "from",
                     "http://n2:9400", id="from-flag-wins"),
        pytest.param(["report"], {"RECLAIMER_CONFIG": "/etc/r.yaml"}, "config", "/etc/r.yaml", id="config-env"),
        pytest.param(["report", "-c", "x.yaml"], {"RECLAIMER_CONFIG": "/etc/r.yaml"}, "config", "x.yaml",
                     id="config-flag-wins"),
        pytest.param(["run"], {}, "once", False, id="once-default"),
        pytest.param(["run"], {"RECLAIMER_ONCE": "yes"}, "once", True, id="once-env"),
        pytest.param(["run"], {"RECLAIMER_ONCE": "0"}, "once", False, id="once-env-false"),
        pytest.param(["run"], {"RECLAIMER_ONCE": ""}, "once", False, id="empty-env-is-unset"),
        pytest.param(["run", "--once"], {"RECLAIMER_ONCE": "false"}, "once", True, id="once-flag-wins"),
        pytest.param(["run"], {"RECLAIMER_LOG_LEVEL": "DEBUG"}, "log_level", "debug", id="log-level-env"),
        pytest.param(["demo"], {}, "duration", 90.0, id="duration-default"),
        pytest.param(["demo"], {"RECLAIMER_DURATION": "2m"}, "duration", 120.0, id="duration-env"),
        pytest.param(["demo", "--duration", "45s"], {"RECLAIMER_DURATION": "2m"}, "duration", 45.0,
                     id="duration-flag-wins"),
        pytest.param(["demo"], {}, "port", 9400, id="port-default"),
        pytest.param(["demo"], {"RECLAIMER_PORT": "9500"}, "port", 9500, id="port-env"),
        pytest.param(["demo", "--port", "0"], {"RECLAIMER_PORT": "9500"}, "port", 0, id="port-flag-wins"),
        pytest.param(["demo"], {"RECLAIMER_KEEP_GOING": "on"}, "keep_going", True, id="keep-going-env"),
        pytest.param(["demo"], {}, "live", None, id="live-default-auto"),
        pytest.param(["demo"], {"RECLAIMER_LIVE": "false"}, "live", False, id="live-env"),
        pytest.param(["demo", "--live"], {"RECLAIMER_LIVE": "false"}, "live", True, id="live-flag-wins"),
        pytest.param(["demo", "--no-live"], {"RECLAIMER_LIVE": "true"}, "live", False, id="no-live-flag-wins"),
    ],
)
def test_env_defaults_and_flags_win(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], attr: str, expected: Any
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert getattr(parse_args(argv), attr) == expected


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        pytest.param(["report"], {"RECLAIMER_WINDOW": "forever"}, "RECLAIMER_WINDOW", id="bad-window-env"),
        pytest.param(["report"], {"RECLAIMER_WINDOW": "0"}, "RECLAIMER_WINDOW", id="zero-window-env"),
        pytest.param(["report"], {"RECLAIMER_OUTPUT": "yaml"}, "RECLAIMER_OUTPUT", id="bad-output-env"),
        pytest.param(["report"], {"RECLAIMER_FROM": "n1:9400"}, "RECLAIMER_FROM", id="bad-from-env"),
        pytest.param(["run"], {"RECLAIMER_ONCE": "maybe"}, "RECLAIMER_ONCE", id="bad-bool-env"),
        pytest.param(["run"], {"RECLAIMER_MODE": "yolo"}, "RECLAIMER_MODE", id="bad-mode-env"),
        pytest.param(["run"], {"RECLAIMER_ENFORCE": "sure"}, "RECLAIMER_ENFORCE", id="bad-enforce-env"),
        pytest.param(["run"], {"RECLAIMER_LOG_LEVEL": "loud"}, "RECLAIMER_LOG_LEVEL", id="bad-log-level-env"),
        pytest.param(["demo"], {"RECLAIMER_PORT": "99999"}, "RECLAIMER_PORT", id="bad-port-env"),
        pytest.param(["run"], {"RECLAIMER_ENFORCE": "1", "RECLAIMER_DRY_RUN": "1"}, "conflicting mode",
                     id="conflicting-mode-env"),
        pytest.param(["run"], {"RECLAIMER_MODE": "dry-run", "RECLAIMER_ENFORCE": "true"}, "RECLAIMER_MODE=dry-run",
                     id="mode-env-against-enforce-env"),
        pytest.param(["run", "--dry-run", "--enforce"], {}, "not allowed with", id="dry-run-with-enforce"),
        pytest.param(["report", "--window", "soon"], {}, "--window", id="bad-window-flag"),
        pytest.param(["report", "--from", "http://u:p@n1:9400"], {}, "credentials", id="from-with-credentials"),
        pytest.param(["report", "-o", "xml"], {}, "--output", id="bad-output-flag"),
        pytest.param([], {}, "required", id="no-command"),
        pytest.param(["explode"], {}, "invalid choice", id="unknown-command"),
    ],
)
def test_usage_errors_exit_2_naming_the_culprit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str],
    words: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "usage:" in err and "Traceback" not in err


# --------------------------------------------------------------------------- run: mode resolution and dispatch


@pytest.mark.parametrize(
    ("file_mode", "argv", "env", "mode"),
    [
        pytest.param("dry-run", [], {}, "dry-run", id="file-dry-run"),
        pytest.param("enforce", [], {}, "enforce", id="file-enforce"),
        pytest.param("dry-run", ["--enforce"], {}, "enforce", id="flag-overrides-file"),
        pytest.param("enforce", ["--dry-run"], {}, "dry-run", id="dry-run-flag-overrides-file"),
        pytest.param("dry-run", [], {"RECLAIMER_MODE": "enforce"}, "enforce", id="mode-env"),
        pytest.param("dry-run", [], {"RECLAIMER_ENFORCE": "1"}, "enforce", id="enforce-env"),
        pytest.param("enforce", [], {"RECLAIMER_DRY_RUN": "true"}, "dry-run", id="dry-run-env"),
        pytest.param("enforce", [], {"RECLAIMER_ENFORCE": "0"}, "enforce", id="enforce-env-false-leaves-file"),
        pytest.param("dry-run", [], {"RECLAIMER_DRY_RUN": "0"}, "dry-run", id="dry-run-env-false-never-enforces"),
        pytest.param("enforce", ["--dry-run"], {"RECLAIMER_ENFORCE": "1"}, "dry-run", id="flag-beats-env"),
        pytest.param("dry-run", ["--enforce"], {"RECLAIMER_MODE": "dry-run"}, "enforce", id="flag-beats-mode-env"),
        pytest.param("dry-run", [], {"RECLAIMER_MODE": "enforce", "RECLAIMER_ENFORCE": "1"}, "enforce",
                     id="agreeing-env"),
    ],
)
def test_run_mode_comes_from_flag_then_env_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, daemon: types.SimpleNamespace, file_mode: str,
    argv: list[str], env: dict[str, str], mode: str,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"mode: {file_mode}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["run", "--config", str(config), *argv]) == 0
    ((args, kwargs),) = daemon.run.calls
    (settings,) = args
    assert isinstance(settings, Settings) and settings.mode == mode
    assert kwargs == {"once": False}


def test_run_passes_once_and_log_level_and_returns_the_daemons_code(
    good_file: Path, monkeypatch: pytest.MonkeyPatch, daemon: types.SimpleNamespace
) -> None:
    daemon.run.result = 4
    monkeypatch.setenv("RECLAIMER_CONFIG", str(good_file))
    assert main(["run", "--once", "--log-level", "debug"]) == 4
    ((args, kwargs),) = daemon.run.calls
    assert kwargs == {"once": True}
    assert args[0].log_level == "debug" and [g.name for g in args[0].gateways] == ["eg", "js"]


def test_run_without_config_uses_the_defaults(daemon: types.SimpleNamespace) -> None:
    assert main(["run"]) == 0
    ((args, _),) = daemon.run.calls
    assert args[0].mode == "dry-run" and args[0].policies[0].name == "default"


def test_run_with_an_invalid_config_never_reaches_the_daemon(
    bad_file: Path, daemon: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(bad_file), "--enforce"]) == 2
    assert daemon.run.calls == []
    assert "(line 4)" in capsys.readouterr().err


# --------------------------------------------------------------------------- report and demo dispatch


def test_report_passes_window_output_and_source(good_file: Path, daemon: types.SimpleNamespace) -> None:
    argv = ["report", "-c", str(good_file), "--from", "http://node-1:9400/", "-o", "json", "--window", "1m30s",
            "--token-file", "/run/secrets/reclaimer/token"]
    assert main(argv) == 0
    ((args, kwargs),) = daemon.report.calls
    assert isinstance(args[0], Settings) and args[0].gateways[0].name == "eg"
    assert kwargs == {"window": 90.0, "output": "json", "source_url": "http://node-1:9400",
                      "token_file": "/run/secrets/reclaimer/token"}


def test_report_token_file_from_the_environment(daemon: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECLAIMER_TOKEN_FILE", "/etc/token")
    assert main(["report", "--from", "http://node-1:9400"]) == 0
    ((_, kwargs),) = daemon.report.calls
    assert kwargs["token_file"] == "/etc/token"


def test_report_defaults(daemon: types.SimpleNamespace) -> None:
    assert main(["report"]) == 0
    ((_, kwargs),) = daemon.report.calls
    assert kwargs == {"window": 10.0, "output": "table", "source_url": None, "token_file": None}


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        pytest.param([], {}, {"duration": 90.0, "port": 9400, "live": False, "keep_going": False},
                     id="defaults-not-a-tty"),
        pytest.param(["--duration", "2m", "--port", "9555", "--live"], {}, {"duration": 120.0, "port": 9555,
                     "live": True, "keep_going": False}, id="flags"),
        pytest.param([], {"RECLAIMER_LIVE": "1", "RECLAIMER_PORT": "0"}, {"duration": 90.0, "port": 0, "live": True,
                     "keep_going": False}, id="env"),
    ],
)
def test_demo_dispatch(
    monkeypatch: pytest.MonkeyPatch, demo: Recorder, argv: list[str], env: dict[str, str], expected: dict[str, Any]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["demo", *argv]) == 0  # under pytest stdout is not a terminal: no live table unless asked
    assert demo.calls == [((), expected)]


def test_demo_keep_going_is_passed(demo: Recorder) -> None:
    assert main(["demo", "--keep-going", "--no-live"]) == 0
    assert demo.calls == [((), {"duration": 90.0, "port": 9400, "live": False, "keep_going": True})]


# --------------------------------------------------------------------------- exit codes of runtime outcomes


@pytest.mark.parametrize(
    ("raised", "code", "stderr"),
    [
        pytest.param(StartupError("NVML is not available: libnvidia-ml.so.1 not found"), 1,
                     "reclaimer: NVML is not available: libnvidia-ml.so.1 not found\n", id="startup-error"),
        pytest.param(ReclaimerError("cannot read http://n1:9400/report: refused"), 1,
                     "reclaimer: cannot read http://n1:9400/report: refused\n", id="reclaimer-error"),
        pytest.param(ConfigError("<demo>", [ConfigIssue("listen", None, "must be HOST:PORT")]), 2,
                     "<demo>: invalid configuration\n  listen: must be HOST:PORT\n", id="late-config-error"),
        pytest.param(KeyboardInterrupt(), 130, "", id="interrupted-quietly"),
    ],
)
def test_expected_errors_become_exit_codes_without_traceback(
    daemon: types.SimpleNamespace, capsys: pytest.CaptureFixture[str], raised: BaseException, code: int, stderr: str
) -> None:
    daemon.run.result = raised
    assert main(["run"]) == code
    assert capsys.readouterr().err == stderr


def test_unexpected_errors_keep_their_traceback(daemon: types.SimpleNamespace) -> None:
    daemon.run.result = ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        main(["run"])


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        pytest.param(["run"], "reclaimer.app.daemon", id="run"),
        pytest.param(["report"], "reclaimer.app.daemon", id="report"),
        pytest.param(["demo"], "reclaimer.app.demo", id="demo"),
    ],
)
def test_missing_module_is_exit_3_not_available_yet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import` raise ImportError
    assert main(argv) == 3
    assert capsys.readouterr().err.startswith(f"reclaimer {argv[0]}: not available yet")


@pytest.mark.parametrize(
    ("missing", "dist"),
    [
        pytest.param("rich", "rich", id="rich"),
        pytest.param("kernel_gateway", "jupyter-kernel-gateway", id="kernel-gateway"),
        pytest.param("ipykernel", "ipykernel", id="ipykernel"),
    ],
)
def test_demo_without_its_extra_says_which_and_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str, dist: str
) -> None:
    """The daemon's install lacks the demo's dependencies: one line naming the extra, the missing one, the command."""
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    assert main(["demo"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"reclaimer demo: needs the demo extra ({dist} not installed): ")
    assert "pip install 'gpu-reclaimer[demo]'" in err and "pip install '.[demo]'" in err


def test_demo_extra_is_complete_in_the_test_environment() -> None:
    """The control: with the test extra (which includes demo) installed nothing is missing."""
    from reclaimer.app.demo import missing_demo_dependencies

    assert missing_demo_dependencies() == []


@pytest.mark.e2e
def test_the_daemon_does_not_import_the_demo_dependencies() -> None:
    """rich and jupyter_client are not runtime dependencies: running the daemon's code paths must not need them."""
    code = (
        "import sys\n"
        "for name in ('rich', 'jupyter_client', 'kernel_gateway', 'ipykernel'):\n"
        "    sys.modules[name] = None\n"
        "import reclaimer.app.cli, reclaimer.app.daemon, reclaimer.app.cluster, reclaimer.act.actions\n"
        "import reclaimer.export.server, reclaimer.observe.hub, reclaimer.observe.kubeflow, reclaimer.observe.nvml\n"
        "sys.exit(reclaimer.app.cli.main(['--version']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------- help text


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_help_states_its_default_and_env_var() -> None:
    subparsers = _subparsers()
    assert set(subparsers) == {"run", "report", "check-config", "demo"}
    for name, sub in subparsers.items():
        env_of = {spec.dest: spec.env for spec in sub.get_default("env_specs")}
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and "default:" in action.help, f"{where}: help states no default"
            env = env_of.get(action.dest) or f"RECLAIMER_{action.dest.upper()}"
            assert f"env: {env}" in action.help, f"{where}: help does not name {env}"


def test_env_var_names_follow_the_flag_names() -> None:
    for sub in _subparsers().values():
        flags = {a.dest: a.option_strings for a in sub._actions}
        for spec in sub.get_default("env_specs"):
            assert isinstance(spec, EnvOption)
            long_flags = [f for f in flags[spec.dest] if f.startswith("--")]
            if long_flags:
                assert spec.env == "RECLAIMER_" + long_flags[0][2:].upper().replace("-", "_")


@pytest.mark.parametrize(
    ("command", "words"),
    [
        pytest.param("run", ["RECLAIMER_CONFIG", "RECLAIMER_ENFORCE", "RECLAIMER_DRY_RUN", "RECLAIMER_ONCE",
                             "RECLAIMER_LOG_LEVEL"], id="run"),
        pytest.param("report", ["RECLAIMER_FROM", "RECLAIMER_OUTPUT", "RECLAIMER_WINDOW", "default: 10s",
                                "default: table"], id="report"),
        pytest.param("check-config", ["RECLAIMER_CONFIG"], id="check-config"),
        pytest.param("demo", ["RECLAIMER_DURATION", "RECLAIMER_PORT", "RECLAIMER_KEEP_GOING", "RECLAIMER_LIVE",
                              "--no-live", "default: 9400"], id="demo"),
    ],
)
def test_help_output_names_defaults_and_env_vars(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str, words: list[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one help entry per line, so names are not split by wrapping
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out, f"{command} --help lacks {word!r}"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from reclaimer import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"reclaimer {__version__}"

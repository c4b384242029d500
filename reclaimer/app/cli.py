"""The `reclaimer` command: argparse, environment-variable defaults, exit codes.

Every flag ``--some-flag`` also reads ``RECLAIMER_SOME_FLAG``; a flag on the command line wins over the
environment, and an empty variable counts as unset. Exit codes: 0 ok, 1 runtime error (one line, no traceback),
2 usage or configuration error, 3 subcommand not available, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from reclaimer import __version__
from reclaimer.core.config import ConfigError, Settings, format_duration, load_settings, parse_duration
from reclaimer.core.errors import ReclaimerError
from reclaimer.core.modes import DRY_RUN, ENFORCE, MODES

ENV_PREFIX = "RECLAIMER_"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 130, 141
DEFAULT_WINDOW = 10.0
DEFAULT_DEMO_DURATION = 90.0
DEFAULT_DEMO_PORT = 9400
DEFAULT_CLUSTER_NAMESPACE = "gpu-reclaimer"  # deploy/base
DEFAULT_CLUSTER_SELECTOR = "app.kubernetes.io/name=gpu-reclaimer,app.kubernetes.io/component=node-agent"
DEFAULT_CLUSTER_CONCURRENCY = 16
DEFAULT_CLUSTER_DEADLINE = 30.0
OUTPUT_FORMATS = ("table", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


# --------------------------------------------------------------------------- value parsers (flags and env alike)


def duration_arg(text: str) -> float:
    """A positive duration (``90s``, ``15m``, ``1h30m``) in seconds; ArgumentTypeError names what is wrong."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0, got {text!r}")
    return seconds


def port_arg(text: str) -> int:
    """A TCP port 0..65535 (0: any free port)."""
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {text!r}")
    return int(text)


def positive_int_arg(text: str) -> int:
    """A whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def url_arg(text: str) -> str:
    """An http(s) base URL without credentials, query or fragment (``http://host:9400``)."""
    if re.match(r"^https?://[^/\s?#]*@", text, flags=re.I):
        raise argparse.ArgumentTypeError("must not carry credentials")
    if not re.match(r"^https?://[^/\s?#@]+(/[^\s?#]*)?$", text):
        raise argparse.ArgumentTypeError(f"must be an http(s) URL like http://host:9400, got {text!r}")
    return text.rstrip("/")


def bool_arg(text: str) -> bool:
    """1/0, true/false, yes/no, on/off (any case)."""
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise argparse.ArgumentTypeError(f"must be a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


def choice_arg(choices: Sequence[str]) -> Callable[[str], str]:
    """A parser accepting exactly one of ``choices`` (case-insensitive)."""

    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return word

    return parse


# --------------------------------------------------------------------------- options that also read the environment


@dataclass(frozen=True)
class EnvOption:
    """A flag whose unset value comes from ``env``, else ``default``."""

    dest: str
    env: str
    parse: Callable[[str], Any]
    default: Any


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _add(
    parser: argparse.ArgumentParser,
    specs: list[EnvOption],
    flags: Sequence[str],
    *,
    help: str,
    default: Any,
    shown_default: str | None = None,
    parse: Callable[[str], Any] | None = None,
    switch: bool = False,
    negatable: bool = False,
    **kwargs: Any,
) -> None:
    """Add a flag whose help states its default and its environment variable; record how to read that variable."""
    long_flag = next(f for f in flags if f.startswith("--"))
    env = _env_name(long_flag)
    dest = long_flag.lstrip("-").replace("-", "_")
    shown = shown_default if shown_default is not None else str(default)
    text = f"{help} (default: {shown}; env: {env})"
    if switch or negatable:
        action = argparse.BooleanOptionalAction if negatable else "store_true"
        parser.add_argument(*flags, dest=dest, action=action, default=None, help=text, **kwargs)
        specs.append(EnvOption(dest, env, bool_arg, default))
    else:
        assert parse is not None
        parser.add_argument(*flags, dest=dest, type=parse, default=None, help=text, **kwargs)
        specs.append(EnvOption(dest, env, parse, default))


def _apply_env(args: argparse.Namespace, parser: argparse.ArgumentParser, specs: Sequence[EnvOption]) -> None:
    """Fill every flag not given on the command line from its environment variable, else its default."""
    for spec in specs:
        if getattr(args, spec.dest) is not None:
            continue
        raw = os.environ.get(spec.env, "")
        if not raw.strip():
            setattr(args, spec.dest, spec.default)
            continue
        try:
            setattr(args, spec.dest, spec.parse(raw))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"environment variable {spec.env}: {exc}")


# --------------------------------------------------------------------------- the parser


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose help lines are wide enough for "(default: …; env: …)"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _formatter)
        super().__init__(*args, **kwargs)


_EPILOG = (
    "Every flag --some-flag also reads the environment variable RECLAIMER_SOME_FLAG; the flag wins, an empty\n"
    "variable counts as unset. Logs are JSON lines unless stdout is a terminal (RECLAIMER_LOG_FORMAT=json|console).\n"
    "Exit codes: 0 ok, 1 runtime error, 2 usage or configuration error, 3 not available, 130 interrupted."
)


def _config_flag(parser: argparse.ArgumentParser, specs: list[EnvOption]) -> None:
    _add(
        parser,
        specs,
        ["-c", "--config"],
        metavar="FILE",
        parse=str,
        default=None,
        shown_default="none, every setting at its default",
        help="YAML configuration file",
    )


def _add_run(subs: Any) -> None:
    specs: list[EnvOption] = []
    p = subs.add_parser(
        "run",
        help="run the daemon",
        epilog=_EPILOG,
        description="Run the per-node daemon: sample GPUs, attribute them to kernels, observe the\n"
        "gateways, decide by policy and act (dry-run unless told to enforce).",
    )
    _config_flag(p, specs)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        default=None,
        help="decide and record, never act (default: the file's mode, dry-run if unset; "
        "env: RECLAIMER_DRY_RUN=1 or RECLAIMER_MODE=dry-run)",
    )
    mode.add_argument(
        "--enforce",
        dest="enforce",
        action="store_true",
        default=None,
        help="act on the decisions (default: the file's mode; env: RECLAIMER_ENFORCE=1 or RECLAIMER_MODE=enforce)",
    )
    _add(
        p, specs, ["--once"], switch=True, default=False, help="run one full sample/observe/decide/act cycle, then exit"
    )
    _add(
        p,
        specs,
        ["--log-level"],
        parse=choice_arg(LOG_LEVELS),
        default=None,
        metavar="|".join(LOG_LEVELS),
        shown_default="the file's log_level, info if unset",
        help="log level",
    )
    _add(
        p,
        specs,
        ["--listen-token-file"],
        metavar="FILE",
        parse=str,
        default=None,
        shown_default="the file's listen_token_file, none if unset",
        help="require the bearer token in FILE on /metrics and /report (a mounted Secret)",
    )
    p.set_defaults(command="run", env_specs=specs, subparser=p)


def _add_report(subs: Any) -> None:
    specs: list[EnvOption] = []
    p = subs.add_parser(
        "report",
        help="show what is idle, why, and what the policy would do",
        description="One-shot report: sample this node for --window, observe, decide (never act);\n"
        "or read a running daemon's /report with --from; or every node's with --cluster\n"
        "(through the API server's pod proxy, with your own credentials).",
        epilog=_EPILOG,
    )
    _config_flag(p, specs)
    _add(
        p,
        specs,
        ["--from"],
        metavar="URL",
        parse=url_arg,
        default=None,
        shown_default="none: sample this node now",
        help="read the report of a running daemon, e.g. http://host:9400",
    )
    _add(
        p,
        specs,
        ["--token-file"],
        metavar="FILE",
        parse=str,
        default=None,
        shown_default="none: no Authorization header",
        help="with --from or --cluster: a file holding the bearer token the daemons' listen_token_file requires",
    )
    _add(
        p,
        specs,
        ["--cluster"],
        switch=True,
        default=False,
        help="read every daemon's /report through the API server's pod proxy (needs list pods and get "
        "pods/proxy in --namespace) and merge them, worst waste first",
    )
    _add(
        p,
        specs,
        ["--kubeconfig"],
        metavar="FILE",
        parse=str,
        default=None,
        shown_default="in-cluster, else $KUBECONFIG, else ~/.kube/config",
        help="with --cluster: the kubeconfig",
    )
    _add(
        p,
        specs,
        ["--namespace"],
        metavar="NS",
        parse=str,
        default=DEFAULT_CLUSTER_NAMESPACE,
        help="with --cluster: the daemons' namespace",
    )
    _add(
        p,
        specs,
        ["--selector"],
        metavar="LABELS",
        parse=str,
        default=DEFAULT_CLUSTER_SELECTOR,
        help="with --cluster: the daemon pods' label selector",
    )
    _add(
        p,
        specs,
        ["--concurrency"],
        metavar="N",
        parse=positive_int_arg,
        default=DEFAULT_CLUSTER_CONCURRENCY,
        help="with --cluster: nodes asked at once",
    )
    _add(
        p,
        specs,
        ["--deadline"],
        metavar="DURATION",
        parse=duration_arg,
        default=DEFAULT_CLUSTER_DEADLINE,
        shown_default=format_duration(DEFAULT_CLUSTER_DEADLINE),
        help="with --cluster: stop waiting after this long; nodes still silent are named",
    )
    _add(
        p,
        specs,
        ["-o", "--output"],
        parse=choice_arg(OUTPUT_FORMATS),
        default="table",
        metavar="|".join(OUTPUT_FORMATS),
        help="output format",
    )
    _add(
        p,
        specs,
        ["--window"],
        metavar="DURATION",
        parse=duration_arg,
        default=DEFAULT_WINDOW,
        shown_default=format_duration(DEFAULT_WINDOW),
        help="how long to sample before deciding (e.g. 30s, 2m)",
    )
    p.set_defaults(command="report", env_specs=specs, subparser=p)


def _add_check_config(subs: Any) -> None:
    p = subs.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration file: errors name the key path and line;\nexit 2 if invalid.",
        epilog=_EPILOG,
    )
    p.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        default=None,
        help="the YAML file (default: $RECLAIMER_CONFIG, required if that is unset; env: RECLAIMER_CONFIG)",
    )
    specs = [EnvOption("file", "RECLAIMER_CONFIG", str, None)]
    p.set_defaults(command="check-config", env_specs=specs, subparser=p)


def _add_demo(subs: Any) -> None:
    specs: list[EnvOption] = []
    p = subs.add_parser(
        "demo",
        help="a simulated GPU node with real Jupyter kernels",
        description="A whole simulated node: a real local Jupyter gateway with real kernels,\n"
        "simulated GPUs, the daemon in enforce mode with short thresholds; serves /metrics.",
        epilog=_EPILOG,
    )
    _add(
        p,
        specs,
        ["--duration"],
        metavar="DURATION",
        parse=duration_arg,
        default=DEFAULT_DEMO_DURATION,
        shown_default=format_duration(DEFAULT_DEMO_DURATION),
        help="stop after this long at most",
    )
    _add(
        p,
        specs,
        ["--port"],
        metavar="N",
        parse=port_arg,
        default=DEFAULT_DEMO_PORT,
        help="serve /metrics on 127.0.0.1:N (a free port if taken)",
    )
    _add(
        p,
        specs,
        ["--keep-going"],
        switch=True,
        default=False,
        help="keep running after the idle kernel is reclaimed, until --duration or Ctrl-C",
    )
    _add(
        p,
        specs,
        ["--live"],
        negatable=True,
        default=None,
        shown_default="on when stdout is a terminal",
        help="a live-updating table; --no-live prints plain lines",
    )
    p.set_defaults(command="demo", env_specs=specs, subparser=p)


def build_parser() -> argparse.ArgumentParser:
    """The full `reclaimer` parser. Flags default to None; ``parse_args`` fills them from the environment."""
    parser = _Parser(
        prog="reclaimer",
        description="Find Jupyter kernels holding idle GPUs, export the waste, reclaim by policy.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(title="commands", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_run(subs)
    _add_report(subs)
    _add_check_config(subs)
    _add_demo(subs)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` and fill unset flags from ``RECLAIMER_*`` variables; usage errors exit 2 via parser.error."""
    args = build_parser().parse_args(argv)
    _apply_env(args, args.subparser, args.env_specs)
    if args.command == "run":
        args.mode = _resolve_mode(args, args.subparser)
    if args.command == "report" and args.cluster and getattr(args, "from"):
        args.subparser.error("--cluster and --from exclude each other (--from reads one daemon)")
    if args.command == "check-config" and not args.file:
        args.subparser.error("FILE is required (or set RECLAIMER_CONFIG)")
    return args


def _resolve_mode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """--enforce / --dry-run, else the agreeing RECLAIMER_MODE / _ENFORCE / _DRY_RUN, else None (the file decides)."""
    if args.enforce:
        return ENFORCE
    if args.dry_run:
        return DRY_RUN
    wanted: dict[str, str] = {}
    raw_mode = os.environ.get("RECLAIMER_MODE", "").strip()
    if raw_mode:
        try:
            wanted["RECLAIMER_MODE"] = choice_arg(MODES)(raw_mode)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"environment variable RECLAIMER_MODE: {exc}")
    for env, mode in (("RECLAIMER_ENFORCE", ENFORCE), ("RECLAIMER_DRY_RUN", DRY_RUN)):
        raw = os.environ.get(env, "").strip()
        if not raw:
            continue
        try:
            if bool_arg(raw):  # "0"/"false" means "not asked for", never the opposite mode
                wanted[env] = mode
        except argparse.ArgumentTypeError as exc:
            parser.error(f"environment variable {env}: {exc}")
    if len(set(wanted.values())) > 1:
        given = ", ".join(f"{k}={os.environ[k].strip()}" for k in wanted)
        parser.error(f"conflicting mode in the environment: {given}; set only one")
    return next(iter(wanted.values()), None)


# --------------------------------------------------------------------------- commands


def _not_available(command: str, exc: ImportError) -> int:
    print(f"reclaimer {command}: not available yet ({exc})", file=sys.stderr)
    return EXIT_UNAVAILABLE


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `reclaimer run`'s flags (or their RECLAIMER_* variables) set over the file's."""
    overrides: dict[str, Any] = {}
    if args.mode:
        overrides["mode"] = args.mode
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.listen_token_file:
        overrides["listen_token_file"] = args.listen_token_file
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    """`reclaimer run`: load the config with the flags' overrides, then hand over to the daemon."""
    settings = load_settings(args.config, run_overrides(args))
    try:
        from reclaimer.app.daemon import run_daemon
    except ImportError as exc:
        return _not_available("run", exc)
    return int(run_daemon(settings, once=args.once))


def cmd_report(args: argparse.Namespace) -> int:
    """`reclaimer report`: one-shot, from a running daemon's /report, or every daemon's (--cluster)."""
    if args.cluster:
        try:
            from reclaimer.app.cluster import run_cluster_report
        except ImportError as exc:
            return _not_available("report --cluster", exc)
        return int(run_cluster_report(args))
    settings = load_settings(args.config)
    try:
        from reclaimer.app.daemon import run_report
    except ImportError as exc:
        return _not_available("report", exc)
    return int(
        run_report(
            settings,
            window=args.window,
            output=args.output,
            source_url=getattr(args, "from"),
            token_file=args.token_file,
        )
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    """`reclaimer check-config FILE`: "FILE: OK" and a summary, or the issues (ConfigError, exit 2)."""
    settings = load_settings(args.file)
    print(f"{args.file}: OK")
    print(summarize(settings))
    return EXIT_OK


def summarize(settings: Settings) -> str:
    """A few lines an operator reads to confirm the file says what they meant."""
    gateways = ", ".join(f"{g.name} ({g.url})" for g in settings.gateways) or "none"
    lines = [
        f"  mode: {settings.mode}",
        f"  gateways: {len(settings.gateways)}: {gateways}",
        f"  hub: {settings.hub.url if settings.hub else 'none'}",
        f"  policies: {len(settings.policies)} (first match wins)",
    ]
    for p in settings.policies:
        lines.append(
            f"    {p.name}: {p.action} after {format_duration(p.idle_after)} below {p.gpu_idle_below:.0%} GPU "
            f"utilisation (warn {format_duration(p.warn_before)} before)"
        )
    lines.append(
        f"  exempt: annotation {settings.exemptions.annotation}, "
        f"namespaces {', '.join(settings.exemptions.namespaces) or 'none'}"
    )
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """`reclaimer demo`: the simulated node, live table when stdout is a terminal."""
    try:
        from reclaimer.app.demo import DEMO_INSTALL, missing_demo_dependencies, run_demo
    except ImportError as exc:
        return _not_available("demo", exc)
    missing = missing_demo_dependencies()
    if missing:
        print(
            f"reclaimer demo: needs the demo extra ({', '.join(missing)} not installed): {DEMO_INSTALL}",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    live = bool(args.live) if args.live is not None else _stdout_is_tty()
    return int(run_demo(duration=args.duration, port=args.port, live=live, keep_going=bool(args.keep_going)))


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "report": cmd_report,
    "check-config": cmd_check_config,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `reclaimer` / `python -m reclaimer`; returns the exit code (never raises SystemExit)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help, --version, parser.error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ReclaimerError as exc:
        print(f"reclaimer: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    # The reader went away (`reclaimer report | head`); point stdout at /dev/null so the exit flush stays quiet.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass

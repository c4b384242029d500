"""Load and validate the YAML config into one frozen ``Settings`` object.

Errors name the key path and the line (``policies[0].idle_after (line 14): ...``). Unknown keys are errors:
a typo must never silently disable a policy or an exemption.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from reclaimer.core.actions import ActionKind, ActionName
from reclaimer.core.errors import ReclaimerError
from reclaimer.core.modes import DRY_RUN, Mode
from reclaimer.core.redact import redact_data

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$")
_BARE_SECONDS_RE = re.compile(r"^\d+(?:\.\d+)?$")


def parse_duration(value: Any) -> float:
    """``90s``, ``15m``, ``2h``, ``1h30m``, ``500ms`` or a bare number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        # NaN passes every "<= 0" check and compares False forever; inf would size the sample buffer without bound.
        if not math.isfinite(value):
            raise ValueError(f"duration must be finite: {value!r}")
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 15m, 2h, 1h30m)")
    text = value.strip().lower()
    if _BARE_SECONDS_RE.match(text):
        return float(text)
    m = _DURATION_RE.match(text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 15m, 2h, 1h30m)")
    h, mi, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def format_duration(seconds: float) -> str:
    """Inverse of ``parse_duration`` for display: 5400 -> ``1h30m``."""
    seconds = round(seconds)
    if seconds <= 0:
        return "0s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v)


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads `true` as 1.0: `gpu_idle_below: true` would count every GPU as idle.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _check_http_url(value: str) -> str:
    """An http(s) URL with no credentials, query or fragment; the error never echoes userinfo or query."""
    shown = re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1<userinfo>@", value, flags=re.I)
    shown = re.split(r"[?#]", shown)[0]
    if re.match(r"^https?://[^/\s?#]*@", value, flags=re.I):
        raise ValueError(f"must not carry credentials (use token_env or token_file), got {shown!r}")
    if not re.match(r"^https?://[^/\s?#@]+(/[^\s?#]*)?$", value):
        raise ValueError(f"must be an http(s) URL without query or fragment, got {shown!r}")
    return value.rstrip("/")


def _check_env_name(value: str | None) -> str | None:
    # A pasted token here would be echoed by the message, so the message never includes the value.
    if value is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
        raise ValueError("must be the NAME of an environment variable (letters, digits, _), not a token")
    return value


_Problem = tuple[tuple[str | int, ...], str]  # (key path, message)


def _cross_check(title: str, problems: list[_Problem], related: tuple[str, ...] = ()) -> None:
    """Raise one validation error per (key path, message), so each names its own key and line.

    ``related``: sibling keys of the named one whose line to show when the file does not set the named key itself.
    """
    if problems:
        details = [
            InitErrorDetails(
                type=PydanticCustomError("cross_check", "{message}", {"message": msg, "related": related}),
                loc=loc,
                input=None,
            )
            for loc, msg in problems
        ]
        raise ValidationError.from_exception_data(title, details)


def _repeated(names: list[str], field: str) -> list[_Problem]:
    """(path, message) for each name that repeats an earlier one in the same list."""
    first: dict[str, int] = {}
    problems: list[_Problem] = []
    for i, name in enumerate(names):
        if name in first:
            message = f"duplicate name {name!r} (also {field}[{first[name]}]); names must be unique"
            problems.append(((field, i, "name"), message))
        else:
            first[name] = i
    return problems


def _one_token_source(model: Any) -> Any:
    if model.token_env and model.token_file:
        _cross_check(type(model).__name__, [(("token_file",), "set token_env or token_file, not both")])
    return model


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Ratio = Annotated[float, BeforeValidator(_not_bool), Field(ge=0.0, le=1.0)]
Count = Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuSettings(_Strict):
    backend: Literal["nvml", "simulated"] = "nvml"
    scenario: str | None = None  # simulated backend: path to a scenario YAML (or inline via demo)
    library_path: str | None = None  # explicit libnvidia-ml.so.1; default: the loader's search path


class GatewaySettings(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    url: str
    kind: Literal["jupyter-server", "kernel-gateway", "enterprise-gateway"] = "jupyter-server"
    token_env: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    timeout: PositiveDuration = 5.0

    _http_url = field_validator("url")(_check_http_url)
    _env_name = field_validator("token_env")(_check_env_name)
    _token_source = model_validator(mode="after")(_one_token_source)


class HubSettings(_Strict):
    url: str
    token_env: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    timeout: PositiveDuration = 5.0
    cache_ttl: Duration = 60.0  # the server listing is reused this long (asked only when a candidate needs it)
    server_token_ttl: Annotated[float, BeforeValidator(parse_duration), Field(ge=60.0)] = 3600.0
    server_port: int = Field(default=8888, ge=1, le=65535)  # a pod's server port when no container port is named

    _http_url = field_validator("url")(_check_http_url)
    _env_name = field_validator("token_env")(_check_env_name)
    _token_source = model_validator(mode="after")(_one_token_source)


def _check_notebook_url(value: str) -> str:
    """The template must name the notebook by ``{name}`` and ``{namespace}`` only, and give an http(s) URL."""
    import string

    fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    if fields != {"name", "namespace"}:
        raise ValueError(f"must use exactly the placeholders {{name}} and {{namespace}}, got {sorted(fields)}")
    return _check_http_url(value.replace("{name}", "nb").replace("{namespace}", "ns")) and value.rstrip("/")


class KubeflowSettings(_Strict):
    """Kubeflow notebooks: where each notebook server answers (built from the Notebook's name and namespace, never
    read from the pod), and how to reach it."""

    notebook_url: str = "http://{name}.{namespace}.svc/notebook/{namespace}/{name}"
    token_env: str | None = None
    token_file: str | None = None
    timeout: PositiveDuration = 5.0

    _url = field_validator("notebook_url")(_check_notebook_url)
    _env_name = field_validator("token_env")(_check_env_name)
    _token_source = model_validator(mode="after")(_one_token_source)


class KubernetesSettings(_Strict):
    enabled: Literal["auto", True, False] = "auto"
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    kubeconfig: str | None = None  # default: in-cluster, then $KUBECONFIG / ~/.kube/config
    user_label: str = "hub.jupyter.org/username"  # label or annotation naming the notebook's user
    server_name_annotation: str = "hub.jupyter.org/servername"
    kernel_id_label: str = "kernel_id"
    resync_interval: PositiveDuration = 30.0
    timeout: PositiveDuration = 5.0

    @field_validator("enabled", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        return v


class PolicyMatch(_Strict):
    """Empty lists match everything; every non-empty list must match (AND across keys, OR within a list)."""

    namespaces: tuple[str, ...] = ()
    pod_labels: Mapping[str, str] = Field(default_factory=dict)
    users: tuple[str, ...] = ()
    kernel_names: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    gpu_models: tuple[str, ...] = ()  # substring match, case-insensitive: "A100" matches "NVIDIA A100-SXM4-80GB"
    groups: tuple[str, ...] = ()  # JupyterHub groups of the user (the hub's user model)
    profiles: tuple[str, ...] = ()  # KubeSpawner profile slug of the server (its user_options.profile)


class PolicySettings(_Strict):
    name: str = Field(min_length=1)
    match: PolicyMatch = Field(default_factory=PolicyMatch)
    gpu_idle_below: Ratio = 0.05
    idle_after: Duration = 1800.0
    warn_before: Duration = 300.0
    action: ActionName = ActionKind.SHUTDOWN_KERNEL.value
    # A pod holding an allocated GPU with no process and no kernel or server to vouch that it is unused is acted on
    # only when a policy opts in: its idle GPU says nothing about the CPU work the pod may be doing.
    reclaim_bare_allocations: bool = False

    @model_validator(mode="after")
    def _warn_inside_window(self) -> PolicySettings:
        if self.idle_after <= 0:
            _cross_check("PolicySettings", [(("idle_after",), "idle_after must be positive")])
        if self.warn_before >= self.idle_after:
            message = (
                f"warn_before ({format_duration(self.warn_before)}) must be shorter than "
                f"idle_after ({format_duration(self.idle_after)})"
            )
            _cross_check("PolicySettings", [(("warn_before",), message)], related=("idle_after",))
        return self


class ExemptionSettings(_Strict):
    annotation: str = Field(default="reclaimer.io/exempt", min_length=1)
    namespaces: tuple[str, ...] = ("kube-system",)
    users: tuple[str, ...] = ()
    kernel_names: tuple[str, ...] = ()


class LimitSettings(_Strict):
    max_actions_per_cycle: Count = 5
    cooldown: Duration = 600.0
    max_fraction_per_cycle: Ratio = 0.5
    # The breaker never trips while at most this many would be reclaimed: one idle kernel on a quiet node is not
    # a mass event, and without a floor a node with a single GPU kernel could never reclaim at all.
    breaker_min_reclaims: int = Field(default=2, ge=0)
    # Invariant 19: a gateway whose clock (its HTTP Date header) is further than this from ours, or whose
    # last_activity lies further than this in the future, cannot vouch for idle time.
    max_clock_skew: Duration = 60.0


def _default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


class Settings(_Strict):
    mode: Mode = DRY_RUN
    node_name: str = Field(default_factory=_default_node_name, min_length=1)
    listen: str = "0.0.0.0:9400"
    listen_token_file: str | None = None  # bearer token required on /metrics and /report (a mounted Secret)
    sample_interval: Duration = 1.0
    decide_interval: Duration = 15.0
    procfs_root: str = "/proc"
    gpu: GpuSettings = Field(default_factory=GpuSettings)
    gateways: tuple[GatewaySettings, ...] = ()
    hub: HubSettings | None = None
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    kubeflow: KubeflowSettings | None = None
    policies: tuple[PolicySettings, ...] = (PolicySettings(name="default"),)
    exemptions: ExemptionSettings = Field(default_factory=ExemptionSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        _host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"must be HOST:PORT, got {v!r}")
        return v

    @field_validator("sample_interval", "decide_interval")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.decide_interval < self.sample_interval:
            message = (
                f"decide_interval ({format_duration(self.decide_interval)}) must not be shorter than "
                f"sample_interval ({format_duration(self.sample_interval)})"
            )
            _cross_check("Settings", [(("decide_interval",), message)], related=("sample_interval",))
        problems = _repeated([g.name for g in self.gateways], "gateways")
        problems += _repeated([p.name for p in self.policies], "policies")
        if not self.policies:
            problems.append((("policies",), "at least one policy is needed (use action: none to only observe)"))
        _cross_check("Settings", problems)
        return self

    @property
    def longest_window(self) -> float:
        """Seconds of samples the sampler must keep: the longest policy window plus a decide interval."""
        return max(p.idle_after for p in self.policies) + self.decide_interval

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


# --------------------------------------------------------------------------- loading with line numbers


@dataclass(frozen=True)
class ConfigIssue:
    path: str  # "policies[0].idle_after"
    line: int | None  # 1-based
    message: str

    def __str__(self) -> str:
        if self.path:
            where = self.path + (f" (line {self.line})" if self.line else "")
        else:
            where = f"line {self.line}" if self.line else ""
        return f"{where}: {self.message}" if where else self.message


class ConfigError(ReclaimerError):
    """Invalid configuration. ``issues`` names each culprit by key path and line."""

    def __init__(self, source: str, issues: list[ConfigIssue]):
        self.source = source
        self.issues = issues
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  {i}" for i in issues))


def _line_index(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each key path in a composed YAML tree to its 1-based line."""
    out: dict[tuple[Any, ...], int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            here = (*path, key_node.value)
            out[here] = key_node.start_mark.line + 1
            for sub, line in _line_index(value_node, here).items():
                out.setdefault(sub, line) if sub == here else out.__setitem__(sub, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_line_index(item, (*path, i)))
    return out


def _duplicate_keys(node: yaml.Node, path: tuple[Any, ...] = ()) -> list[ConfigIssue]:
    """Keys given twice in one mapping: YAML keeps the last silently, which could drop a whole policy list."""
    issues: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key in first:
                message = f"duplicate key (first given on line {first[key]})"
                issues.append(ConfigIssue(_format_loc((*path, key)), line, message))
            elif key is not None:
                first[key] = line
            issues += _duplicate_keys(value_node, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            issues += _duplicate_keys(item, (*path, i))
    return issues


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _nearest_line(lines: Mapping[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    # Stop above the top level: a key the file does not set has no line, and "line 1" would point at a stranger.
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return lines.get(()) if not loc else None


_YAML_TYPE_NAMES = {
    bool: "true/false",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "nothing (null)",
}


def _friendly_message(err: Mapping[str, Any]) -> str:
    """pydantic's message, reworded where it speaks Python ("valid tuple") rather than YAML."""
    got = _YAML_TYPE_NAMES.get(type(err.get("input")), type(err.get("input")).__name__)
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; unknown keys are errors)"
    if kind == "missing":
        return "required key is missing"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list, got {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return f"must be a mapping (key: value), got {got}"
    if kind == "string_type":
        return f"must be a string, got {got}"
    return str(err["msg"]).removeprefix("Value error, ")


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds the tag of a union/literal branch ("literal['auto']", "function-after[...]") to locations.
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("bool",))))


def _issues_from(
    exc: ValidationError, lines: Mapping[tuple[Any, ...], int], overridden: frozenset[str] = frozenset()
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors():
        loc = _clean_loc(tuple(err["loc"]))
        msg = _friendly_message(err)
        key = (_format_loc(loc), msg)
        if key in seen:
            continue
        seen.add(key)
        if loc and loc[0] in overridden:
            issues.append(ConfigIssue(_format_loc(loc), None, f"{msg} (value given on the command line)"))
            continue
        # A cross-check between two keys reports the line of whichever of them the file sets.
        related = [(*loc[:-1], r) for r in (err.get("ctx") or {}).get("related", ())]
        line = next((lines[r] for r in (loc, *related) if r in lines), None) or _nearest_line(lines, loc)
        issues.append(ConfigIssue(_format_loc(loc), line, msg))
    return issues


def parse_settings(text: str, source: str = "<config>", overrides: Mapping[str, Any] | None = None) -> Settings:
    """Parse YAML text into Settings; ``overrides`` (e.g. ``{"mode": "enforce"}``) win over the file."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [ConfigIssue("", line, f"not valid YAML: {problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", 1, f"the top level must be a mapping, got {type(data).__name__}")])
    duplicates = _duplicate_keys(node) if node is not None else []
    if duplicates:
        raise ConfigError(source, duplicates)
    lines = _line_index(node) if node is not None else {}
    data = {**data, **(overrides or {})}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _issues_from(exc, lines, frozenset(overrides or ()))) from None


def load_settings(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load a config file (``None``: all defaults)."""
    if path is None:
        return parse_settings("", "<defaults>", overrides)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [ConfigIssue("", None, f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [ConfigIssue("", None, f"not UTF-8 text (byte {exc.start})")]) from None
    return parse_settings(text, str(p), overrides)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective config as plain data for the start-up log. Token *sources* are kept, values never read."""
    # Validation rejects credentials in URLs; redaction keeps a hand-built Settings from leaking them anyway.
    return redact_data(settings.model_dump(mode="json"))

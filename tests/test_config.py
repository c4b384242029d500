"""Settings: durations, defaults, the contract example, errors that name key path and line, immutability, redaction."""

from __future__ import annotations

import json
import re
import socket
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from reclaimer.core.config import (
    ConfigError,
    ConfigIssue,
    GatewaySettings,
    Settings,
    format_duration,
    load_settings,
    parse_duration,
    parse_settings,
    redacted,
)
from reclaimer.core.errors import ReclaimerError

REPO = Path(__file__).resolve().parent.parent

# The config example of docs/interface.md ("Configuration file"), verbatim: it must parse as-is
# (tests/test_docs.py checks that the doc still holds this text).
CONTRACT_EXAMPLE = """\
mode: dry-run                # dry-run | enforce
node_name: gpu-node-1        # default: $NODE_NAME, else hostname
listen: 0.0.0.0:9400         # /metrics /healthz /readyz /report
sample_interval: 1s
decide_interval: 15s
gpu: {backend: nvml}         # nvml | simulated
gateways:
  - {name: eg, url: "http://enterprise-gateway:8888", token_env: EG_TOKEN}   # or token_file; ca_file
hub: {url: "http://hub:8081", token_env: HUB_TOKEN}                          # optional
kubernetes: {enabled: auto}  # auto | true | false; pod_resources_socket: path
policies:                    # first match wins
  - name: default
    match: {}                # namespaces, pod_labels, users, kernel_names, gateways, gpu_models
    gpu_idle_below: 0.05     # utilisation ratio counted as idle
    idle_after: 30m
    warn_before: 5m
    action: shutdown-kernel  # shutdown-kernel | stop-server | evict-pod | none
exemptions: {annotation: reclaimer.io/exempt, namespaces: [kube-system]}
limits: {max_actions_per_cycle: 5, cooldown: 10m, max_fraction_per_cycle: 0.5}
"""

ONE_OF_EACH = """\
gpu:
  backend: nvml
gateways:
  - name: eg
    url: http://eg:8888
hub:
  url: http://hub:8081
kubernetes:
  enabled: auto
policies:
  - name: default
    match:
      namespaces: [a]
exemptions:
  namespaces: [kube-system]
limits:
  cooldown: 10m
"""


def issues_of(text: str, **kwargs: Any) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "test.yaml", **kwargs)
    return info.value.issues


def only_issue(text: str, **kwargs: Any) -> ConfigIssue:
    issues = issues_of(text, **kwargs)
    assert len(issues) == 1, issues
    return issues[0]


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("90s", 90.0, id="seconds"),
        pytest.param("15m", 900.0, id="minutes"),
        pytest.param("2h", 7200.0, id="hours"),
        pytest.param("1h30m", 5400.0, id="hours-minutes"),
        pytest.param("1m30s", 90.0, id="minutes-seconds"),
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("0", 0.0, id="zero-string"),
        pytest.param("0s", 0.0, id="zero-seconds"),
        pytest.param(0, 0.0, id="zero-number"),
        pytest.param(45, 45.0, id="bare-int-seconds"),
        pytest.param(2.5, 2.5, id="bare-float-seconds"),
        pytest.param("30", 30.0, id="bare-string-seconds"),
        pytest.param("1.5h", 5400.0, id="fractional-hours"),
        pytest.param(" 2M ", 120.0, id="case-and-space"),
    ],
)
def test_parse_duration_accepts(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("", id="empty"),
        pytest.param("abc", id="word"),
        pytest.param("-5s", id="negative-string"),
        pytest.param(-1, id="negative-number"),
        pytest.param("5 m", id="inner-space"),
        pytest.param("1d", id="days-unit"),
        pytest.param("30s1m", id="units-out-of-order"),
        pytest.param("h", id="unit-only"),
        pytest.param("1h30", id="trailing-number"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="null"),
        pytest.param([1], id="list"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
    ],
)
def test_parse_duration_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(5400, "1h30m", id="hours-minutes"),
        pytest.param(90, "1m30s", id="minutes-seconds"),
        pytest.param(0, "0s", id="zero"),
        pytest.param(3600, "1h", id="hour"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**7))
def test_format_then_parse_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------- defaults and the contract example


def test_every_default_of_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-from-env")
    s = parse_settings("")
    assert s.mode == "dry-run"
    assert s.node_name == "node-from-env"
    assert s.listen == "0.0.0.0:9400" and s.listen_host_port == ("0.0.0.0", 9400)
    assert (s.sample_interval, s.decide_interval) == (1.0, 15.0)
    assert s.gpu.backend == "nvml"
    assert s.gateways == () and s.hub is None
    assert s.kubernetes.enabled == "auto"
    assert s.kubernetes.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert [p.name for p in s.policies] == ["default"]
    policy = s.policies[0]
    assert policy.match.namespaces == () and dict(policy.match.pod_labels) == {} and policy.match.users == ()
    assert policy.match.kernel_names == () and policy.match.gateways == () and policy.match.gpu_models == ()
    assert (policy.gpu_idle_below, policy.idle_after, policy.warn_before) == (0.05, 1800.0, 300.0)
    assert policy.action == "shutdown-kernel"
    assert s.exemptions.annotation == "reclaimer.io/exempt" and s.exemptions.namespaces == ("kube-system",)
    assert (s.limits.max_actions_per_cycle, s.limits.cooldown, s.limits.max_fraction_per_cycle) == (5, 600.0, 0.5)
    assert s.log_level == "info"


def test_node_name_falls_back_to_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert parse_settings("").node_name == socket.gethostname()


def test_contract_example_parses_as_is_and_equals_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "gpu-node-1")
    s = parse_settings(CONTRACT_EXAMPLE, "contract")
    assert s.gateways[0].name == "eg" and s.gateways[0].url == "http://enterprise-gateway:8888"
    assert s.gateways[0].token_env == "EG_TOKEN"
    assert s.hub is not None and s.hub.url == "http://hub:8081" and s.hub.token_env == "HUB_TOKEN"
    # Apart from the gateways and hub it adds, the example spells out the defaults.
    assert s.model_copy(update={"gateways": (), "hub": None}) == parse_settings("")


def test_shipped_example_config_parses() -> None:
    s = load_settings(REPO / "examples" / "config.yaml")
    assert s.mode == "dry-run", "the shipped example must be safe by default"
    assert s.gateways and s.hub is not None and len(s.policies) > 1


def test_overrides_win_over_the_file() -> None:
    assert parse_settings("mode: dry-run\n", overrides={"mode": "enforce"}).mode == "enforce"


def test_bad_override_is_blamed_on_the_command_line_not_a_file_line() -> None:
    issue = only_issue("mode: enforce\n", overrides={"mode": "bogus"})
    assert issue.path == "mode" and issue.line is None and "command line" in issue.message


# --------------------------------------------------------------------------- errors name key path and line


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        pytest.param("gpu:\n  backend: nvml\nmod: enforce\n", "mod", 3, id="top-level"),
        pytest.param(ONE_OF_EACH.replace("  backend: nvml", "  backend: nvml\n  backnd: x"), "gpu.backnd", 3,
                     id="gpu-section"),
        pytest.param(ONE_OF_EACH.replace("    url: http://eg:8888", "    url: http://eg:8888\n    tokn_env: X"),
                     "gateways[0].tokn_env", 6, id="gateway"),
        pytest.param(ONE_OF_EACH.replace("  url: http://hub:8081", "  url: http://hub:8081\n  ur1: x"), "hub.ur1", 8,
                     id="hub"),
        pytest.param(ONE_OF_EACH.replace("  enabled: auto", "  enabled: auto\n  enable: true"), "kubernetes.enable",
                     10, id="kubernetes"),
        pytest.param(ONE_OF_EACH.replace("  - name: default", "  - name: default\n    idle_afer: 5m"),
                     "policies[0].idle_afer", 12, id="policy"),
        pytest.param(ONE_OF_EACH.replace("      namespaces: [a]", "      namespaces: [a]\n      namespace: b"),
                     "policies[0].match.namespace", 14, id="policy-match"),
        pytest.param(ONE_OF_EACH.replace("  namespaces: [kube-system]", "  namespaces: [kube-system]\n  anotation: x"),
                     "exemptions.anotation", 16, id="exemptions"),
        pytest.param(ONE_OF_EACH.replace("  cooldown: 10m", "  cooldown: 10m\n  max_actions: 3"), "limits.max_actions",
                     18, id="limits"),
    ],
)
def test_unknown_key_at_each_level_names_path_and_line(text: str, path: str, line: int) -> None:
    issue = only_issue(text)
    assert (issue.path, issue.line) == (path, line)
    assert "unknown key" in issue.message


@pytest.mark.parametrize(
    ("text", "path", "line", "words"),
    [
        pytest.param("mode: enforced\n", "mode", 1, "dry-run", id="bad-mode"),
        pytest.param("listen: 9400\n", "listen", 1, "string", id="listen-number"),
        pytest.param("listen: localhost\n", "listen", 1, "HOST:PORT", id="listen-no-port"),
        pytest.param("sample_interval: soon\n", "sample_interval", 1, "not a duration", id="bad-duration"),
        pytest.param("gpu: nvml\n", "gpu", 1, "must be a mapping", id="section-not-mapping"),
        pytest.param("gateways:\n  name: eg\n", "gateways", 1, "must be a list", id="list-not-list"),
        pytest.param("policies:\n", "policies", 1, "must be a list", id="null-list"),
        pytest.param("policies:\n  - name: a\n    gpu_idle_below: 5%\n", "policies[0].gpu_idle_below", 3, "number",
                     id="percent-ratio"),
        pytest.param("policies:\n  - name: a\n    gpu_idle_below: 5\n", "policies[0].gpu_idle_below", 3, "less than",
                     id="ratio-above-one"),
        pytest.param("policies:\n  - name: a\n    gpu_idle_below: true\n", "policies[0].gpu_idle_below", 3,
                     "true/false", id="bool-as-ratio"),
        pytest.param("limits:\n  max_actions_per_cycle: yes\n", "limits.max_actions_per_cycle", 2, "true/false",
                     id="bool-as-count"),
        pytest.param("limits:\n  max_actions_per_cycle: -1\n", "limits.max_actions_per_cycle", 2, "greater",
                     id="negative-count"),
        pytest.param("policies:\n  - name: a\n    action: kill\n", "policies[0].action", 3, "shutdown-kernel",
                     id="bad-action"),
        pytest.param("policies:\n  - name: a\n    idle_after: .nan\n", "policies[0].idle_after", 3, "finite",
                     id="nan-duration"),
        pytest.param("policies:\n  - name: a\n    idle_after: 0\n", "policies[0].idle_after", 3, "positive",
                     id="zero-idle-after"),
        pytest.param("policies:\n  - action: none\n", "policies[0].name", 2, "missing", id="missing-name"),
        pytest.param("policies:\n  - name: a\n    match:\n      pod_labels: {team: 1}\n",
                     "policies[0].match.pod_labels.team", 4, "string", id="label-value-number"),
        pytest.param("kubernetes:\n  enabled: maybe\n", "kubernetes.enabled", 2, "auto", id="bad-enabled"),
        pytest.param("gateways:\n  - name: eg\n    url: http://eg\n    timeout: 0\n", "gateways[0].timeout", 4,
                     "greater than 0", id="zero-timeout"),
        pytest.param("gateways:\n  - name: eg\n    url: ftp://eg\n", "gateways[0].url", 3, "http", id="not-http"),
        pytest.param("gateways:\n  - name: 'bad name'\n    url: http://eg\n", "gateways[0].name", 2, "pattern",
                     id="gateway-name-pattern"),
        pytest.param("hub: {}\n", "hub.url", 1, "missing", id="hub-without-url"),
        pytest.param("node_name: ''\n", "node_name", 1, "at least 1", id="empty-node-name"),
        pytest.param("exemptions:\n  annotation: ''\n", "exemptions.annotation", 2, "at least 1",
                     id="empty-exempt-annotation"),
        pytest.param("sample_interval: 20s\n", "decide_interval", 1, "sample_interval (20s)",
                     id="decide-shorter-than-sample-points-at-sample-line"),
        pytest.param("gateways:\n  - {name: eg, url: 'http://eg', token_env: T, token_file: /t}\n",
                     "gateways[0].token_file", 2, "not both", id="two-token-sources"),
    ],
)
def test_type_and_value_errors_name_path_and_line(text: str, path: str, line: int, words: str) -> None:
    issue = only_issue(text)
    assert (issue.path, issue.line) == (path, line)
    assert words in issue.message


@pytest.mark.parametrize(
    ("idle_after", "warn_before"),
    [
        pytest.param("10m", "10m", id="equal"),
        pytest.param("10m", "15m", id="longer"),
        pytest.param("4m", None, id="default-warn-longer-than-idle"),
    ],
)
def test_warn_before_must_be_shorter_than_idle_after(idle_after: str, warn_before: str | None) -> None:
    text = f"policies:\n  - name: a\n    idle_after: {idle_after}\n"
    if warn_before:
        text += f"    warn_before: {warn_before}\n"
    issue = only_issue(text)
    assert issue.path == "policies[0].warn_before"
    assert issue.line == (4 if warn_before else 3)  # the idle_after line when warn_before is the default
    assert "must be shorter than idle_after" in issue.message


def test_warn_before_shorter_than_idle_after_is_fine() -> None:
    policy = parse_settings("policies:\n  - name: a\n    idle_after: 10m\n    warn_before: 9m\n").policies[0]
    assert (policy.idle_after, policy.warn_before) == (600.0, 540.0)


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        pytest.param("gateways:\n  - {name: eg, url: 'http://a'}\n  - {name: js, url: 'http://b'}\n"
                     "  - {name: eg, url: 'http://c'}\n", "gateways[2].name", 4, id="gateways"),
        pytest.param("policies:\n  - name: a\n  - name: b\n  - name: a\n    action: none\n", "policies[2].name", 4,
                     id="policies"),
    ],
)
def test_duplicate_names_are_rejected_at_the_repeat(text: str, path: str, line: int) -> None:
    issue = only_issue(text)
    assert (issue.path, issue.line) == (path, line)
    assert "duplicate name" in issue.message and "[0]" in issue.message


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        pytest.param("mode: enforce\nlisten: 0.0.0.0:1\nmode: dry-run\n", "mode", 3, id="top-level"),
        pytest.param("policies:\n  - name: a\n    action: none\n    action: evict-pod\n", "policies[0].action", 4,
                     id="in-a-policy"),
    ],
)
def test_duplicate_yaml_keys_are_errors(text: str, path: str, line: int) -> None:
    issue = only_issue(text)
    assert (issue.path, issue.line) == (path, line)
    assert "duplicate key" in issue.message and "line" in issue.message


def test_all_issues_are_reported_together_one_line_each() -> None:
    text = "mode: maybe\nlimits:\n  cooldown: soon\npolicies:\n  - name: a\n    typo: 1\n"
    issues = issues_of(text)
    assert {(i.path, i.line) for i in issues} == {("mode", 1), ("limits.cooldown", 3), ("policies[0].typo", 6)}
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "my.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "my.yaml: invalid configuration"
    assert sorted(lines[1:]) == sorted(f"  {i}" for i in issues)
    assert isinstance(info.value, ReclaimerError)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        pytest.param("mode: [\n", 2, "not valid YAML", id="broken-yaml"),
        pytest.param("- a\n- b\n", 1, "must be a mapping", id="list-at-top"),
        pytest.param("just text\n", 1, "must be a mapping", id="scalar-at-top"),
    ],
)
def test_file_level_errors(text: str, line: int, words: str) -> None:
    issue = only_issue(text)
    assert issue.line == line and words in issue.message
    assert str(issue).startswith(f"line {line}: ")


def test_empty_file_means_all_defaults(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    assert load_settings(tmp_path / "empty.yaml") == load_settings(None)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param(None, "cannot read", id="missing-file"),
        pytest.param(b"mode: \xff\xfe\n", "not UTF-8", id="not-utf8"),
    ],
)
def test_unreadable_files_are_config_errors(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.source == str(path) and words in str(info.value)


# --------------------------------------------------------------------------- secrets


def test_url_credentials_are_rejected_without_echoing_them() -> None:
    issue = only_issue("gateways:\n  - name: eg\n    url: http://alice:s3cr3t@eg:8888\n")
    assert issue.path == "gateways[0].url" and "credentials" in issue.message
    assert "s3cr3t" not in str(issue)


def test_url_query_is_rejected_without_echoing_it() -> None:
    issue = only_issue("hub:\n  url: http://hub:8081/?token=s3cr3t\n")
    assert issue.path == "hub.url" and "s3cr3t" not in str(issue)


def test_token_pasted_into_token_env_is_rejected_without_echoing_it() -> None:
    issue = only_issue("gateways:\n  - name: eg\n    url: http://eg\n    token_env: 'ab12-cd34 s3cr3t'\n")
    assert issue.path == "gateways[0].token_env" and "NAME of an environment variable" in issue.message
    assert "s3cr3t" not in str(issue)


def test_redacted_keeps_token_sources_and_never_reads_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EG_TOKEN", "s3cr3t-value")
    s = parse_settings(CONTRACT_EXAMPLE)
    data = redacted(s)
    assert data["gateways"][0]["token_env"] == "EG_TOKEN" and data["hub"]["token_env"] == "HUB_TOKEN"
    assert "s3cr3t-value" not in json.dumps(data)
    assert data["policies"][0]["idle_after"] == 1800.0


def test_redacted_scrubs_url_credentials_even_on_a_hand_built_settings() -> None:
    # model_construct skips validation: the redaction must not rely on it.
    gateway = GatewaySettings.model_construct(name="eg", url="http://alice:s3cr3t@eg:8888", token_env="EG_TOKEN")
    s = parse_settings("").model_copy(update={"gateways": (gateway,)})
    dumped = json.dumps(redacted(s))
    assert "s3cr3t" not in dumped and "alice" not in dumped and "eg:8888" in dumped


# --------------------------------------------------------------------------- immutability


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: setattr(s, "mode", "enforce"), id="top-level-field"),
        pytest.param(lambda s: setattr(s.policies[0], "action", "evict-pod"), id="nested-policy"),
        pytest.param(lambda s: setattr(s.limits, "max_actions_per_cycle", 1000), id="nested-limits"),
        pytest.param(lambda s: s.exemptions.namespaces.append("team-a"), id="tuple-field"),
    ],
)
def test_settings_are_frozen(mutate: Any) -> None:
    s = parse_settings(CONTRACT_EXAMPLE)
    with pytest.raises((ValidationError, AttributeError, TypeError)):
        mutate(s)
    assert s == parse_settings(CONTRACT_EXAMPLE)


# --------------------------------------------------------------------------- the reference stays in sync


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every key path of ``model`` (list items as ``[]``) with its field."""
    out: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        out[prefix + name] = info
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    is_list = typing.get_origin(info.annotation) is tuple
                    out.update(_fields(inner, f"{prefix}{name}{'[]' if is_list else ''}."))
    return out


def _documented_default(info: FieldInfo) -> str | None:
    """The default as docs/configuration.md writes it, or None when the doc explains it in words."""
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        return "`{}`" if info.default_factory is dict else None
    value = info.default
    if any(getattr(m, "func", None) is parse_duration for m in info.metadata):
        return f"`{format_duration(value)}`"
    if value is None:
        return "`unset`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        if value and isinstance(value[0], BaseModel):
            return None
        return "`[" + ", ".join(value) + "]`"
    return f"`{value}`"


def _doc_rows() -> dict[str, tuple[str, str, str]]:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_.\[\]]+)` \| (.+?) \| (.+?) \| (.+?) \|$", doc, flags=re.M)
    return {key: (kind, default, meaning) for key, kind, default, meaning in rows}


def test_every_setting_is_documented_and_nothing_else() -> None:
    fields = _fields(Settings)
    assert "policies[].match.gpu_models" in fields and "gateways[].token_env" in fields  # the walk reaches nested
    rows = _doc_rows()
    assert sorted(set(fields) - set(rows)) == [], "docs/configuration.md lacks a table row for these keys"
    assert sorted(set(rows) - set(fields)) == [], "docs/configuration.md documents keys Settings does not have"


def test_documented_defaults_match_settings() -> None:
    rows = _doc_rows()
    wrong = {}
    for key, info in _fields(Settings).items():
        expected = _documented_default(info)
        if expected is not None and not rows[key][1].startswith(expected):
            wrong[key] = (rows[key][1], expected)
    assert not wrong, f"docs/configuration.md default column disagrees with Settings: {wrong}"

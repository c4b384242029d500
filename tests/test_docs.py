"""The docs name what the tree holds.

Paths, modules, classes, functions and config keys in docs/architecture.md, docs/interface.md and docs/safety.md
exist (paths and modules in the other docs); the metric names of docs/interface.md are exactly what /metrics exports;
its configuration example is the contract's; nothing cites a design document outside the repository.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel

from reclaimer.core.config import Settings, parse_settings
from reclaimer.export.metrics import Metrics
from tests.support.export_fixtures import node_snapshot

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHECKED = ("architecture.md", "interface.md", "safety.md")  # every name they give
PATHS_CHECKED = ("configuration.md", "deploy.md", "platforms.md", "tokens.md")  # paths and reclaimer.* names only
STAGES = ("core", "observe", "act", "export", "app")
PATH_RE = re.compile(
    r"^(?:\.ci/run|pyproject\.toml|README\.md"
    r"|(?:reclaimer|tests|docs|deploy|dashboards|bench|scripts|examples)/[\w./-]*"
    r"|(?:core|observe|act|export|app)/\w+\.py)(?:::\w+)?$"
)
IDENT_RE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
NOT_NAMES = {"_total", "reclaimer_"}  # a metric-name suffix and prefix, not names in the code


# --------------------------------------------------------------------------- an index of the tree


@cache
def _modules() -> dict[str, ast.Module]:
    """Dotted module name -> its AST, for every module of the package."""
    out = {}
    for path in sorted((ROOT / "reclaimer").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _defined(body: list[ast.stmt]) -> set[str]:
    """Names a module or class body defines: functions, classes, assignments, annotated fields, imports."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.If):  # TYPE_CHECKING blocks and the like
            names |= _defined(node.body) | _defined(node.orelse)
    return names


@cache
def _index() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]], set[str]]:
    """(module -> top-level names, module stem -> top-level names, class -> member names, every word in the sources)."""
    top: dict[str, set[str]] = {}
    stems: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        top[name] = _defined(tree.body)
        stems.setdefault(name.rsplit(".", 1)[-1], set()).update(top[name])
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                members.update(_defined(node.body))
                members.update(  # attributes set in its methods (``self.call_timeout = ...``)
                    t.attr
                    for sub in ast.walk(node)
                    for t in (sub.targets if isinstance(sub, ast.Assign) else [getattr(sub, "target", None)])
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                )
    words: set[str] = set()
    for folder, pattern in (("reclaimer", "*.py"), ("deploy", "*.yaml"), ("dashboards", "*.py"), ("scripts", "*.py")):
        for path in (ROOT / folder).rglob(pattern):
            words.update(re.findall(r"\w+", path.read_text(encoding="utf-8")))
    return top, stems, classes, words


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _settings_path(parts: list[str]) -> bool | None:
    """Whether ``parts`` is a key path of Settings (``hub.cache_ttl``); None when it does not start with a key."""
    model: type[BaseModel] = Settings
    if parts[0] not in model.model_fields:
        return None
    for part in parts:
        field = model.model_fields.get(part)
        if field is None:
            return False
        inner = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if isinstance(a, type)]
        model = next((a for a in inner if issubclass(a, BaseModel)), BaseModel)
    return True


def _problem(token: str) -> str | None:
    """Why ``token`` (a code span of a doc) names nothing in the tree, or None when it does (or is not a name)."""
    if PATH_RE.match(token):
        file, _, test = token.partition("::")
        path = ROOT / file if file.split("/")[0] not in STAGES else ROOT / "reclaimer" / file
        if not path.exists():
            return f"no such path: {path.relative_to(ROOT)}"
        if test and test not in _test_names(path):
            return f"{file} has no {test}"
        return None
    if re.fullmatch(r"\w+\.py", token):  # a module in the tree table: somewhere in the package
        return None if any((ROOT / "reclaimer").rglob(token)) else f"no module {token} in the package"
    call = re.match(r"^([\w.]+)\(", token)
    if call:
        token = call.group(1)
    if not IDENT_RE.match(token) or token in NOT_NAMES:
        return None  # a value, an expression, a label set: not a name
    top, stems, classes, words = _index()
    parts = token.split(".")
    if parts[0] == "reclaimer":
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            if module in top:
                rest = parts[cut:]
                if not rest:
                    return None
                if len(rest) == 1 and rest[0] in top[module]:
                    return None
                if len(rest) == 2 and rest[0] in classes and rest[1] in classes[rest[0]]:
                    return None
                return f"{module} defines no {'.'.join(rest)}"
        return f"no module {token}"
    if len(parts) >= 2:
        if parts[0] in classes:
            return None if parts[1] in classes[parts[0]] else f"class {parts[0]} has no {parts[1]}"
        key = _settings_path(parts)
        if key is not None:
            return None if key else f"Settings has no key {token}"
        if parts[0] in stems:
            return None if parts[1] in stems[parts[0]] else f"module {parts[0]} defines no {parts[1]}"
    if ("_" in token or token[:1].isupper()) and not all(p in words for p in parts):
        return f"{token} occurs nowhere in the package, deploy/, dashboards/ or scripts/"
    return None


def _code_spans(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # fenced blocks: examples, not names
    return re.findall(r"`([^`\n]+)`", text)


@pytest.mark.parametrize("doc", CHECKED)
def test_every_name_the_doc_gives_exists_in_the_tree(doc: str) -> None:
    text = (DOCS / doc).read_text(encoding="utf-8")
    problems = sorted({f"`{t}`: {p}" for t in _code_spans(text) if (p := _problem(t)) is not None})
    assert problems == [], f"docs/{doc} names what the tree does not hold:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", PATHS_CHECKED)
def test_every_path_and_module_the_doc_gives_exists(doc: str) -> None:
    """These docs also name other projects' settings (``EG_LIST_KERNELS``): only our paths and modules are checked."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    ours = [t for t in _code_spans(text) if PATH_RE.match(t) or t.startswith("reclaimer.")]
    problems = sorted({f"`{t}`: {p}" for t in ours if (p := _problem(t)) is not None})
    assert problems == [], f"docs/{doc} names what the tree does not hold:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", CHECKED + PATHS_CHECKED)
def test_every_link_of_the_doc_resolves(doc: str) -> None:
    text = (DOCS / doc).read_text(encoding="utf-8")
    missing = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t and not (DOCS / t).exists()]
    assert missing == [], f"docs/{doc} links to missing files: {missing}"


@pytest.mark.parametrize(
    "token,ok",
    [
        pytest.param("reclaimer/core/policy.py", True, id="path"),
        pytest.param("core/policy.py", True, id="stage-relative-path"),
        pytest.param("reclaimer/core/no_such.py", False, id="missing-path"),
        pytest.param("tests/test_docs.py::test_the_checker_can_fail", True, id="test"),
        pytest.param("tests/test_docs.py::test_no_such_thing", False, id="missing-test"),
        pytest.param("reclaimer.core.policy.plan", True, id="dotted-function"),
        pytest.param("reclaimer.core.policy.no_such", False, id="dotted-missing"),
        pytest.param("policy.recheck", True, id="module-function"),
        pytest.param("policy.no_such", False, id="module-missing"),
        pytest.param("Daemon.run", True, id="method"),
        pytest.param("Daemon.no_such", False, id="missing-method"),
        pytest.param("hub.cache_ttl", True, id="config-key"),
        pytest.param("limits.no_such", False, id="missing-config-key"),
        pytest.param("executor_for(mode, ...)", True, id="call"),
        pytest.param("NoSuchClass", False, id="missing-class"),
        pytest.param("dry-run", True, id="a-value-not-a-name"),
        pytest.param("policy.py", True, id="module-file"),
        pytest.param("no_such.py", False, id="missing-module-file"),
    ],
)
def test_the_checker_can_fail(token: str, ok: bool) -> None:
    assert (_problem(token) is None) is ok, _problem(token)


# --------------------------------------------------------------------------- docs/interface.md against the code


def _exported_metric_names() -> set[str]:
    snap = node_snapshot()
    text = Metrics(lambda: snap).render()[0].decode()
    names = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    return {n for n in names if not n.endswith("_created")}  # client_python's creation timestamps


def test_interface_lists_exactly_the_exported_metrics() -> None:
    spans = _code_spans((DOCS / "interface.md").read_text(encoding="utf-8"))
    documented = {m.group(1) for s in spans if (m := re.match(r"^(reclaimer_[a-z0-9_]*[a-z0-9])(?:\{|$)", s))}
    exported = _exported_metric_names()
    assert sorted(exported - documented) == [], "exported but not in docs/interface.md (document each new metric)"
    assert sorted(documented - exported) == [], "docs/interface.md names metrics /metrics does not export"


def test_interface_config_example_is_the_contract_example_and_parses() -> None:
    text = (DOCS / "interface.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/interface.md has no configuration example"
    from tests.test_config import CONTRACT_EXAMPLE

    assert block.group(1) == CONTRACT_EXAMPLE, "docs/interface.md and tests/test_config.py hold different examples"
    example = parse_settings(block.group(1), "docs/interface.md")
    assert example.policies[0].action == "shutdown-kernel"
    assert example.exemptions.annotation == "reclaimer.io/exempt"


# --------------------------------------------------------------------------- no citation of an outside document


def test_nothing_cites_a_design_document_outside_the_repository() -> None:
    cited = []
    files = [ROOT / "README.md", *(p for d in ("reclaimer", "tests", "bench", "docs") for p in (ROOT / d).rglob("*"))]
    for path in files:
        if not path.is_file() or path.suffix not in (".py", ".md", ".yaml", ".toml") or path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if re.search(r"\bDESIGN\b|§", line):
                cited.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert cited == [], "cite the repository's docs (docs/*.md) instead:\n" + "\n".join(cited)

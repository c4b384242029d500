"""The Dockerfile and scripts/build-image.sh, checked without building (the build itself runs in .ci/run): the final
stage is the one the DaemonSet runs, with nothing to compile or install with."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SCRIPT = ROOT / "scripts" / "build-image.sh"


def stages() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out: list[list[str]] = []
    for ln in lines:
        if ln.startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(ln)
    return ["\n".join(s) for s in out]


def instruction(stage: str, name: str) -> list[str]:
    return [ln[len(name) + 1:].strip() for ln in stage.splitlines() if ln.startswith(name + " ")]


def test_multi_stage_with_the_daemon_as_entry_point() -> None:
    build, final = stages()
    assert build.startswith("FROM ${BASE} AS build")
    (entry,) = instruction(final, "ENTRYPOINT")
    (cmd,) = instruction(final, "CMD")
    ds = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "base" / "daemonset.yaml").read_text())
              if d and d["kind"] == "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert json.loads(entry) == c["command"] == ["reclaimer"]
    assert json.loads(cmd) == c["args"]  # the image alone runs what the DaemonSet runs
    assert any("9400" in e for e in instruction(final, "EXPOSE"))


def test_final_stage_copies_the_virtualenv_and_installs_nothing() -> None:
    _, final = stages()
    assert instruction(final, "COPY") == ["--from=build /opt/reclaimer /opt/reclaimer"]
    runs = " ".join(instruction(final, "RUN"))
    assert "apt-get install" not in runs and "pip install" not in runs
    assert "dpkg --purge" in runs  # apt and perl leave the image
    env = " ".join(instruction(final, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the DaemonSet mounts the root filesystem read-only


def test_build_stage_installs_from_local_wheels_only() -> None:
    build, _ = stages()
    assert "--no-index --find-links /wheels" in build
    assert "COPY wheels/ /wheels/" in build


@pytest.mark.e2e
def test_build_script_is_valid_bash_and_runs_the_checks() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    text = SCRIPT.read_text()
    for check in ("--help", "check-config /etc/reclaimer/config.yaml", "report --config /etc/reclaimer/config.yaml -o json",
                  "run --config /etc/reclaimer/once.yaml --once", "libnvidia-ml.so.1", "deploy/base/configmap.yaml"):
        assert check in text, check
    assert "buildah bud" in text and "--isolation" in text and "debootstrap --variant=minbase" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/build-image.sh" in ci


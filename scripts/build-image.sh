#!/usr/bin/env bash
# Build the gpu-reclaimer image with buildah (no Docker engine needed), then run it:
#   reclaimer --help; reclaimer check-config on the shipped ConfigMap's config; reclaimer report -o json with the
#   test suite's fake libnvidia-ml.so.1 mounted where the NVIDIA container runtime puts the real one.
#
#   scripts/build-image.sh                 # build + check; prints the image name and size
#   IMAGE=registry.example/gpu-reclaimer:0.1.0 scripts/build-image.sh && buildah push registry.example/...
#
# Steps: (1) a Debian bookworm base with python3, made here with debootstrap (cached as BASE, remade with
# REBUILD_BASE=1); (2) wheels of gpu-reclaimer and every dependency, built on the host (the build container cannot
# reach a Python package index); (3) `buildah bud` of ./Dockerfile on that context; (4) the checks.
# Needs root, buildah, debootstrap, gcc. STORAGE_DRIVER=vfs and chroot isolation work inside an unprivileged
# container (no overlay mounts, no user namespaces needed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

VERSION=$(python3 -c 'import re,sys; print(re.search(r"^version = \"([^\"]+)\"", open("pyproject.toml").read(), re.M)[1])')
IMAGE=${IMAGE:-localhost/gpu-reclaimer:$VERSION}
BASE=${BASE:-localhost/gpu-reclaimer-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${IMAGE_WORKDIR:-/var/tmp/gpu-reclaimer-image}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
ARCH_TRIPLET=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
NVML_DIR=/usr/lib/$ARCH_TRIPLET  # where the NVIDIA container toolkit mounts libnvidia-ml.so.1 on Debian/Ubuntu

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
fail() { echo "build-image: $*" >&2; exit 1; }
for tool in buildah debootstrap gcc python3; do command -v "$tool" >/dev/null || fail "$tool is not installed"; done
[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and buildah's vfs storage need it)"
mkdir -p "$WORK"

# ---------------------------------------------------------------------------------------------- 1. the base
if [ "${REBUILD_BASE:-0}" = 1 ] || ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  step "debootstrap bookworm (minbase + python3, ca-certificates) into $WORK/rootfs"
  rm -rf "$WORK/rootfs" "$WORK/base.tar"
  debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed (log: $WORK/debootstrap.log)"; }
  r=$WORK/rootfs
  # Like debian:bookworm-slim: no docs, man pages or translations now or from later apt installs; no apt caches.
  cat >"$r/etc/dpkg/dpkg.cfg.d/01-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\nAcquire::Languages "none";\n' \
    >"$r/etc/apt/apt.conf.d/01-slim"
  find "$r/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
         "$r"/var/lib/apt/lists/* "$r"/var/log/*.log "$r"/var/log/apt/* "$r"/dev/* "$r"/proc/* "$r"/sys/*
  rm -rf "$r"/usr/lib/*/gconv  # glibc's iconv modules: Python has its own codecs
  find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
  tar -C "$r" --numeric-owner -cf "$WORK/base.tar" .
  step "commit $BASE"
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$WORK/base.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
    --label org.opencontainers.image.description="debootstrap --variant=minbase --include=python3,ca-certificates bookworm" "$ctr"
  buildah commit -q --rm "$ctr" "$BASE" >/dev/null
  rm -rf "$WORK/rootfs" "$WORK/base.tar"
fi

# ---------------------------------------------------------------------------------------------- 2. the wheels
step "wheels of gpu-reclaimer and its dependencies"
CTX=$WORK/context
rm -rf "$CTX" && mkdir -p "$CTX/wheels"
python3 -m pip wheel -q --wheel-dir "$CTX/wheels" "$ROOT" >"$WORK/wheels.log" 2>&1 \
  || { tail -20 "$WORK/wheels.log" >&2; fail "pip wheel failed (log: $WORK/wheels.log)"; }
if ls "$CTX"/wheels/*-linux_*.whl >/dev/null 2>&1; then
  fail "locally compiled wheels (not manylinux) would not match the image's libc: $(ls "$CTX"/wheels/*-linux_*.whl)"
fi

# ---------------------------------------------------------------------------------------------- 3. the image
step "buildah bud -> $IMAGE"
OLD_ID=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
buildah bud -q --isolation "$BUILDAH_ISOLATION" --layers=false --squash --build-arg "BASE=$BASE" -f "$ROOT/Dockerfile" \
  -t "$IMAGE" "$CTX" >"$WORK/bud.log" 2>&1 || { tail -30 "$WORK/bud.log" >&2; fail "buildah bud failed (log: $WORK/bud.log)"; }

NEW_ID=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE")
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$NEW_ID" ]; then buildah rmi "$OLD_ID" >/dev/null 2>&1 || true; fi  # the untagged last build

# ---------------------------------------------------------------------------------------------- 4. run it
step "checks"
CHECK=$WORK/check
rm -rf "$CHECK" && mkdir -p "$CHECK/etc" "$CHECK/nvml"
# The shipped ConfigMap's config.yaml, exactly as the DaemonSet mounts it.
python3 - "$ROOT/deploy/base/configmap.yaml" "$CHECK/etc/config.yaml" <<'EOF'
import sys, yaml
(cm,) = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"]
open(sys.argv[2], "w").write(cm["data"]["config.yaml"])
EOF
gcc -shared -fPIC -O2 -Wall -o "$CHECK/nvml/libnvidia-ml.so.1" "$ROOT/tests/support/fake_nvml.c" -lpthread
cat >"$CHECK/nvml/fake_nvml.conf" <<'EOF'
driver version=550.54.15
gpu uuid=GPU-00000000-0000-0000-0000-000000000000 name=NVIDIA%20A100-SXM4-80GB memory_total=85899345920 memory_used=1048576 util=0
gpu uuid=GPU-11111111-1111-1111-1111-111111111111 name=NVIDIA%20H100%2080GB%20HBM3 memory_total=85520809984 memory_used=4294967296 util=37
EOF

ctr=$(buildah from -q "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
# What a container runtime runs: the image's ENTRYPOINT followed by the arguments.
mapfile -t ENTRY < <(buildah inspect --type container --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$ctr" | sed '/^$/d')
[ "${#ENTRY[@]}" -gt 0 ] || fail "the image has no ENTRYPOINT"
run() {
  buildah run --isolation "$BUILDAH_ISOLATION" --env NODE_NAME=image-check \
    -v "$CHECK/etc:/etc/reclaimer:ro" \
    -v "$CHECK/nvml/libnvidia-ml.so.1:$NVML_DIR/libnvidia-ml.so.1:ro" \
    -v "$CHECK/nvml/fake_nvml.conf:/run/fake_nvml.conf:ro" --env FAKE_NVML_CONFIG=/run/fake_nvml.conf \
    "$ctr" -- "$@"
}

run "${ENTRY[@]}" --help >"$CHECK/help.txt" || fail "reclaimer --help failed"
grep -q "check-config" "$CHECK/help.txt" || fail "reclaimer --help does not list its commands"
echo "reclaimer --help: ok"

run "${ENTRY[@]}" check-config /etc/reclaimer/config.yaml >"$CHECK/check-config.txt" \
  || { cat "$CHECK/check-config.txt" >&2; fail "check-config of deploy/configmap.yaml failed in the image"; }
grep -q "mode: dry-run" "$CHECK/check-config.txt" || fail "the shipped config is not dry-run"
echo "reclaimer check-config /etc/reclaimer/config.yaml (deploy/base/configmap.yaml): ok"

run "${ENTRY[@]}" report --config /etc/reclaimer/config.yaml -o json --window 2s >"$CHECK/report.json" \
  || fail "reclaimer report -o json failed in the image"
python3 - "$CHECK/report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["node"] == "image-check", r["node"]
assert r["mode"] == "dry-run", r["mode"]
models = [g["model"] for g in r["gpus"]]
assert models == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"], models
assert [g["utilization"] for g in r["gpus"]] == [0.0, 0.37], [g["utilization"] for g in r["gpus"]]
print(f"reclaimer report -o json through the fake libnvidia-ml.so.1: ok ({len(r['gpus'])} GPUs: {', '.join(models)})")
EOF

# The DaemonSet's command, one full cycle (sample, attribute, decide, serve), on a free port of this host's network.
sed 's|^\(\s*listen:\s*\)[^ ]*|\1127.0.0.1:0|' "$CHECK/etc/config.yaml" >"$CHECK/etc/once.yaml"
run "${ENTRY[@]}" run --config /etc/reclaimer/once.yaml --once >"$CHECK/once.log" 2>&1 \
  || { tail -20 "$CHECK/once.log" >&2; fail "reclaimer run --once failed in the image"; }
grep -q '"event": "cycle"' "$CHECK/once.log" || { tail -20 "$CHECK/once.log" >&2; fail "reclaimer run --once ran no cycle"; }
echo "reclaimer run --once (the DaemonSet's command, dry-run): ok"

# Nothing to compile with, nothing to install with, in the final image.
run /bin/sh -c 'for t in gcc cc c++ make ld pip pip3; do command -v $t && exit 1; done; exit 0' >/dev/null \
  || fail "the final image contains a compiler or pip"
echo "no compiler, linker or pip in the image: ok"

SIZE=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
BYTES=$(buildah inspect --type image --format '{{range .Docker.RootFS.DiffIDs}}{{.}} {{end}}' "$IMAGE" >/dev/null; \
        du -sb "$(buildah mount "$ctr")" 2>/dev/null | cut -f1 || true)
buildah umount "$ctr" >/dev/null 2>&1 || true
step "done"
echo "image $IMAGE: $SIZE (root filesystem ${BYTES:-?} bytes); base $BASE"

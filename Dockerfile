# gpu-reclaimer image: the daemon on Debian bookworm's python3, nothing else.
#
# Built by scripts/build-image.sh (buildah), which makes the build context: `wheels/` holds the gpu-reclaimer wheel
# and every dependency's wheel, built on the host, so the build itself needs no Python package index.
# BASE: a Debian bookworm root with python3 (the script makes one with debootstrap; debian:bookworm-slim plus
# python3 is the same thing).
ARG BASE=localhost/gpu-reclaimer-base:bookworm

# ---- build: a virtualenv with the daemon and its dependencies, from the wheels only
FROM ${BASE} AS build
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*
COPY wheels/ /wheels/
# Trimmed: test folders, C sources and stubs; debug symbols of the extension modules; kubernetes' asyncio client
# (68 MB), which the sync client the daemon uses never imports; kubernetes' generated API and model modules
# (thousands) as bytecode only, docstrings stripped (-OO), a third of their size. Everything else compiled as usual.
RUN python3 -m venv /opt/reclaimer \
 && /opt/reclaimer/bin/pip install -q --no-index --find-links /wheels --no-cache-dir gpu-reclaimer \
 && /opt/reclaimer/bin/pip uninstall -q -y pip setuptools \
 && cd /opt/reclaimer/lib/python3.11/site-packages \
 && find . -depth \( -name tests -o -name test \) -type d -exec rm -rf {} + \
 && find . \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.c' -o -name '*.h' \) -delete \
 && find . -name '*.so' -exec strip --strip-unneeded {} + \
 && rm -rf kubernetes/aio \
 && python3 -m compileall -q -b -o 2 -j 0 kubernetes/client \
 && find kubernetes/client -name '*.py' -delete && find kubernetes/client -name __pycache__ -type d -exec rm -rf {} + \
 && /opt/reclaimer/bin/python -m compileall -q -j 0 /opt/reclaimer/lib \
 && /opt/reclaimer/bin/reclaimer --version

# ---- final: python3 from the base, the virtualenv; no pip, no compiler, no package lists
FROM ${BASE}
COPY --from=build /opt/reclaimer /opt/reclaimer
# No package manager at run time: apt, perl and the tools only they use go (the image is built with --squash, so
# this shrinks it). dpkg's database stays true for image scanners.
RUN dpkg --purge --force-remove-essential --force-depends apt libapt-pkg6.0 libgnutls30 e2fsprogs libdb5.3 perl-base \
      >/dev/null 2>&1 \
 && rm -rf /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/* /var/cache/apt /var/lib/apt \
 && python3 -c 'import ssl, ctypes, sqlite3' && /opt/reclaimer/bin/reclaimer --version
ENV PATH=/opt/reclaimer/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="gpu-reclaimer" \
      org.opencontainers.image.description="Finds Jupyter kernels holding idle GPUs, exports the waste, reclaims by policy" \
      org.opencontainers.image.licenses="Apache-2.0"
# Root: the kubelet's pod-resources socket is root-only; the DaemonSet drops every capability.
USER 0
WORKDIR /
EXPOSE 9400
ENTRYPOINT ["reclaimer"]
CMD ["run", "--config", "/etc/reclaimer/config.yaml"]

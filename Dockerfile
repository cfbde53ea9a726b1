# syntax=docker/dockerfile:1
# Pail's container image: the `pail` command (CSI node and controller servers, and the
# mount processes they start) in a slim Debian 12 Python image. For amd64 and arm64
# (Graviton) nodes at once:
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg REVISION="$(git rev-parse HEAD)" -t REGISTRY/pail:0.1.0 --push .
#
# The RUN steps call the scripts that scripts/setup and tests/packaging call, so what is
# tested without a container engine is what builds the image.

# An exact patch tag, so a rebuild gets the same Python. It is not pinned to a digest
# because none could be looked up where this was written (no container engine or registry
# client); pin one with --build-arg BASE_IMAGE=python:3.11.15-slim-bookworm@sha256:<index
# digest>. The digest of the multi-platform index, not one platform's manifest, keeps the
# arm64 build working. Builder and final stage must share the base: the environment built
# in one runs on the other's interpreter, at the same path.
ARG BASE_IMAGE=python:3.11.15-slim-bookworm

# No --platform=$BUILDPLATFORM here: the builder runs on the target platform (under
# emulation when cross-building), so pyfuse3's C extension and the binary wheels picked
# are those of the image's architecture.
FROM ${BASE_IMAGE} AS builder
# The image's interpreter, not the Debian python3 that python3-dev brings along.
ENV PYTHON=/usr/local/bin/python3
WORKDIR /src
# Scripts and pins first, sources last: a change to Pail's code rebuilds only the wheels.
COPY scripts/system-packages scripts/
RUN ./scripts/system-packages --pinned build
COPY scripts/build-wheels scripts/install-wheels scripts/
COPY constraints/ constraints/
COPY pyproject.toml README.md ./
COPY csi/ csi/
COPY driver/ driver/
RUN ./scripts/build-wheels /wheels
RUN ./scripts/install-wheels /wheels /opt/pail

FROM ${BASE_IMAGE}
# The scripts are mounted, not copied, so they leave nothing in the image; the apt lists
# go in the same step, or a layer would keep them.
RUN --mount=type=bind,source=scripts,target=/tmp/pail-scripts \
    /tmp/pail-scripts/system-packages --pinned runtime \
    && rm -rf /var/lib/apt/lists/*
# Only the environment: no compiler, headers, wheels or pip cache from the builder.
COPY --from=builder /opt/pail /opt/pail
# Unbuffered: log lines reach `kubectl logs` as they are written, also from a crash.
ENV PATH=/opt/pail/bin:$PATH \
    PYTHONUNBUFFERED=1

# Root, on purpose: the node plugin (a privileged container) opens /dev/fuse, mounts FUSE
# file systems into kubelet's pod directories and reads each volume's 0600 credential
# files. Said explicitly so that no base image default can change it.
USER root
ENTRYPOINT ["pail"]
# The chart passes `csi node ...` or `csi controller ...`.
CMD ["csi", "--help"]

# Last, so that a new revision does not invalidate the cached layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=
LABEL org.opencontainers.image.title="pail" \
      org.opencontainers.image.description="Mount Amazon S3 buckets into Kubernetes pods through FUSE: a CSI driver and the pail mount command" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

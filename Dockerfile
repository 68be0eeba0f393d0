# syntax=docker/dockerfile:1
# The operator image. Dependencies compile in a layer of their own (cargo-chef), so a
# source-only change rebuilds just the crate; the runtime is distroless: glibc and CA
# certificates, no shell, no package manager.

# Base images are fully qualified, so buildah and podman resolve them without a
# registries.conf search list, and pinned by tag.
FROM docker.io/lukemathwalker/cargo-chef:0.1.78-rust-1.95-bookworm AS chef
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin sandcastle
# envd for sandbox pods, linked statically so that it runs in any image whatever its libc.
RUN RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
      --target "$(rustc -vV | sed -n 's/^host: //p')" -p sandcastle-sandboxd --bin sandcastle-envd \
 && cp target/*-linux-gnu/release/sandcastle-envd /src/sandcastle-envd

# cc-debian12 matches the builder's Debian 12 glibc; TLS is rustls, so no OpenSSL is needed.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sandcastle" \
      org.opencontainers.image.description="A Kubernetes operator that runs AI coding agents in E2B-compatible sandboxes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /src/sandcastle-envd /usr/local/bin/sandcastle-envd
COPY --from=builder /src/target/release/sandcastle /usr/local/bin/sandcastle
# Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sandcastle"]
CMD ["run"]

# syntax=docker/dockerfile:1
#
# herald-relay: RabbitMQ → XMPP. Build from the repository root:
#
#   docker build -f deploy/docker/relay.Dockerfile -t ghcr.io/herald-xmpp/herald-relay:dev .
#
# or, with a binary built on the host (`cargo build --release`) and a build
# context that holds only that binary (deploy/docker/build-local.sh does
# this, for machines without a registry):
#
#   docker build -f deploy/docker/relay.Dockerfile --build-arg BINARY_FROM=context -t … DIR
#
# Stages: `chef` (toolchain + cargo-chef), `planner` (recipe.json: every
# manifest and Cargo.lock of the workspace, nothing else), `builder`
# (dependencies built from the recipe in their own layer, then the real
# sources), `binary-source` or `binary-context` (where the binary comes from,
# chosen by BINARY_FROM), and the distroless runtime with the one binary in
# it. Both ways share the runtime stage: the images differ only in where the
# binary came from.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# "source": build here (the default); "context": take ./herald-relay from
# the build context.
ARG BINARY_FROM=source

FROM ${RUST_IMAGE} AS chef
# cargo-chef computes and cooks the dependency recipe of the workspace
# (shared/, ingress/, relay/, tests/ with its bins), stubbing every target.
ARG CARGO_CHEF_VERSION=^0.1
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Only this layer builds the dependencies; it is reused until a Cargo.toml or
# Cargo.lock changes.
RUN cargo chef cook --release --locked -p herald-relay --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p herald-relay --bin herald-relay \
 && install -D -m 0755 target/release/herald-relay /out/herald-relay

FROM scratch AS binary-source
COPY --from=builder /out/herald-relay /herald-relay

FROM scratch AS binary-context
COPY --chmod=0755 herald-relay /herald-relay

FROM binary-${BINARY_FROM} AS binary

# glibc, libgcc and the CA bundle (rustls-native-certs reads
# /etc/ssl/certs/ca-certificates.crt); no shell, no package manager.
FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=binary /herald-relay /usr/local/bin/herald-relay
# distroless "nonroot" is uid/gid 65532; the Kubernetes manifests pin the same.
USER 65532:65532
ENV HERALD_ADMIN_LISTEN=0.0.0.0:9091 \
    HERALD_ACCOUNTS_FILE=/etc/herald/accounts.toml \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# 9091: admin (/healthz, /readyz, /metrics); the relay serves nothing else.
EXPOSE 9091
# The binary asks its own admin port for /readyz (exit 0 ready, 1 not).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/herald-relay", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/herald-relay"]

# tailgres container image.
#
#   docker build -t tailgres .
#   docker run -d --name tailgres -v tailgres-state:/var/lib/tailgres \
#       -e TS_AUTHKEY=tskey-auth-... \
#       -e TAILGRES_UPSTREAM=db.internal:5432 \
#       -v /etc/ssl/db-ca.pem:/etc/tailgres/db-ca.pem:ro -e TAILGRES_UPSTREAM_CA=/etc/tailgres/db-ca.pem \
#       tailgres
#
# The build stage runs scripts/build-release, the same script CI runs, so
# CI proves these steps. The image needs no capabilities and no host
# network: the embedded Tailscale is userspace (tsnet).

# Toolchains: Go for the embedded Tailscale, Rust for the proxy; bookworm,
# like the runtime image, so the binary's glibc matches.
FROM golang:1.26.8-bookworm AS go
FROM rust:1.95-bookworm AS build
COPY --from=go /usr/local/go /usr/local/go
ENV PATH=/usr/local/go/bin:$PATH GOTOOLCHAIN=local
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/build-release

# Runtime: CA roots (for upstreams on public CAs and for Tailscale's own
# control plane), a non-root user, the state directory as a volume.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tailgres \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tailgres tailgres \
    && install -d -o tailgres -g tailgres -m 0700 /var/lib/tailgres
COPY --from=build /src/target/release/tailgres /usr/local/bin/tailgres
USER 10001:10001
# The node's keys live here: keep the volume across upgrades, or the proxy
# joins the tailnet as a new machine.
VOLUME /var/lib/tailgres
ENV TAILGRES_STATE_DIR=/var/lib/tailgres \
    TAILGRES_AUDIT_LOG=- \
    TAILGRES_HEALTH_LISTEN=0.0.0.0:9187
# /healthz, /readyz, /metrics (inside the container's own network only
# unless published).
EXPOSE 9187
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tailgres"]

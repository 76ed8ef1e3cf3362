#!/usr/bin/env bash
# Builds Herald's images on a machine that has podman (or docker) but no
# image registry: the base images come from Debian's package mirror
# (debootstrap), the Herald binaries from `cargo build --release` on the host.
#
#   deploy/docker/build-local.sh            # everything below
#   deploy/docker/build-local.sh herald     # only the two Herald images
#
# Images (tag HERALD_IMAGE_TAG, default "dev"):
#   docker.io/library/debian:bookworm-slim   debootstrap --variant=minbase, when missing
#   localhost/herald-runtime:bookworm        the distroless-cc equivalent: glibc, libgcc,
#                                            CA bundle, tzdata, netbase, uid 65532; no shell
#   ghcr.io/herald-xmpp/herald-ingress:TAG   deploy/docker/ingress.Dockerfile, BINARY_FROM=context
#   ghcr.io/herald-xmpp/herald-relay:TAG     deploy/docker/relay.Dockerfile, BINARY_FROM=context
#   localhost/herald-demo-prosody:TAG        deploy/compose/prosody
#   localhost/herald-rabbitmq:TAG            deploy/compose/rabbitmq (Debian's RabbitMQ)
#
# The Herald images are built from the same Dockerfiles as the published
# ones, down to the same runtime stage; only the binary's origin differs
# (the host's target/release instead of the builder stage), and the runtime
# base is built here from Debian's packages instead of pulled.
#
# Environment:
#   HERALD_CONTAINER_ENGINE  podman (default) or docker
#   HERALD_IMAGE_CACHE       where the debootstrap tree is kept as a tarball
#                            (default ~/.cache/herald-images); delete it, or the
#                            images, to rebuild the bases
#   HERALD_IMAGE_TAG         tag of the Herald and demo images (default dev)
#   HERALD_DEBIAN_MIRROR     debootstrap's mirror (default http://deb.debian.org/debian)
#   CARGO_TARGET_DIR         where cargo puts the release binaries (default target)
set -euo pipefail
cd "$(dirname "$0")/../.."

engine=${HERALD_CONTAINER_ENGINE:-podman}
cache=${HERALD_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/herald-images}
tag=${HERALD_IMAGE_TAG:-dev}
mirror=${HERALD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
target_dir=${CARGO_TARGET_DIR:-target}
what=${1:-all}

DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
RUNTIME_IMAGE=localhost/herald-runtime:bookworm
INGRESS_IMAGE=ghcr.io/herald-xmpp/herald-ingress:$tag
RELAY_IMAGE=ghcr.io/herald-xmpp/herald-relay:$tag
PROSODY_IMAGE=localhost/herald-demo-prosody:$tag
RABBITMQ_IMAGE=localhost/herald-rabbitmq:$tag

say() { printf '== %s\n' "$*"; }
die() { printf 'build-local.sh: %s\n' "$*" >&2; exit 1; }
have_image() { "$engine" image inspect "$1" >/dev/null 2>&1; }

command -v "$engine" >/dev/null || die "$engine is not installed (Debian: apt-get install -y podman runc debootstrap)"
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- Debian, from the package mirror -------------------------------------------
# One debootstrap tree serves both bases; its tarball is cached. `rootfs`
# unpacks it into $rootfs, once per run.
rootfs_tar=$cache/bookworm-minbase.tar
rootfs=$work/rootfs
rootfs() {
    local dir=$rootfs
    if [ ! -d "$dir" ]; then
        if [ ! -s "$rootfs_tar" ]; then
            command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
            say "debootstrap bookworm (minbase) from $mirror"
            debootstrap --variant=minbase --include=ca-certificates,netbase,tzdata \
                bookworm "$work/debootstrap" "$mirror" >"$work/debootstrap.log" 2>&1 \
                || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
            # What a slim image drops: package lists, caches, docs.
            rm -rf "$work/debootstrap"/var/lib/apt/lists/* "$work/debootstrap"/var/cache/apt/*.bin \
                "$work/debootstrap"/var/cache/apt/archives/*.deb "$work/debootstrap"/usr/share/doc/* \
                "$work/debootstrap"/usr/share/man/* "$work/debootstrap"/usr/share/info/*
            tar -C "$work/debootstrap" -cf "$rootfs_tar.tmp" .
            mv "$rootfs_tar.tmp" "$rootfs_tar"
            rm -rf "$work/debootstrap"
        fi
        mkdir -p "$dir"
        tar -C "$dir" -xf "$rootfs_tar"
    fi
}

debian_base() {
    if have_image "$DEBIAN_IMAGE"; then return; fi
    local dir=$rootfs
    rootfs
    say "importing $DEBIAN_IMAGE"
    tar -C "$dir" -c . | "$engine" import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["bash"]' \
        - "$DEBIAN_IMAGE" >/dev/null
}

# The files of the packages distroless/cc-debian12 is made of (less libssl
# and libstdc++, which Herald does not link), the CA bundle that
# update-ca-certificates generated, and the nonroot user.
runtime_base() {
    if have_image "$RUNTIME_IMAGE"; then return; fi
    local dir=$rootfs out pkg
    rootfs
    out=$work/runtime
    say "assembling $RUNTIME_IMAGE from Debian's libc6, libgcc-s1, ca-certificates, tzdata, netbase, base-files"
    mkdir -p "$out/usr/bin" "$out/usr/sbin" "$out/usr/lib" "$out/usr/lib64"
    # The merged-/usr symlinks (lib64 -> usr/lib64, ...) first, so that the
    # files dpkg lists under them land in /usr.
    (cd "$dir" && find bin sbin lib lib64 -maxdepth 0 -type l) >"$work/runtime.files"
    for pkg in base-files libc6 libgcc-s1 ca-certificates tzdata netbase; do
        dpkg-query --admindir="$dir/var/lib/dpkg" -L "$pkg" | while read -r path; do
            if [ -f "$dir$path" ] || [ -L "$dir$path" ]; then
                printf '%s\n' "${path#/}"
            fi
        done
    done >>"$work/runtime.files"
    (cd "$dir" && find etc/ssl/certs -mindepth 1) >>"$work/runtime.files"
    tar -C "$dir" --no-recursion -cf - -T "$work/runtime.files" | tar -C "$out" -xf -
    mkdir -p "$out/tmp" "$out/home/nonroot" "$out/root"
    chmod 1777 "$out/tmp"
    chown 65532:65532 "$out/home/nonroot"
    chmod 0700 "$out/root"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$out/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$out/etc/group"
    tar -C "$out" -c . | "$engine" import --quiet \
        --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        - "$RUNTIME_IMAGE" >/dev/null
}

# ---- Herald -----------------------------------------------------------------------
herald_images() {
    # podman writes OCI images by default, which have no HEALTHCHECK.
    local format=()
    [ "$engine" = podman ] && format=(--format docker)
    say "cargo build --release -p herald-ingress -p herald-relay"
    cargo build --release --locked -p herald-ingress -p herald-relay
    local service context
    for service in ingress relay; do
        context=$work/context-$service
        mkdir -p "$context"
        cp "$target_dir/release/herald-$service" "$context/"
        image=$INGRESS_IMAGE
        [ "$service" = relay ] && image=$RELAY_IMAGE
        say "building $image (deploy/docker/$service.Dockerfile, BINARY_FROM=context)"
        "$engine" build --quiet "${format[@]}" -f "deploy/docker/$service.Dockerfile" \
            --build-arg BINARY_FROM=context --build-arg RUNTIME_IMAGE="$RUNTIME_IMAGE" \
            -t "$image" "$context" >/dev/null
    done
}

demo_images() {
    say "building $PROSODY_IMAGE (deploy/compose/prosody)"
    "$engine" build --quiet -t "$PROSODY_IMAGE" deploy/compose/prosody >/dev/null
    say "building $RABBITMQ_IMAGE (deploy/compose/rabbitmq)"
    "$engine" build --quiet -t "$RABBITMQ_IMAGE" deploy/compose/rabbitmq >/dev/null
}

case $what in
    all)
        debian_base
        runtime_base
        herald_images
        demo_images
        ;;
    herald)
        runtime_base
        herald_images
        ;;
    demo)
        debian_base
        demo_images
        ;;
    *) die "unknown target '$what' (all, herald, demo)" ;;
esac

say "images"
for image in "$INGRESS_IMAGE" "$RELAY_IMAGE" "$PROSODY_IMAGE" "$RABBITMQ_IMAGE" "$RUNTIME_IMAGE" "$DEBIAN_IMAGE"; do
    if have_image "$image"; then
        printf '  %-45s %s\n' "$image" "$("$engine" image inspect --format '{{.Size}}' "$image" | numfmt --to=iec-i --suffix=B)"
    fi
done

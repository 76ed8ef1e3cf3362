#!/usr/bin/env bash
# Makes a Debian machine ready to build and run Herald's containers with
# podman, as root: the packages, the two settings podman needs where the
# kernel has cgroups v1 in hybrid mode and no CAP_SYS_RESOURCE (crun fails
# there, and so does podman's default nofile ulimit of 1048576), and the
# Docker API on /run/podman/podman.sock for testcontainers.
#
#   deploy/podman-setup.sh
#   export DOCKER_HOST=unix:///run/podman/podman.sock
#
# Idempotent: a second run installs and writes nothing. An existing
# /etc/containers/containers.conf is left alone.
set -euo pipefail

packages=(podman runc podman-compose debootstrap curl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

conf=/etc/containers/containers.conf
if [ ! -e "$conf" ]; then
    echo "== writing $conf (runtime runc, ulimits within the host's)"
    mkdir -p /etc/containers
    cat >"$conf" <<'EOF'
# Written by Herald's deploy/podman-setup.sh: crun fails on hosts with
# cgroups v1 in hybrid mode, and a nofile ulimit above the host's hard limit
# needs CAP_SYS_RESOURCE.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
fi

socket=/run/podman/podman.sock
# A service left running by an earlier run from a clone that was deleted
# since answers _ping but cannot start containers: its conmon children
# inherit the deleted working directory, and every start fails with "write
# child: broken pipe". This script starts it from /; one started from
# anywhere else (by an older version of it, say) is stopped, and a new one
# starts below.
for pid in $(pgrep -f "podman system service.*$socket" || true); do
    dir=$(readlink "/proc/$pid/cwd" 2>/dev/null || true)
    if [ "$dir" != / ]; then
        echo "== stopping podman system service $pid (started from $dir)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        rm -f "$socket"
    fi
done
if ! curl -sf --unix-socket "$socket" http://d/_ping >/dev/null 2>&1; then
    echo "== podman system service on $socket (the Docker API, for testcontainers)"
    mkdir -p /run/podman
    # From /, so that it outlives the directory this script runs from.
    env -C / nohup podman system service --time=0 "unix://$socket" >/var/log/podman-service.log 2>&1 &
    for _ in $(seq 1 50); do
        curl -sf --unix-socket "$socket" http://d/_ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    curl -sf --unix-socket "$socket" http://d/_ping >/dev/null || { echo "podman's API did not come up" >&2; exit 1; }
fi
echo "== podman $(podman --version | awk '{print $3}') ready; DOCKER_HOST=unix://$socket"

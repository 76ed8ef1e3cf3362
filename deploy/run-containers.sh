#!/usr/bin/env bash
# Runs what deploy/ describes on one machine, end to end, and checks it:
#
#   deploy/run-containers.sh compose   the compose stack (podman-compose or docker compose):
#                                      up, one message through each ingress delivered to bob, down
#   deploy/run-containers.sh kube      the Kubernetes workloads with `podman kube play`
#                                      (overlays/podman = the dev overlay + the demo CA): a message
#                                      delivered, /healthz /readyz /metrics, SIGTERM within the grace
#   deploy/run-containers.sh all       both (what .ci/run does)
#
# Needs the images (deploy/docker/build-local.sh, or pulled/built otherwise)
# and builds herald-xmpp-receive, the XMPP client that proves delivery.
# Cleans up after itself (containers, pods, networks, volumes, podman
# secrets) unless HERALD_KEEP=1.
#
# Environment:
#   HERALD_COMPOSE           the compose command (default: podman-compose, else docker compose)
#   HERALD_RABBITMQ_IMAGE    RabbitMQ image (default: rabbitmq:3.13-management if present,
#                            else localhost/herald-rabbitmq:dev from build-local.sh)
#   HERALD_PROSODY_IMAGE     demo Prosody (default localhost/herald-demo-prosody:dev)
#   HERALD_IMAGE_TAG         tag of the Herald images (default dev)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

what=${1:-all}
tag=${HERALD_IMAGE_TAG:-dev}
export HERALD_INGRESS_IMAGE=ghcr.io/herald-xmpp/herald-ingress:$tag
export HERALD_RELAY_IMAGE=ghcr.io/herald-xmpp/herald-relay:$tag
export HERALD_PROSODY_IMAGE=${HERALD_PROSODY_IMAGE:-localhost/herald-demo-prosody:dev}
if [ -z "${HERALD_RABBITMQ_IMAGE:-}" ]; then
    if podman image exists docker.io/library/rabbitmq:3.13-management 2>/dev/null; then
        HERALD_RABBITMQ_IMAGE=docker.io/library/rabbitmq:3.13-management
    else
        HERALD_RABBITMQ_IMAGE=localhost/herald-rabbitmq:dev
    fi
fi
export HERALD_RABBITMQ_IMAGE

# The demo accounts (deploy/compose/users.toml and accounts.toml).
HTTP_USER=alice@localhost
HTTP_PASSWORD=alice-http-pw
BOB=bob@localhost
BOB_PASSWORD=bob-xmpp-pw

say() { printf '== %s\n' "$*"; }
die() { printf 'run-containers.sh: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d)
cleanups=()
finish() {
    local status=$?
    if [ "${HERALD_KEEP:-}" = 1 ]; then
        say "HERALD_KEEP=1: leaving everything running; files in $work"
        exit "$status"
    fi
    local i
    for ((i = ${#cleanups[@]} - 1; i >= 0; i--)); do
        eval "${cleanups[i]}" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
    exit "$status"
}
trap finish EXIT

# ---- helpers ----------------------------------------------------------------------
receiver=
build_receiver() {
    [ -n "$receiver" ] && return
    say "building herald-xmpp-receive"
    cargo build --quiet --locked -p herald-tests --bin herald-xmpp-receive
    receiver=${CARGO_TARGET_DIR:-$root/target}/debug/herald-xmpp-receive
}

# post URL TEXT: POSTs TEXT as alice until the ingress answers 202 (60 s).
post() {
    local url=$1 text=$2 code deadline=$((SECONDS + 60))
    while :; do
        # As the docs do it; the retries cover the seconds before an ingress
        # has its broker channel (503).
        code=$(curl -s -o "$work/post.out" -w '%{http_code}' -u "$HTTP_USER:$HTTP_PASSWORD" \
            -H 'Content-Type: text/plain' --data-binary "$text" "$url" || true)
        if [ "$code" = 202 ]; then
            printf '  POST %s → 202 %s\n' "$url" "$(cat "$work/post.out")"
            return
        fi
        [ $SECONDS -lt $deadline ] || die "POST $url: no 202 within 60 s (last: $code $(cat "$work/post.out" 2>/dev/null))"
        sleep 1
    done
}

# listen SERVER CA TEXT...: bob logs in (in the background) and must get a
# message containing each TEXT; returns once he is online, so that what is
# posted next arrives live. `received` waits for the outcome.
listener=
listen() {
    local server=$1 ca=$2 expect=() text deadline=$((SECONDS + 60))
    shift 2
    for text in "$@"; do expect+=(--expect "$text"); done
    rm -f "$work/bob.online"
    SSL_CERT_FILE=$ca "$receiver" --jid "$BOB" --password "$BOB_PASSWORD" --server "$server" \
        --ready-file "$work/bob.online" "${expect[@]}" --timeout 120s >"$work/bob.out" 2>&1 &
    listener=$!
    until [ -e "$work/bob.online" ]; do
        kill -0 "$listener" 2>/dev/null || { cat "$work/bob.out" >&2; die "bob could not log in"; }
        [ $SECONDS -lt $deadline ] || die "bob was not online within 60 s"
        sleep 0.2
    done
}

received() {
    local status=0
    wait "$listener" || status=$?
    sed 's/^/  /' "$work/bob.out"
    [ "$status" = 0 ] || die "bob did not receive every message"
}

# get URL: 200 within 60 s, body on stdout.
get_ok() {
    local url=$1 deadline=$((SECONDS + 60))
    until curl -sf "$url"; do
        [ $SECONDS -lt $deadline ] || die "GET $url: no 200 within 60 s"
        sleep 1
    done
}

# ---- compose ----------------------------------------------------------------------
# fetch_compose_ca COMPOSE...: the demo CA, once Prosody has made it.
fetch_compose_ca() {
    if [ "$1" = podman-compose ]; then
        podman cp herald_prosody_1:/certs/ca.pem "$work/compose-ca.pem" 2>/dev/null
    else
        "$@" cp prosody:/certs/ca.pem "$work/compose-ca.pem" 2>/dev/null
    fi
    [ -s "$work/compose-ca.pem" ]
}

run_compose() {
    local compose
    if [ -n "${HERALD_COMPOSE:-}" ]; then
        read -r -a compose <<<"$HERALD_COMPOSE"
    elif command -v podman-compose >/dev/null; then
        compose=(podman-compose)
    else
        compose=(docker compose)
    fi
    # -p: podman-compose 1.0 ignores the file's `name: herald`.
    compose+=(-p herald -f deploy/compose/compose.yaml)
    say "compose stack: ${compose[*]} (RabbitMQ image $HERALD_RABBITMQ_IMAGE)"
    # podman-compose 1.0 leaves the project's network behind.
    cleanups+=("podman network rm herald_default" "${compose[*]} down -v")
    "${compose[@]}" up -d >"$work/compose-up.log" 2>&1 || { cat "$work/compose-up.log" >&2; die "compose up failed"; }
    local deadline=$((SECONDS + 120))
    until fetch_compose_ca "${compose[@]}"; do
        [ $SECONDS -lt $deadline ] || die "the demo Prosody made no CA within 120 s"
        sleep 1
    done
    listen 127.0.0.1:15222 "$work/compose-ca.pem" "from compose ingress-1" "from compose ingress-2"
    post http://127.0.0.1:8081/msg/bob "hello bob, from compose ingress-1"
    post http://127.0.0.1:8082/msg/bob "hello bob, from compose ingress-2"
    received
    "${compose[@]}" down -v >"$work/compose-down.log" 2>&1 || { cat "$work/compose-down.log" >&2; die "compose down failed"; }
    say "compose stack: ok"
}

# ---- podman kube play ---------------------------------------------------------------
net=herald-kube
prosody_port=15223

run_kube() {
    command -v podman >/dev/null || die "podman kube play needs podman"
    say "kube: rendering deploy/k8s/overlays/podman"
    deploy/validate.sh --render podman >"$work/rendered.yaml" 2>"$work/render.log" \
        || { cat "$work/render.log" >&2; die "cannot render the overlay"; }
    local py=${HERALD_VALIDATE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/herald-validate}/venv/bin/python
    "$py" deploy/k8s/podman-play.py split "$work/rendered.yaml" "$work" \
        --rabbitmq-image "$HERALD_RABBITMQ_IMAGE" --tag "$tag"

    cleanups+=("podman network rm -f $net")
    podman network exists "$net" || podman network create "$net" >/dev/null

    # The XMPP server the accounts file names (prosody:5222); not part of the
    # manifests, as your own server would not be.
    say "kube: the demo Prosody (prosody:5222 on $net, 127.0.0.1:$prosody_port)"
    cleanups+=("podman volume rm -f herald-kube-certs" "podman rm -f -t 0 herald-kube-prosody")
    podman run -d --name herald-kube-prosody --network "$net" --network-alias prosody \
        -p "127.0.0.1:$prosody_port:5222" -e ALICE_PASSWORD=alice-xmpp-pw -e BOB_PASSWORD="$BOB_PASSWORD" \
        -v herald-kube-certs:/certs "$HERALD_PROSODY_IMAGE" >/dev/null 2>"$work/prosody.log"
    local deadline=$((SECONDS + 60))
    until podman exec herald-kube-prosody test -s /certs/localhost.crt 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "the demo Prosody made no certificate within 60 s"
        sleep 1
    done
    podman exec herald-kube-prosody cat /certs/ca.pem >"$work/kube-ca.pem"

    # What an operator creates by hand (README, Deploying): the users and
    # accounts files and the CA to trust; plus the overlay's own Secrets.
    "$py" deploy/k8s/podman-play.py secrets "$work" \
        --users deploy/compose/users.toml --accounts deploy/compose/accounts.toml --ca "$work/kube-ca.pem"
    local secret
    for secret in "$work"/secrets/*; do
        secret=$(basename "$secret")
        cleanups+=("podman secret rm $secret" "podman volume rm -f $secret")
        podman secret rm "$secret" >/dev/null 2>&1 || true
        podman volume rm -f "$secret" >/dev/null 2>&1 || true
        podman secret create "$secret" "$work/secrets/$secret" >/dev/null
    done
    local configmaps=()
    for cm in "$work"/configmaps/*.yaml; do configmaps+=(--configmap "$cm"); done

    # podman keeps each claim and ConfigMap volume as a named volume.
    cleanups+=("podman volume rm -f data-rabbitmq-0 herald-private-ca rabbitmq-dev-config")
    # kube play's stderr goes to a log: without systemd, podman says for
    # every container that it cannot schedule the liveness probe's timer.
    say "kube: podman kube play (RabbitMQ's StatefulSet as a Pod, then the two Deployments)"
    cleanups+=("podman kube down $work/rabbitmq.yaml || podman pod rm -f rabbitmq")
    podman kube play --network "$net" "${configmaps[@]}" "$work/rabbitmq.yaml" >/dev/null 2>"$work/play.log" \
        || { cat "$work/play.log" >&2; die "kube play rabbitmq.yaml failed"; }
    cleanups+=("podman kube down $work/herald.yaml")
    podman kube play --network "$net" "${configmaps[@]}" "$work/herald.yaml" >/dev/null 2>>"$work/play.log" \
        || { cat "$work/play.log" >&2; die "kube play herald.yaml failed"; }

    local ingress=herald-ingress-pod-0-herald-ingress relay=herald-relay-pod-0-herald-relay
    local ingress_ip relay_ip
    ingress_ip=$(podman inspect "$ingress" --format "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}")
    relay_ip=$(podman inspect "$relay" --format "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}")
    say "kube: as written: $(podman inspect "$ingress" --format 'ingress user {{.Config.User}}, read-only root {{.HostConfig.ReadonlyRootfs}}'); $(podman inspect "$relay" --format 'relay user {{.Config.User}}, read-only root {{.HostConfig.ReadonlyRootfs}}')"
    local name ip port
    for name in ingress relay; do
        ip=$ingress_ip port=9090
        [ $name = relay ] && ip=$relay_ip port=9091
        get_ok "http://$ip:$port/healthz" >/dev/null
        get_ok "http://$ip:$port/readyz" >/dev/null
        get_ok "http://$ip:$port/metrics" | grep -q "^herald_" || die "$name /metrics has no herald_ series"
        printf '  %s: /healthz /readyz /metrics ok\n' "$name"
    done
    listen "127.0.0.1:$prosody_port" "$work/kube-ca.pem" "from kube play"
    post "http://$ingress_ip:8080/msg/bob" "hello bob, from kube play"
    received

    # SIGTERM, as the kubelet sends it: each must exit 0 within its
    # terminationGracePeriodSeconds, or podman would SIGKILL it (137).
    local container grace start elapsed code
    for container in "$ingress" "$relay"; do
        grace=$("$py" deploy/k8s/podman-play.py grace "$work/herald.yaml" "${container%%-pod-0-*}")
        start=$SECONDS
        podman stop -t "$grace" "$container" >/dev/null 2>>"$work/play.log"
        elapsed=$((SECONDS - start))
        code=$(podman inspect "$container" --format '{{.State.ExitCode}}')
        if [ "$code" != 0 ] || [ "$elapsed" -gt 5 ]; then
            # What it was doing (the dev overlay logs at debug; DNS noise left out).
            podman logs --tail 200 "$container" 2>&1 | grep -v -e hickory -e rustls | tail -n 20 | sed 's/^/    /'
        fi
        [ "$code" = 0 ] || die "$container exited $code after SIGTERM (grace ${grace}s, took ${elapsed}s)"
        printf '  %s: SIGTERM → exit 0 in %ss (grace %ss)\n' "${container%%-pod-0-*}" "$elapsed" "$grace"
    done
    say "kube: ok"
}

case $what in
    compose) build_receiver; run_compose ;;
    kube) build_receiver; run_kube ;;
    all) build_receiver; run_compose; run_kube ;;
    *) die "unknown mode '$what' (compose, kube, all)" ;;
esac

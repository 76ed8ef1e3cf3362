#!/usr/bin/env bash
# Instructions one service executes per message, counted by valgrind's
# callgrind: the same figure for the same binary and load, however busy or
# slow the machine is (timings on a shared two-core machine swing by half
# from one minute to the next; two counts of the same binary differed by
# under 1 %).
#
#   tests/instructions.sh relay      # per job the relay drains
#   tests/instructions.sh ingress    # per job the ingress accepts
#
# It runs herald-bench twice with its default phases cut short and a backlog
# of N and then 2N jobs (N = 10000, or $HERALD_INSTRUCTIONS_JOBS), the
# service under callgrind, and prints the difference of the two totals
# divided by N: start-up and the other phases cancel out. For the relay that
# is the process started to drain the backlog; for the ingress, the one
# that takes the backlog's posts (it also indexes the relay's outcomes),
# without its password checks (the attack phase's argon2 work, which varies
# with timing).
# Needs what herald-bench needs, and valgrind. About two minutes after the
# release build. Kernel time (system calls, thread switches) is not counted.
set -euo pipefail
cd "$(dirname "$0")/.."

service=${1:?usage: tests/instructions.sh relay|ingress}
case "$service" in relay | ingress) ;; *) echo "relay or ingress, not $service" >&2; exit 2 ;; esac
jobs=${HERALD_INSTRUCTIONS_JOBS:-10000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }

# $HERALD_INSTRUCTIONS_BIN: a directory with release binaries of another
# commit (herald-bench, herald-ingress, herald-relay), to compare.
binaries=${HERALD_INSTRUCTIONS_BIN:-target/release}
if [ -z "${HERALD_INSTRUCTIONS_BIN:-}" ]; then
    cargo build --release --locked -q -p herald-tests --bin herald-bench
    cargo build --release --locked -q -p herald-ingress -p herald-relay
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/release" "$work/out"
for binary in herald-bench herald-ingress herald-relay; do
    cp "$binaries/$binary" "$work/release/"
done
mv "$work/release/herald-$service" "$work/release/herald-$service.real"
cat >"$work/release/herald-$service" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/out/%p.out "$work/release/herald-$service.real" "\$@"
EOF
chmod +x "$work/release/herald-$service"

# The total of the process of the backlog phase: for the relay the last one
# started; for the ingress the largest profile (the first ingress: phase 5
# starts a second one, which does little).
total() {
    rm -f "$work"/out/*
    CARGO=true "$work/release/herald-bench" --rounds 1 --xmpp-messages 2000 --e2e-messages 2000 \
        --latency-time 2s --rate 200 --ingress-time 2s --publish-time 2s --backlog "$1" \
        >"$work/bench.md" 2>"$work/bench.err" || { cat "$work/bench.err" >&2; exit 1; }
    local key=%T@
    if [ "$service" = ingress ]; then key=%s; fi
    local profile
    profile=$(find "$work/out" -name '*.out' -printf "$key %p\n" | sort -n | tail -n 1 | cut -d' ' -f2)
    local all verify=0
    all=$(awk '/^summary:/ {print $2}' "$profile")
    if [ "$service" = ingress ]; then
        # The attack phase's argon2 checks: how many run depends on timing.
        verify=$(callgrind_annotate --inclusive=yes "$profile" | awk '/password::Verifier::verify / {gsub(",", "", $1); print $1; exit}')
    fi
    echo $((all - ${verify:-0}))
}

one=$(total "$jobs")
two=$(total $((2 * jobs)))
echo "herald-$service: $(( (two - one) / jobs )) instructions per job ($one for $jobs jobs, $two for $((2 * jobs)))"

#!/bin/sh
# Turns the public image's environment into a conf.d file, then runs the
# broker in the foreground.
set -eu

conf=/etc/rabbitmq/conf.d/10-herald-image.conf
{
    echo "listeners.tcp.default = 5672"
    echo "management.tcp.port = 15672"
    # Like the public image: the default user may connect from other hosts.
    echo "loopback_users.guest = false"
    if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
        echo "default_user = ${RABBITMQ_DEFAULT_USER}"
    fi
    if [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then
        echo "default_pass = ${RABBITMQ_DEFAULT_PASS}"
    fi
} >"$conf"

if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
    umask 077
    rm -f "$HOME/.erlang.cookie"
    printf '%s' "$RABBITMQ_ERLANG_COOKIE" >"$HOME/.erlang.cookie"
fi

# Not /usr/sbin/rabbitmq-server: Debian's wrapper neither execs nor keeps
# stdout (it writes startup_log). The script below traps SIGTERM and stops
# the node cleanly, which matters as PID 1.
cd "$HOME"
exec /usr/lib/rabbitmq/bin/rabbitmq-server

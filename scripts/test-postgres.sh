#!/usr/bin/env bash
# A throwaway PostgreSQL server (Debian's `postgresql` package) for the shared-registry tests.
#
#   eval "$(scripts/test-postgres.sh start)"   # starts it (idempotent), exports DEFT_TEST_POSTGRES_URL
#   scripts/test-postgres.sh stop
#
# The cluster lives in $DEFT_TEST_PG_DIR (default /tmp/deft-test-postgres), listens on 127.0.0.1 only,
# on $DEFT_TEST_PG_PORT (default 55432), trusts local connections, and holds nothing worth keeping.
# Run as root, the server runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail

dir=${DEFT_TEST_PG_DIR:-/tmp/deft-test-postgres}
port=${DEFT_TEST_PG_PORT:-55432}
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    echo "test-postgres: PostgreSQL server binaries not found; install Debian's package: apt-get install postgresql" >&2
    exit 3
fi
as_owner=()
if [ "$(id -u)" = 0 ]; then
    as_owner=(runuser -u postgres --)
fi

case "${1:-start}" in
start)
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" = 0 ] && chown postgres: "$dir"
        "${as_owner[@]}" "$bindir/initdb" -D "$dir" -U deft --auth=trust -E UTF8 >"$dir.initdb.log" 2>&1 \
            || { cat "$dir.initdb.log" >&2; exit 1; }
    fi
    if ! "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
            || { cat "$dir/server.log" >&2; exit 1; }
    fi
    echo "export DEFT_TEST_POSTGRES_URL=postgresql://deft@127.0.0.1:$port/postgres"
    ;;
stop)
    if [ -f "$dir/PG_VERSION" ]; then
        "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: `start DIR PORT` makes a cluster in DIR (trust
# authentication, listening on localhost:PORT only) with a database `finetune_test`;
# `stop DIR` stops it. Debian's package gives the binaries (apt-get install postgresql);
# initdb refuses root, so as root the cluster belongs to the `postgres` user.
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_owner() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$1" in
start)
    dir=$2 port=$3
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
    as_owner "$bin/initdb" -D "$dir/data" --auth=trust -U postgres >"$dir/initdb.log"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -k $dir -c listen_addresses=localhost" start >/dev/null
    as_owner "$bin/createdb" -h localhost -p "$port" -U postgres finetune_test
    echo "postgresql://postgres@localhost:$port/finetune_test"
    ;;
stop)
    as_owner "$bin/pg_ctl" -D "$2/data" -m fast stop >/dev/null || true
    ;;
esac

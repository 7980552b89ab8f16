#!/usr/bin/env bash
# System packages the tests need besides the Python ones: PostgreSQL's server binaries (the
# PostgreSQL-storage test starts its own server on 127.0.0.1). Idempotent: does nothing when
# pg_ctl is already installed, on PATH or in Debian's /usr/lib/postgresql/<version>/bin.
set -euo pipefail

if command -v pg_ctl >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL (pg_ctl) is missing and this script only knows apt-get (Debian, Ubuntu):" \
         "install the PostgreSQL server with your package manager, then rerun the tests." >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "Installing PostgreSQL needs root: rerun this script as root, or install sudo." >&2
    exit 1
fi

"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql

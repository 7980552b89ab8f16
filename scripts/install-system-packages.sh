#!/usr/bin/env bash
# System packages the tests need besides the Python ones: PostgreSQL's server binaries (the
# PostgreSQL-storage test starts its own server on 127.0.0.1) and Debian's Chromium (the UI test
# drives it headless through playwright; `playwright install` would download browsers instead).
# Idempotent: installs only what is missing. pg_ctl counts as installed on PATH or in Debian's
# /usr/lib/postgresql/<version>/bin; Chromium at /usr/bin/chromium.
set -euo pipefail

missing=()
if ! command -v pg_ctl >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
    missing+=(postgresql)
fi
if [ ! -x /usr/bin/chromium ]; then
    missing+=(chromium)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "Missing system packages: ${missing[*]} (PostgreSQL's pg_ctl and/or /usr/bin/chromium)," \
         "and this script only knows apt-get (Debian, Ubuntu): install them with your package" \
         "manager, then rerun the tests." >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "Installing ${missing[*]} needs root: rerun this script as root, or install sudo." >&2
    exit 1
fi

"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"

#!/bin/sh
# Run a command where it can write nothing and read no /proc: a private mount
# namespace in which every mount is remounted read-only and /proc is covered by
# an empty, read-only tmpfs. Root only (unshare -m). Usage: run_sealed.sh CMD...
set -eu
if [ "${TRAINWARDEN_SEALED:-}" != 1 ]; then
    TRAINWARDEN_SEALED=1 exec unshare -m --propagation private -- "$0" "$@"
fi
# Deepest mounts first, so a remount never hides one not yet done. A mount that
# refuses (a pseudo filesystem) stays as it is; the checks below are what count.
awk '{print $5}' /proc/self/mountinfo | sort -r | while read -r mnt; do
    mount -o remount,bind,ro "$mnt" 2>/dev/null || true
done
mount -t tmpfs -o ro,size=4k,mode=555 sealed-proc /proc
# Prove the seal before trusting it.
if ( : > /tmp/.trainwarden-sealed-probe ) 2>/dev/null; then
    echo "run_sealed: /tmp is still writable" >&2
    exit 111
fi
if [ -e /proc/self ]; then
    echo "run_sealed: /proc is still readable" >&2
    exit 111
fi
export PYTHONDONTWRITEBYTECODE=1
exec "$@"

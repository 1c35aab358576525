# Sourced by scripts/run-example and scripts/test: makes sure .venv exists
# and holds edgeproxy installed with the extras given in $EDGEPROXY_EXTRAS.
# Works on a fresh Debian 12 (Python 3.11), installing python3-venv when
# running as root and it is missing.

set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: $PYTHON not found; install Python 3.11 or newer (Debian: apt-get install python3)" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: edgeproxy needs Python 3.11 or newer, $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "==> python3-venv is missing: installing it with apt-get"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            "$PYTHON" -m venv "$VENV"
        else
            pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            echo "error: '$PYTHON -m venv' failed. On Debian/Ubuntu install the venv module:" >&2
            echo "    sudo apt-get install python3-venv   (or python${pyver}-venv)" >&2
            exit 1
        fi
    fi
fi

echo "==> installing edgeproxy${EDGEPROXY_EXTRAS:-} into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ".${EDGEPROXY_EXTRAS:-}"

# twistd finds plugins by scanning twisted/plugins and caching the result in
# dropin.cache beside them; build the cache now so that no later run (as a
# user who cannot write site-packages) tries to and warns.
"$VENV/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

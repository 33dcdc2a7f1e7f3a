#!/bin/sh
# Set-up for `make demo` and `make test` on a fresh Debian/Ubuntu machine: Debian's mosquitto,
# a virtual environment at .venv with edgefleet and its host + test extras (torch among them, CPU build),
# and the real models (the trained MobileNetV2 exported to ONNX once, in the cache).
# `setup.sh test` also makes the emulated aarch64 the tests run the agent and the arm target's numerics in
# (converter/arm64.py: Debian 12 arm64 under qemu, about 600 MB and 10 minutes, once, in the cache).
# Idempotent: a second run only checks.
set -eu
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

need_apt=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt="$need_apt mosquitto"
# Debian's chromium, which the dashboard's browser test drives (Playwright cannot download a browser here)
[ -x /usr/bin/chromium ] || need_apt="$need_apt chromium"
# systemd-analyze, which checks the agent's unit in the tests (the package is installed, not started)
command -v systemd-analyze >/dev/null 2>&1 || [ -x /usr/bin/systemd-analyze ] || need_apt="$need_apt systemd"
# libfaketime, which runs agents with a wrong wall clock in tests/test_clock_e2e.py
# (/usr/lib/<multiarch>/faketime/libfaketime.so.1)
dpkg-query -W -f='${Status}' libfaketime 2>/dev/null | grep -q "install ok installed" || need_apt="$need_apt libfaketime"
# espeak-ng, which speaks the real speech the voice-activity model (Silero VAD) is calibrated and tested on
command -v espeak-ng >/dev/null 2>&1 || need_apt="$need_apt espeak-ng"
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt="$need_apt python3-venv"
if [ "${1:-}" = test ]; then
    # proot and debootstrap, which make and run the emulated aarch64 (converter/arm64.py); qemu comes from Debian's
    # pool as a .deb it unpacks (dpkg-deb), since Debian 12's own qemu-user crashes on onnxruntime's aarch64 build
    command -v proot >/dev/null 2>&1 || need_apt="$need_apt proot"
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt="$need_apt debootstrap"
    # Debian's PostgreSQL server, which the store's tests start as a throwaway cluster (tests/pgcluster.py: initdb
    # and pg_ctl in a temp dir on a free port; the package's own service is not used)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt="$need_apt postgresql"
fi
if [ -n "$need_apt" ]; then
    echo "setup: installing Debian packages:$need_apt"
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "setup: error: need root (or sudo) to apt-get install$need_apt" >&2; exit 2; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $need_apt >/dev/null
fi

"$PYTHON" - <<'PY' || { echo "setup: error: edgefleet needs Python >= 3.11 (set PYTHON=...)" >&2; exit 2; }
import sys; sys.exit(sys.version_info < (3, 11))
PY

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.edgefleet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing edgefleet[test] into .venv (pip)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 \
        | grep -v "^WARNING: Location" || true
    .venv/bin/python -c 'import edgefleet, agent, converter, fleet, onnxruntime, onnx, paho.mqtt, starlette, skimage, openvino, nncf, ai_edge_litert, prometheus_client, playwright, torch'
    touch "$stamp"
fi

.venv/bin/edgefleet models fetch
.venv/bin/python -c 'from converter.toolchain import onnx2tf_venv; onnx2tf_venv()'
if [ "${1:-}" = test ]; then
    .venv/bin/edgefleet toolchain arm64
fi

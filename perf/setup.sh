#!/usr/bin/env bash
# Install what `python -m perf.bench_routing` and `perf.bench_user` need; safe to run again and again.
#   bash perf/setup.sh [PYTHON]     (PYTHON defaults to .venv/bin/python)
# - Debian packages nats-server and mosquitto (only if their binaries are missing;
#   needs root or sudo). The mosquitto package enables a system service on port
#   1883; the benchmark never uses it (it starts its own broker on a free port).
# - pip packages nats-py and paho-mqtt into PYTHON (pyzmq comes with the project),
#   matplotlib for the user benchmark's plot (perf/user/plot.py) and py-spy for its
#   broker profile (perf/user/profiling.py).
# A system whose piece is missing is reported "unavailable" by the benchmark, so a
# failure here is a warning, not an error.
set -u

PY="${1:-.venv/bin/python}"
status=0

if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi

need_apt=()
for pair in nats-server:nats-server mosquitto:mosquitto; do
    bin="${pair%%:*}" pkg="${pair##*:}"
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        need_apt+=("$pkg")
    fi
done

if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$SUDO" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "perf/setup.sh: cannot install ${need_apt[*]} (need apt-get and root); those systems will be skipped" >&2
        status=1
    else
        echo "perf/setup.sh: installing ${need_apt[*]}" >&2
        $SUDO apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null ||
            { echo "perf/setup.sh: apt-get install ${need_apt[*]} failed" >&2; status=1; }
    fi
fi

if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
    echo "perf/setup.sh: python '$PY' not found (run 'make venv' or pass one)" >&2
    exit 1
fi

if ! "$PY" -c "import nats, paho.mqtt" >/dev/null 2>&1; then
    echo "perf/setup.sh: installing nats-py and paho-mqtt into $PY" >&2
    "$PY" -m pip install --quiet "nats-py>=2.6,<3" "paho-mqtt>=2,<3" ||
        { echo "perf/setup.sh: pip install failed" >&2; status=1; }
fi

if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    echo "perf/setup.sh: installing matplotlib into $PY" >&2
    "$PY" -m pip install --quiet "matplotlib>=3.7,<4" ||
        { echo "perf/setup.sh: pip install matplotlib failed (no plot)" >&2; status=1; }
fi

# py-spy samples the broker for the user benchmark's profile (perf/user/profiling.py);
# a wheel with a static binary, put beside PYTHON.
if [ ! -x "$(dirname "$PY")/py-spy" ] && ! command -v py-spy >/dev/null 2>&1; then
    echo "perf/setup.sh: installing py-spy into $PY" >&2
    "$PY" -m pip install --quiet "py-spy>=0.3,<1" ||
        { echo "perf/setup.sh: pip install py-spy failed (no broker profile)" >&2; status=1; }
fi

exit "$status"

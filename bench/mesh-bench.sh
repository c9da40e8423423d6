#!/usr/bin/env bash
# The mesh peer-latency benchmark (issue #6), one command on one machine:
#   bench/mesh-bench.sh [scenario]        (default: bench/scenarios/lan-wan.toml)
# Builds the release binary, then for every fetch strategy x mesh transport (and the direct
# baselines) starts a fresh origin + peers mesh on loopback, each node behind its own
# `cachemesh relay` (emulated link), places the working set, fetches it cold from the worker with
# `cachemesh bench-mesh-driver`, and writes bench/results/mesh-bench.{csv,md,json} and the plots
# mesh-latency-cdf.png and mesh-origin-egress.png (matplotlib; installed with apt-get if missing).
# Env: OUT=dir (default bench/results), ONLY=hedged/quic,direct-quic (a subset), NO_PLOTS=1,
#      CACHEMESH_BIN=path (skip the build), KEEP=1 (keep the temp dir with node logs).
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:-bench/scenarios/lan-wan.toml}
OUT=${OUT:-bench/results}
[ -f "$SCENARIO" ] || { [ -f "bench/scenarios/$SCENARIO.toml" ] && SCENARIO="bench/scenarios/$SCENARIO.toml"; } || true
[ -f "$SCENARIO" ] || { echo "mesh-bench: no scenario $SCENARIO (see bench/scenarios/)" >&2; exit 2; }
for tool in curl certtool python3; do
  command -v "$tool" >/dev/null || { echo "mesh-bench: $tool is missing (bash .ci/install-deps installs it)" >&2; exit 2; }
done
if [ -z "${CACHEMESH_BIN:-}" ]; then swift build -c release --product cachemesh 2>&1 | tail -1; fi
BIN=${CACHEMESH_BIN:-"$(swift build -c release --show-bin-path)/cachemesh"}
# Plots: Debian's python3-matplotlib lives in the system python (/usr/bin/python3), which may not
# be the `python3` on PATH; use whichever has it, install it with apt-get if neither does.
PY=
if [ -z "${NO_PLOTS:-}" ]; then
  for p in python3 /usr/bin/python3; do "$p" -c 'import matplotlib' 2>/dev/null && { PY=$p; break; }; done
  if [ -z "$PY" ]; then
    echo "mesh-bench: installing python3-matplotlib (Debian) for the plots" >&2
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib >/dev/null
    PY=/usr/bin/python3
  fi
fi
ARGS=(--scenario "$SCENARIO" --bin "$BIN" --out "$OUT" --markdown --command "bench/mesh-bench.sh ${1:-}")
[ -n "${ONLY:-}" ] && ARGS+=(--only "$ONLY")
[ -n "${KEEP:-}" ] && ARGS+=(--keep)
python3 bench/mesh_bench.py "${ARGS[@]}"
if [ -n "$PY" ]; then "$PY" bench/mesh_plots.py "$OUT/mesh-bench.json" "$OUT"; fi
cat "$OUT/mesh-bench.md"

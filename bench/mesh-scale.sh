#!/usr/bin/env bash
# A real mesh of N node processes on one machine (issue 12, "Scale on one machine"):
#   bench/mesh-scale.sh            (N = 24; NODES=32 bench/mesh-scale.sh for another size)
# Builds the release binary (or takes CACHEMESH_BIN), then bench/mesh_scale.py starts an origin and
# N-1 peers on loopback (mTLS, R = 2, W = 2, max_bytes 64M) and measures membership convergence,
# locality convergence after K PUTs, steady-state gossip bytes/node/s (next to
# `cachemesh simulate-gossip` for the same N), churn (kill -9 of 25% of the peers under load,
# restart on their data dirs: nothing lost, R restored) and memory. Writes
# bench/results/mesh-scale.{md,json}. Bounded: the Python part is killed after TIMEOUT seconds
# (default 540; every node dies with it, PR_SET_PDEATHSIG).
# Exit: 0 ok; 1 an acknowledged blob lost or a corrupt read; 2 the run could not finish.
# Env: NODES, BLOBS, STEADY (gossip window, s), OUT (default bench/results), KEEP=1 (keep the temp
#      dir with node logs and data dirs), CACHEMESH_BIN, TIMEOUT, EXTRA (more mesh_scale.py flags).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in curl certtool python3 timeout; do
  command -v "$tool" >/dev/null || { echo "mesh-scale: $tool is missing (bash .ci/install-deps installs it)" >&2; exit 2; }
done
if [ -z "${CACHEMESH_BIN:-}" ]; then swift build -c release --product cachemesh 2>&1 | tail -1; fi
BIN=${CACHEMESH_BIN:-"$(swift build -c release --show-bin-path)/cachemesh"}
OUT=${OUT:-bench/results}
ARGS=(--bin "$BIN" --nodes "${NODES:-24}" --blobs "${BLOBS:-20}" --steady "${STEADY:-30}" --out "$OUT"
      --command "bench/mesh-scale.sh${NODES:+ (NODES=$NODES)}")
[ -n "${KEEP:-}" ] && ARGS+=(--keep)
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && ARGS+=($EXTRA)
rc=0
timeout --signal=TERM --kill-after=20 "${TIMEOUT:-540}" python3 bench/mesh_scale.py "${ARGS[@]}" || rc=$?
[ -f "$OUT/mesh-scale.md" ] && cat "$OUT/mesh-scale.md"
exit "$rc"

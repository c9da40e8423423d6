#!/usr/bin/env bash
# Gossip convergence in virtual time (the real membership + locality state machines, no sockets):
# rounds until 99% of nodes know a new holder, gossip bytes per node per second, memory per entry,
# for mesh sizes 16 -> 1000, over several seeds. Writes bench/results/gossip-sim.md and the plot
# bench/results/gossip-convergence.png (rounds vs N, log x axis, with a log N reference).
# Quick run: SIZES=16,64 SEEDS=1. matplotlib: Debian's python3-matplotlib (bench/mesh-bench.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-16,64,256,1000}
SEEDS=${SEEDS:-3}
if [ -z "${CACHEMESH_BIN:-}" ]; then swift build -c release --product cachemesh 2>&1 | tail -1; fi
BIN=${CACHEMESH_BIN:-"$(swift build -c release --show-bin-path)/cachemesh"}
PY=python3
for p in python3 /usr/bin/python3; do "$p" -c 'import matplotlib' 2>/dev/null && { PY=$p; break; }; done
T=$(mktemp -d /tmp/cachemesh-gossip.XXXXXX)
trap 'rm -rf "$T"' EXIT
mkdir -p bench/results
for s in $(seq 1 "$SEEDS"); do
  echo "gossip-sim: seed $s, sizes $SIZES" >&2
  "$BIN" simulate-gossip --sizes "$SIZES" --seed "$s" --json "$T/seed-$s.json" >&2
done
{
  echo "# Gossip convergence (virtual time)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), command: \`SIZES=$SIZES SEEDS=$SEEDS bench/gossip-sim.sh\`"
  echo "- LAN defaults (probe 1 s, gossip 200 ms to 3 nodes, push-pull 30 s), 0.25 ms ± 0.1 ms one-way delay;"
  echo "  a round = one gossip interval (200 ms); memory = locality map bytes per (digest, holder) entry"
  echo
} > bench/results/gossip-sim.md
"$PY" bench/gossip_plot.py bench/results/gossip-sim.md bench/results/gossip-convergence.png "$T"/seed-*.json >/dev/null
cat bench/results/gossip-sim.md

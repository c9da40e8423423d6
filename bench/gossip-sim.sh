#!/usr/bin/env bash
# Gossip convergence in virtual time (the real membership + locality state machines, no sockets):
# rounds until 99% of nodes know a new holder, gossip bytes per node per second, memory per entry.
# Writes bench/results/gossip-sim.md. SIZES=16,64 for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --product cachemesh 2>&1 | tail -1
BIN="$(swift build -c release --show-bin-path)/cachemesh"
mkdir -p bench/results
{
  echo "# Gossip convergence (virtual time)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), command: \`SIZES=${SIZES:-16,64,256,1000} bench/gossip-sim.sh\`"
  echo "- LAN defaults (probe 1 s, gossip 200 ms to 3 nodes, push-pull 30 s), 0.25 ms ± 0.1 ms one-way delay"
  echo
  "$BIN" simulate-gossip --sizes "${SIZES:-16,64,256,1000}" | sed -n '/^|/,$p'
} | tee bench/results/gossip-sim.md

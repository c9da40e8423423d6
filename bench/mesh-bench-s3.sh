#!/usr/bin/env bash
# The mesh benchmark's origin-only rows with a disk origin and an S3-backed origin, same run:
#   bench/mesh-bench-s3.sh [scenario]      (default: bench/scenarios/lan-wan.toml)
# Starts a throwaway Ceph (Tests/tools/ceph/ceph.sh: 1 mon, 1 memstore OSD, radosgw on loopback),
# then runs bench/mesh_bench.py for, per transport:
#   direct-T                   the baseline (straight from each holder, a disk origin);
#   origin-only/T              every blob from a disk origin;
#   s3-warm/origin-only/T      every blob from an origin with `[origin] backend = "s3"` whose disk
#                              holds them (they were PUT through it, so they are in the bucket too);
#   s3-cold/origin-only/T      the same origin killed and restarted with an empty disk before the
#                              fetch: every read is a read-through from the bucket.
# Each configuration is a fresh mesh (and a fresh bucket). Writes bench/results/mesh-bench-s3.{md,csv,json}.
# Env: TRANSPORTS="tcp quic" (default tcp), OUT=dir, CACHEMESH_BIN=path (skip the build), KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:-bench/scenarios/lan-wan.toml}
[ -f "$SCENARIO" ] || SCENARIO="bench/scenarios/$SCENARIO.toml"
OUT=${OUT:-bench/results}
TRANSPORTS=${TRANSPORTS:-tcp}
if [ -z "${CACHEMESH_BIN:-}" ]; then swift build -c release --product cachemesh 2>&1 | tail -1; fi
BIN=${CACHEMESH_BIN:-"$(swift build -c release --show-bin-path)/cachemesh"}
T=$(mktemp -d /tmp/cachemesh-meshbench-s3.XXXXXX)
cleanup() {
    bash Tests/tools/ceph/ceph.sh stop "$T/ceph" >/dev/null 2>&1 || true
    rm -rf "$T"
}
trap cleanup EXIT
AK=meshbench SK=meshbench-secret
bash Tests/tools/ceph/ceph.sh start "$T/ceph" "$AK" "$SK" >/dev/null
. "$T/ceph/env"
only=()
for t in $TRANSPORTS; do only+=("direct-$t" "origin-only/$t" "s3-warm/origin-only/$t" "s3-cold/origin-only/$t"); done
ARGS=(--scenario "$SCENARIO" --bin "$BIN" --out "$OUT" --markdown --basename mesh-bench-s3
      --command "TRANSPORTS=\"$TRANSPORTS\" bench/mesh-bench-s3.sh ${1:-}"
      --only "$(IFS=,; echo "${only[*]}")" --s3-endpoint "$ENDPOINT" --s3-access-key "$AK" --s3-secret-key "$SK")
[ -n "${KEEP:-}" ] && ARGS+=(--keep)
python3 bench/mesh_bench.py "${ARGS[@]}"
cat "$OUT/mesh-bench-s3.md"

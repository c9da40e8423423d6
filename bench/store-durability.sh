#!/usr/bin/env bash
# PUT throughput of one node with durability = "none" and "fsync" (group commit), 4 KiB and 1 MiB
# blobs, sequential and concurrent, in the same run on the same disk. A benchmark: it measures and
# records, it does not judge. Results: bench/results/store-durability.md.
#   bench/store-durability.sh                  # builds cachemesh in release
#   CACHEMESH_BIN=… SMALL_N=2000 LARGE_N=100 bench/store-durability.sh
# The data directory is under $TMPDIR (default /tmp): its file system is what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=store-durability
source bench/lib.sh
SMALL_N=${SMALL_N:-3000}
LARGE_N=${LARGE_N:-200}
CONCURRENCY=${CONCURRENCY:-"1 16"}
OUT=${OUT:-bench/results/store-durability.md}
# Node certificate: the driver's PUTs are mirror copies (x-cachemesh-mirror), stored as sent.
export CACHEMESH_CA="$T/certs/ca.pem" CACHEMESH_CERT="$T/certs/node.pem" CACHEMESH_KEY="$T/certs/node.key"

# make_set NAME COUNT SIZE: COUNT distinct random blobs in $T/blobs-NAME (files named by SHA-256).
make_set() {
  python3 - "$T/blobs-$1" "$2" "$3" <<'PY'
import hashlib, os, sys
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(d, exist_ok=True)
with open(d + ".list", "w") as out:
    for i in range(n):
        data = os.urandom(size)
        h = hashlib.sha256(data).hexdigest()
        with open(f"{d}/{h}", "wb") as f: f.write(data)
        out.write(f"{h} {size}\n")
PY
}
make_set small "$SMALL_N" 4096
make_set large "$LARGE_N" $((1 << 20))

rows=()
for mode in none fsync; do
  for c in $CONCURRENCY; do
    for set in small large; do
      port=$(free_port)
      printf 'durability = "%s"\n' "$mode" > "$T/$mode.toml"
      start_node "$port" --config "$T/$mode.toml" --max-bytes 8G
      awk -v p="$port" -v cls="$set" '{print cls, $1, $2, "127.0.0.1:" p}' "$T/blobs-$set.list" > "$T/put.list"
      json=$("$BIN" bench-mesh-driver --hashes "$T/put.list" --put-from "$T/blobs-$set" --concurrency "$c")
      row=$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); n=j["placed"]; s=j["elapsed_s"]; b=j["bytes"]; print(f"{n/s:.0f} | {b/s/1048576:.1f} | {s*1000/n:.2f}")' "$json")
      size=$([ "$set" = small ] && echo "4 KiB" || echo "1 MiB")
      n=$([ "$set" = small ] && echo "$SMALL_N" || echo "$LARGE_N")
      rows+=("| $mode | $size | $c | $n | $row |")
      echo "$mode $size c=$c: $row"
      kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; rm -rf "$T/data-$port"
    done
  done
done

fs=$(df -T "$T" | awk 'NR==2 {print $2 " on " $1}')
{
  echo "# Store durability: PUT throughput with durability = none vs fsync"
  echo
  echo "\`bench/store-durability.sh\`, $(date -u +%Y-%m-%d), $(uname -r), $(nproc) cores, data directory on $fs."
  echo "One node (release build), HTTP/2 + TLS on 127.0.0.1, one connection, the given number of PUTs"
  echo "in flight (\`cachemesh bench-mesh-driver --put-from\`), every blob distinct (no dedup)."
  echo
  echo "| durability | blob | in flight | PUTs | PUT/s | MiB/s | ms per PUT (wall / count) |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > "$OUT"
cat "$OUT"

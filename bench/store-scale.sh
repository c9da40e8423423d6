#!/usr/bin/env bash
# Start-up of a node on a big store: a synthetic store of N blobs is written straight into
# data_dir/cas (not through the API), then a release node is started on it and we measure the
# time until it listens, the time until its index is complete (the node's own "index rebuilt"
# log line), and its RSS per indexed blob (RSS with the store minus RSS of the same node on an
# empty store). A benchmark: it measures and records. Results: bench/results/store-scale.md.
#   bench/store-scale.sh                       # N=1000000
#   N=200000 CACHEMESH_BIN=… bench/store-scale.sh
#   MESH=1 DATA=/big/store bench/store-scale.sh   # a store made beforehand (DATA/cas/XX/<hash>),
#                                                 # the node as peer1 of a 3-node mesh (below)
#   DATA=… SCAN_THREADS="1 0" bench/store-scale.sh  # the scan on 1 thread, then on one per CPU
#                                                 # (`scan_threads`), alternated on the same store
#   SCAN_RATE=0 …                                 # `scan_rate` (default 250000 files/s; 0: no bound)
# A big store on a loop-mounted ext4 image: bench/store-image.sh (10 million files in ~3.5 GB).
# With MESH=1 the measured node runs in a topology (origin, peer1 = measured, peer2; replication 1
# so anti-entropy has nothing to copy), gossiping and sending its holdings pages to the others;
# its RSS is taken SETTLE seconds (default 20) after the index is complete.
# Needs ~4 KiB of disk per blob (one block per file) under $TMPDIR (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=store-scale
source bench/lib.sh
N=${N:-1000000}
OUT=${OUT:-bench/results/store-scale.md}
MESH=${MESH:-0}
SETTLE=${SETTLE:-20}

if [ -n "${DATA:-}" ]; then
  N=$(find "$DATA/cas" -type f | wc -l)
  gen_s="made beforehand"
  echo "using $DATA: $N files"
else
echo "writing $N synthetic blobs…"
gen_start=$(date +%s.%N)
python3 - "$T/data/cas" "$N" <<'PY'
import hashlib, os, sys
root, n = sys.argv[1], int(sys.argv[2])
for p in range(256): os.makedirs(f"{root}/{p:02x}", exist_ok=True)
for i in range(n):
    data = b"cachemesh synthetic blob %d\n" % i
    h = hashlib.sha256(data).hexdigest()
    fd = os.open(f"{root}/{h[:2]}/{h}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data); os.close(fd)
PY
gen_s="$(python3 -c "import time; print(f'{time.time() - $gen_start:.1f}')") s"
echo "written in ${gen_s}"
DATA=$T/data
fi

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# CPU time (user + system, all threads) of a process so far, in ms: independent of the machine's load.
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$1/stat"; }
SCAN_THREADS=${SCAN_THREADS:-0}

# run DATA_DIR SCAN_THREADS: starts a node, prints "listen_ms index_ms rss_kib cpu_ms" (cpu: at index complete)
run() {
  local data=$1 port; port=$(free_port)
  printf 'scan_threads = %s\nscan_rate = %s\n' "${2:-0}" "${SCAN_RATE:-250000}" > "$T/node.toml"
  local args=(--config "$T/node.toml" --listen 127.0.0.1:$port --data-dir "$data" --max-bytes 1T
              --cert "$T/certs/node.pem" --key "$T/certs/node.key" --ca "$T/certs/ca.pem")
  if [ "$MESH" = 1 ]; then
    topology "$data" > "$T/topology.toml"
    args=(--topology "$T/topology.toml" --name peer1)
  fi
  rm -f "$T/node.out" "$T/node.log"   # never read the previous run's lines
  local t0; t0=$(date +%s%N)
  "$BIN" node "${args[@]}" > "$T/node.out" 2> "$T/node.log" &
  local pid=$!; PIDS+=($pid)
  until grep -q "listening tcp=" "$T/node.out" 2>/dev/null; do sleep 0.005; done
  local listen_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  until grep -q "blob store index rebuilt" "$T/node.log" "$T/node.out" 2>/dev/null; do sleep 0.05; done
  local cpu; cpu=$(cpu_ms $pid)
  local index_ms; index_ms=$(cat "$T/node.log" "$T/node.out" | grep "blob store index rebuilt" | sed -E 's/.*elapsed_ms=([0-9]+).*/\1/')
  if [ "$MESH" = 1 ]; then sleep "$SETTLE"; else sleep 1; fi   # let the scan's buffers (and the mesh) settle
  local rss; rss=$(rss_kib $pid)
  kill -TERM $pid; wait $pid 2>/dev/null || true
  echo "$listen_ms $index_ms $rss $cpu"
}

# The mesh around the measured node (MESH=1): origin and peer2 on empty stores, started once.
if [ "$MESH" = 1 ]; then
  for n in origin peer1 peer2; do bash certs/mkcerts.sh -o "$T/certs" node $n >/dev/null 2>&1; done
  declare -A MPORT
  for n in origin peer1 peer2; do MPORT[$n]=$(free_port); done
  topology() {
    printf 'name = "store-scale"\nca = "%s"\nreplication = 1\nwrite_quorum = 1\n' "$T/certs/ca.pem"
    for n in origin peer1 peer2; do
      local dir="$T/data-$n" role=peer seeds='["origin"]'
      [ $n = peer1 ] && dir=$1
      [ $n = origin ] && { role=origin; seeds='[]'; }
      printf '\n[[nodes]]\nname = "%s"\nrole = "%s"\ntcp = "127.0.0.1:%s"\ndata_dir = "%s"\nmax_bytes = "1T"\ncert = "%s"\nkey = "%s"\nseeds = %s\n' \
        $n $role ${MPORT[$n]} "$dir" "$T/certs/$n.pem" "$T/certs/$n.key" "$seeds"
    done
  }
  topology "$T/empty" > "$T/topology-others.toml"
  for n in origin peer2; do
    "$BIN" node --topology "$T/topology-others.toml" --name $n > "$T/node-$n.out" 2> "$T/node-$n.log" &
    PIDS+=($!)
  done
fi

load=$(cut -d" " -f1-3 /proc/loadavg)
fs=$(df -T "$DATA" | awk 'NR==2 {print $2 " on " $1}')
read -r e_listen e_index e_rss e_cpu < <(run "$T/empty" 0)
rows=()
for threads in $SCAN_THREADS; do
  for attempt in first second; do
    read -r f_listen f_index f_rss f_cpu < <(run "$DATA" "$threads")
    per_blob=$(python3 -c "print(f'{($f_rss - $e_rss) * 1024 / $N:.1f}')")
    label="$N blobs, scan_threads = $threads ($( [ "$threads" = 0 ] && echo "one per CPU: $(nproc)" || echo "$threads"))"
    [ $attempt = second ] && label="$label, second start"
    rows+=("| $label | ${f_listen} ms | ${f_index} ms | $(python3 -c "print(f'{$f_cpu / 1000:.1f}')") s | $((f_rss / 1024)) MiB | ${per_blob} B |")
    echo "${rows[-1]}"
  done
done
{
  echo "# Store scale: start-up on a store of $N blobs"
  echo
  echo "\`N=$N bench/store-scale.sh\`, $(date -u '+%Y-%m-%d %H:%M') UTC, $(uname -r), $(nproc) cores, data directory on $fs; load before the runs: $load;"
  echo "files written directly into \`cas/XX/\` (${gen_s}), page cache warm"
  echo "(the files were just written; caches are not dropped on this shared machine). Release build,"
  echo "\`scan_rate = ${SCAN_RATE:-250000}\` (files/s; 0: no bound). Listen: process start to the \"listening\" line;"
  [ "$MESH" = 1 ] && echo "mesh on: the node is peer1 of a 3-node topology (origin, peer2 on empty stores; replication 1), RSS ${SETTLE} s after the index is complete;"
  echo "index: the node's own \`elapsed_ms\` of \"blob store index rebuilt\"; CPU: user + system time of the node"
  echo "process from its start to that line (all threads; independent of the machine's load); RSS after the scan."
  echo
  echo "| run | listening after | index complete after | CPU to index | RSS | RSS per blob (minus empty store) |"
  echo "|---|---|---|---|---|---|"
  echo "| empty store | ${e_listen} ms | ${e_index} ms | $(python3 -c "print(f'{$e_cpu / 1000:.1f}')") s | $((e_rss / 1024)) MiB | – |"
  printf '%s\n' "${rows[@]}"
} > "$OUT"
cat "$OUT"

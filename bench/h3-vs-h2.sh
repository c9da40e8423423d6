#!/usr/bin/env bash
# Benchmark (not a test): one run on loopback, our client as the driver:
#   our HTTP/3 (QUIC) vs our HTTP/2 (TLS/TCP) vs Debian's gtlsserver (ngtcp2 HTTP/3 example server),
#   4 KiB GETs (latency p50/p99, sequential, then 16 in flight) and 64 MiB GETs (throughput).
# Writes bench/results/h3-vs-h2.md. Quick run: SMALL_N=500 LARGE_N=3.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL_N=${SMALL_N:-3000}
LARGE_N=${LARGE_N:-10}
BENCH_NAME=h3bench
source bench/lib.sh
NODE_PORT=$(free_port); GTLS_PORT=$(free_port)
mkdir -p "$T/www"
head -c 4096 /dev/urandom > "$T/www/small"; head -c $((64 << 20)) /dev/urandom > "$T/www/large"
SMALL=$(sha256sum "$T/www/small" | cut -d' ' -f1); LARGE=$(sha256sum "$T/www/large" | cut -d' ' -f1)
start_node $NODE_PORT
gtlsserver -q -d "$T/www" --verify-client 127.0.0.1 $GTLS_PORT "$T/certs/node.key" "$T/certs/node.pem" > /dev/null 2>&1 &
PIDS+=($!)
export CACHEMESH_CA="$T/certs/ca.pem" CACHEMESH_CERT="$T/certs/client.pem" CACHEMESH_KEY="$T/certs/client.key"
"$BIN" put "$T/www/small" --server 127.0.0.1:$NODE_PORT >/dev/null
"$BIN" put "$T/www/large" --server 127.0.0.1:$NODE_PORT >/dev/null
run() { # name transport server path size count concurrency
  local line
  line=$("$BIN" bench-fetch --transport "$2" --server "$3" --path "$4" --size "$5" --count "$6" --concurrency "$7")
  echo "[bench] $1: $line" >&2
  echo "| $1 | $(sed -E 's/.*p50_ms=([0-9.]+) p99_ms=([0-9.]+) req_per_s=([0-9.]+) MiB_per_s=([0-9.]+).*/\1 | \2 | \3 | \4/' <<<"$line") |"
}
{
  echo "# Our HTTP/3 vs our HTTP/2 vs gtlsserver (loopback, our client as the driver)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, kernel $(uname -r); command: \`SMALL_N=$SMALL_N LARGE_N=$LARGE_N bench/h3-vs-h2.sh\`"
  echo "- 4 KiB: $SMALL_N GETs one at a time, then 16 in flight; 64 MiB: $LARGE_N GETs one at a time; mTLS everywhere"
  echo
  echo "| test | p50 ms | p99 ms | req/s | MiB/s |"
  echo "|---|---:|---:|---:|---:|"
  run "4 KiB, 1 in flight, cachemesh H2" tcp 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 1
  run "4 KiB, 1 in flight, cachemesh H3" quic 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 1
  run "4 KiB, 1 in flight, gtlsserver H3" quic 127.0.0.1:$GTLS_PORT /small 4096 $SMALL_N 1
  run "4 KiB, 16 in flight, cachemesh H2" tcp 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 16
  run "4 KiB, 16 in flight, cachemesh H3" quic 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 16
  run "4 KiB, 16 in flight, gtlsserver H3" quic 127.0.0.1:$GTLS_PORT /small 4096 $SMALL_N 16
  run "64 MiB, cachemesh H2" tcp 127.0.0.1:$NODE_PORT /cas/$LARGE $((64 << 20)) $LARGE_N 1
  run "64 MiB, cachemesh H3" quic 127.0.0.1:$NODE_PORT /cas/$LARGE $((64 << 20)) $LARGE_N 1
  run "64 MiB, gtlsserver H3" quic 127.0.0.1:$GTLS_PORT /large $((64 << 20)) $LARGE_N 1
} > "$T/table.md"
mkdir -p bench/results
cp "$T/table.md" bench/results/h3-vs-h2.md
cat bench/results/h3-vs-h2.md

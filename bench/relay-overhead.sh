#!/usr/bin/env bash
# Benchmark (not a test): the overhead of `cachemesh relay` (the link emulator) itself.
# One node on loopback; our bench-fetch client as the driver, over TCP (H2) and QUIC (H3):
#   direct to the node  vs  through `cachemesh relay` at zero delay  (should be ~ the same),
#   plus 4 KiB GETs through a relay at --delay 10ms (p50 should be ~ 20 ms + the direct p50).
# Writes bench/results/relay-overhead.md. Quick run: SMALL_N=500 LARGE_N=3 DELAY_N=50.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL_N=${SMALL_N:-3000}
LARGE_N=${LARGE_N:-10}
DELAY_N=${DELAY_N:-200}
BENCH_NAME=relaybench
source bench/lib.sh
NODE_PORT=$(free_port); R0_PORT=$(free_port); R10_PORT=$(free_port)
make_blobs
start_node $NODE_PORT
"$BIN" relay --link 127.0.0.1:$R0_PORT=127.0.0.1:$NODE_PORT > "$T/relay0.out" 2> "$T/relay0.log" &
PIDS+=($!); R0_PID=$!
"$BIN" relay --link 127.0.0.1:$R10_PORT=127.0.0.1:$NODE_PORT --delay 10ms > "$T/relay10.out" 2> "$T/relay10.log" &
PIDS+=($!); R10_PID=$!
for f in relay0 relay10; do
  for _ in $(seq 100); do grep -q "^relay: listening " "$T/$f.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "^relay: listening " "$T/$f.out" || { echo "relay $f did not start:"; cat "$T/$f.out" "$T/$f.log"; exit 1; }
done
put_blobs $NODE_PORT
run() { # name transport server path size count
  local line
  line=$("$BIN" bench-fetch --transport "$2" --server "$3" --path "$4" --size "$5" --count "$6" --concurrency 1)
  echo "[bench] $1: $line" >&2
  echo "| $1 | $(sed -E 's/.*p50_ms=([0-9.]+) p99_ms=([0-9.]+) req_per_s=([0-9.]+) MiB_per_s=([0-9.]+).*/\1 | \2 | \3 | \4/' <<<"$line") |"
}
{
  echo "# Relay overhead: direct vs through \`cachemesh relay\` (loopback, our client as the driver)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, kernel $(uname -r), release build; command: \`SMALL_N=$SMALL_N LARGE_N=$LARGE_N DELAY_N=$DELAY_N bench/relay-overhead.sh\`"
  echo "- one node (\`--listen\` and \`--quic-listen\` on one port), mTLS; relays: \`cachemesh relay --link 127.0.0.1:R=127.0.0.1:NODE\` (zero delay) and the same with \`--delay 10ms\`"
  echo "- 4 KiB: $SMALL_N GETs one at a time ($DELAY_N through the 10 ms relay); 64 MiB: $LARGE_N GETs one at a time"
  echo
  echo "| test | p50 ms | p99 ms | req/s | MiB/s |"
  echo "|---|---:|---:|---:|---:|"
  run "4 KiB, TCP (H2), direct" tcp 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N
  run "4 KiB, TCP (H2), relay 0 ms" tcp 127.0.0.1:$R0_PORT /cas/$SMALL 4096 $SMALL_N
  run "4 KiB, QUIC (H3), direct" quic 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N
  run "4 KiB, QUIC (H3), relay 0 ms" quic 127.0.0.1:$R0_PORT /cas/$SMALL 4096 $SMALL_N
  run "64 MiB, TCP (H2), direct" tcp 127.0.0.1:$NODE_PORT /cas/$LARGE $((64 << 20)) $LARGE_N
  run "64 MiB, TCP (H2), relay 0 ms" tcp 127.0.0.1:$R0_PORT /cas/$LARGE $((64 << 20)) $LARGE_N
  run "64 MiB, QUIC (H3), direct" quic 127.0.0.1:$NODE_PORT /cas/$LARGE $((64 << 20)) $LARGE_N
  run "64 MiB, QUIC (H3), relay 0 ms" quic 127.0.0.1:$R0_PORT /cas/$LARGE $((64 << 20)) $LARGE_N
  run "4 KiB, TCP (H2), relay --delay 10ms" tcp 127.0.0.1:$R10_PORT /cas/$SMALL 4096 $DELAY_N
  run "4 KiB, QUIC (H3), relay --delay 10ms" quic 127.0.0.1:$R10_PORT /cas/$SMALL 4096 $DELAY_N
} > "$T/table.md"
# CPU time of the zero-delay relay (utime + stime) over everything it relayed.
R0_CPU=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' /proc/$R0_PID/stat)
# Stop the relays with SIGTERM: they print their counters and exit 0.
kill -TERM $R0_PID $R10_PID; wait $R0_PID; wait $R10_PID
{
  echo
  echo "Relay counters at exit (SIGTERM):"
  echo
  echo '```'
  grep -h "^relay: counters" "$T/relay0.out" "$T/relay10.out"
  echo '```'
  echo
  R0_MIB=$(grep -h "^relay: counters" "$T/relay0.out" | grep -oE 'bytes_to_(target|client)=[0-9]+' | cut -d= -f2 |
           awk '{s += $1} END {printf "%.0f", s / 1048576}')
  echo "Zero-delay relay CPU: ${R0_CPU} s for ${R0_MIB} MiB relayed (TCP + UDP, both directions) =" \
       "$(awk -v c="$R0_CPU" -v m="$R0_MIB" 'BEGIN {printf "%.2f", c * 1000 / m}') ms per MiB."
} >> "$T/table.md"
mkdir -p bench/results
cp "$T/table.md" bench/results/relay-overhead.md
cat bench/results/relay-overhead.md

#!/usr/bin/env bash
# Benchmark (not a test): the overhead of `cachemesh relay` (the link emulator) itself.
# One node on loopback; our bench-fetch client as the driver, over TCP (H2) and QUIC (H3):
#   direct to the node  vs  through `cachemesh relay` at zero delay  (should be ~ the same),
#   plus 4 KiB GETs through a relay at --delay 10ms (p50 should be ~ 20 ms + the direct p50).
# Each transport gets its own zero-delay relay process, so the relay's CPU time splits by transport
# (reported as CPU seconds per GiB relayed, both directions: independent of the machine's load).
# OLD_RELAY_BIN=path: also run that binary's relay (e.g. the previous release) in the same run, rows
# alternating direct / new relay / old relay, ROUNDS times (default 2).
# Writes bench/results/relay-overhead.md. Quick run: SMALL_N=500 LARGE_N=3 DELAY_N=50 ROUNDS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL_N=${SMALL_N:-3000}
LARGE_N=${LARGE_N:-10}
DELAY_N=${DELAY_N:-200}
ROUNDS=${ROUNDS:-2}
OLD_RELAY_BIN=${OLD_RELAY_BIN:-}
BENCH_NAME=relaybench
source bench/lib.sh
NODE_PORT=$(free_port)
declare -A RPORT RPID
# start_relay NAME BIN [relay flags…]: a relay in front of the node, port in RPORT[NAME].
start_relay() {
  local name=$1 bin=$2; shift 2
  RPORT[$name]=$(free_port)
  "$bin" relay --link 127.0.0.1:${RPORT[$name]}=127.0.0.1:$NODE_PORT "$@" > "$T/relay-$name.out" 2> "$T/relay-$name.log" &
  PIDS+=($!); RPID[$name]=$!
  for _ in $(seq 100); do grep -q "^relay: listening " "$T/relay-$name.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "^relay: listening " "$T/relay-$name.out" || { echo "relay $name did not start:"; cat "$T/relay-$name.out" "$T/relay-$name.log"; exit 1; }
}
make_blobs
start_node $NODE_PORT
RELAYS=(new-tcp new-quic)
start_relay new-tcp "$BIN"; start_relay new-quic "$BIN"
if [ -n "$OLD_RELAY_BIN" ]; then
  start_relay old-tcp "$OLD_RELAY_BIN"; start_relay old-quic "$OLD_RELAY_BIN"; RELAYS+=(old-tcp old-quic)
fi
start_relay delay10 "$BIN" --delay 10ms
put_blobs $NODE_PORT
UDP_ERR0=$(awk '/^Udp:/ && ++n == 2 {print $6}' /proc/net/snmp)
run() { # name transport port path size count
  local line
  line=$("$BIN" bench-fetch --transport "$2" --server "127.0.0.1:$3" --path "$4" --size "$5" --count "$6" --concurrency 1)
  echo "[bench] $1: $line" >&2
  echo "| $1 | $(sed -E 's/.*p50_ms=([0-9.]+) p99_ms=([0-9.]+) req_per_s=([0-9.]+) MiB_per_s=([0-9.]+).*/\1 | \2 | \3 | \4/' <<<"$line") |"
}
# rows SIZE_LABEL PATH SIZE COUNT: direct, new relay, old relay for both transports.
rows() {
  local t tl
  for t in tcp quic; do
    if [ $t = tcp ]; then tl="TCP (H2)"; else tl="QUIC (H3)"; fi
    run "$1, $tl, direct" $t $NODE_PORT "$2" "$3" "$4"
    run "$1, $tl, relay 0 ms (new)" $t ${RPORT[new-$t]} "$2" "$3" "$4"
    if [ -n "$OLD_RELAY_BIN" ]; then run "$1, $tl, relay 0 ms (old)" $t ${RPORT[old-$t]} "$2" "$3" "$4"; fi
  done
}
{
  echo "# Relay overhead: direct vs through \`cachemesh relay\` (loopback, our client as the driver)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, kernel $(uname -r), release build; command: \`SMALL_N=$SMALL_N LARGE_N=$LARGE_N DELAY_N=$DELAY_N ROUNDS=$ROUNDS${OLD_RELAY_BIN:+ OLD_RELAY_BIN=…} bench/relay-overhead.sh\`"
  echo "- load at start: \`$(uptime)\`"
  echo "- one node (\`--listen\` and \`--quic-listen\` on one port), mTLS; zero-delay relays \`cachemesh relay --link 127.0.0.1:R=127.0.0.1:NODE\`, one per transport${OLD_RELAY_BIN:+ and binary (new = this build, old = \`OLD_RELAY_BIN\`)}, and one with \`--delay 10ms\`"
  echo "- 4 KiB: $SMALL_N GETs one at a time ($DELAY_N through the 10 ms relay); 64 MiB: $LARGE_N GETs one at a time; $ROUNDS round(s), rows in the order run"
  echo
  echo "| test | p50 ms | p99 ms | req/s | MiB/s |"
  echo "|---|---:|---:|---:|---:|"
  for _ in $(seq "$ROUNDS"); do
    rows "4 KiB" /cas/$SMALL 4096 $SMALL_N
    rows "64 MiB" /cas/$LARGE $((64 << 20)) $LARGE_N
  done
  run "4 KiB, TCP (H2), relay --delay 10ms" tcp ${RPORT[delay10]} /cas/$SMALL 4096 $DELAY_N
  run "4 KiB, QUIC (H3), relay --delay 10ms" quic ${RPORT[delay10]} /cas/$SMALL 4096 $DELAY_N
} > "$T/table.md"
UDP_ERR1=$(awk '/^Udp:/ && ++n == 2 {print $6}' /proc/net/snmp)
# CPU time (utime + stime) of each zero-delay relay, read before it exits.
declare -A CPU
for r in "${RELAYS[@]}"; do
  CPU[$r]=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' /proc/${RPID[$r]}/stat)
done
# Stop the relays with SIGTERM: they print their counters and exit 0.
for r in "${RELAYS[@]}" delay10; do kill -TERM ${RPID[$r]}; wait ${RPID[$r]}; done
{
  echo
  echo "Relay counters at exit (SIGTERM), and CPU per GiB relayed (TCP + UDP bytes, both directions):"
  echo
  echo "| relay | CPU s | GiB relayed | CPU s per GiB |"
  echo "|---|---:|---:|---:|"
  for r in "${RELAYS[@]}"; do
    gib=$(grep -h "^relay: counters" "$T/relay-$r.out" | grep -oE 'bytes_to_(target|client)=[0-9]+' | cut -d= -f2 |
          awk '{s += $1} END {printf "%.3f", s / 1073741824}')
    echo "| $r | ${CPU[$r]} | $gib | $(awk -v c="${CPU[$r]}" -v g="$gib" 'BEGIN {printf "%.2f", c / g}') |"
  done
  echo
  echo '```'
  for r in "${RELAYS[@]}" delay10; do echo "$r: $(grep -h "^relay: counters" "$T/relay-$r.out")"; done
  echo '```'
  echo
  echo "UDP receive-buffer drops on the machine during the run (/proc/net/snmp RcvbufErrors, all sockets): $((UDP_ERR1 - UDP_ERR0))"
} >> "$T/table.md"
mkdir -p bench/results
cp "$T/table.md" bench/results/relay-overhead.md
cat bench/results/relay-overhead.md

#!/usr/bin/env bash
# Benchmark (not a test): one run on loopback, our client as the driver:
#   our HTTP/3 (QUIC) vs our HTTP/2 (TLS/TCP) vs Debian's gtlsserver (ngtcp2 HTTP/3 example server),
#   4 KiB GETs (latency p50/p99, sequential, then 16 in flight) and 64 MiB GETs (throughput);
#   then 64 MiB again with 8952-byte datagrams (a 9000-byte jumbo-frame LAN) on both QUIC servers
#   (our --quic-max-datagram 8952 vs gtlsserver --max-udp-payload-size=8952; our client sends
#   ACKs and requests at its default size either way).
# Every test runs ROUNDS times, the three servers taking turns within a round, and the table
# shows the median of each figure plus the server's CPU time per request (from /proc), which a
# shared or oversubscribed VM disturbs far less than wall-clock figures.
# Writes bench/results/h3-vs-h2.md. Quick run: SMALL_N=500 LARGE_N=3 ROUNDS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL_N=${SMALL_N:-3000}
LARGE_N=${LARGE_N:-8}
ROUNDS=${ROUNDS:-5}
BENCH_NAME=h3bench
source bench/lib.sh
JUMBO=8952
NODE_PORT=$(free_port); GTLS_PORT=$(free_port); JNODE_PORT=$(free_port); JGTLS_PORT=$(free_port)
make_blobs
start_node $NODE_PORT
NODE_PID=${PIDS[-1]}
start_node $JNODE_PORT --quic-max-datagram $JUMBO
JNODE_PID=${PIDS[-1]}
gtlsserver -q -d "$T/www" --verify-client 127.0.0.1 $GTLS_PORT "$T/certs/node.key" "$T/certs/node.pem" > /dev/null 2>&1 &
GTLS_PID=$!
PIDS+=($GTLS_PID)
gtlsserver -q -d "$T/www" --verify-client --max-udp-payload-size=$JUMBO 127.0.0.1 $JGTLS_PORT "$T/certs/node.key" "$T/certs/node.pem" > /dev/null 2>&1 &
JGTLS_PID=$!
PIDS+=($JGTLS_PID)
put_blobs $NODE_PORT
put_blobs $JNODE_PORT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
STEAL0=$(awk '/^cpu /{print $9}' /proc/stat); TOTAL0=$(awk '/^cpu /{s=0; for (i=2; i<=NF; i++) s+=$i; print s}' /proc/stat)
run() { # name transport server-pid server path size count concurrency
  local before after line
  before=$(cpu_ticks "$3")
  line=$("$BIN" bench-fetch --transport "$2" --server "$4" --path "$5" --size "$6" --count "$7" --concurrency "$8")
  after=$(cpu_ticks "$3")
  echo "[bench] $1: $line server_cpu_ticks=$((after - before))" >&2
  # bench-fetch warms up with min(20, count) requests before it measures `count`.
  echo "$1|$line|$(( (after - before) * 10 ))|$(( $7 + ($7 < 20 ? $7 : 20) ))"
}
for round in $(seq "$ROUNDS"); do
  run "4 KiB, 1 in flight, cachemesh H2" tcp $NODE_PID 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 1
  run "4 KiB, 1 in flight, cachemesh H3" quic $NODE_PID 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 1
  run "4 KiB, 1 in flight, gtlsserver H3" quic $GTLS_PID 127.0.0.1:$GTLS_PORT /small 4096 $SMALL_N 1
  run "4 KiB, 16 in flight, cachemesh H2" tcp $NODE_PID 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 16
  run "4 KiB, 16 in flight, cachemesh H3" quic $NODE_PID 127.0.0.1:$NODE_PORT /cas/$SMALL 4096 $SMALL_N 16
  run "4 KiB, 16 in flight, gtlsserver H3" quic $GTLS_PID 127.0.0.1:$GTLS_PORT /small 4096 $SMALL_N 16
  run "64 MiB, cachemesh H2" tcp $NODE_PID 127.0.0.1:$NODE_PORT /cas/$LARGE $((64 << 20)) $LARGE_N 1
  run "64 MiB, cachemesh H3" quic $NODE_PID 127.0.0.1:$NODE_PORT /cas/$LARGE $((64 << 20)) $LARGE_N 1
  run "64 MiB, gtlsserver H3" quic $GTLS_PID 127.0.0.1:$GTLS_PORT /large $((64 << 20)) $LARGE_N 1
  run "64 MiB, $JUMBO-byte datagrams, cachemesh H3" quic $JNODE_PID 127.0.0.1:$JNODE_PORT /cas/$LARGE $((64 << 20)) $LARGE_N 1
  run "64 MiB, $JUMBO-byte datagrams, gtlsserver H3" quic $JGTLS_PID 127.0.0.1:$JGTLS_PORT /large $((64 << 20)) $LARGE_N 1
done > "$T/runs.txt"
STEAL1=$(awk '/^cpu /{print $9}' /proc/stat); TOTAL1=$(awk '/^cpu /{s=0; for (i=2; i<=NF; i++) s+=$i; print s}' /proc/stat)
STEAL_PCT=$(( (STEAL1 - STEAL0) * 100 / (TOTAL1 - TOTAL0 > 0 ? TOTAL1 - TOTAL0 : 1) ))
mkdir -p bench/results
python3 - "$T/runs.txt" "$SMALL_N" "$LARGE_N" "$ROUNDS" "$STEAL_PCT" "$JUMBO" > bench/results/h3-vs-h2.md <<'PY'
import re, statistics as st, subprocess, sys, time, os
path, small_n, large_n, rounds, steal, jumbo = sys.argv[1:]
rows = {}
for line in open(path):
    name, fig, cpu_ms, requests = line.rstrip("\n").split("|")
    f = dict(re.findall(r"(\w+)=([0-9.]+)", fig))
    rows.setdefault(name, []).append((float(f["p50_ms"]), float(f["p99_ms"]), float(f["req_per_s"]), float(f["MiB_per_s"]),
                                      float(cpu_ms) / int(requests)))
med = {n: [st.median(x[i] for x in v) for i in range(5)] for n, v in rows.items()}
print("# Our HTTP/3 vs our HTTP/2 vs gtlsserver (loopback, our client as the driver)\n")
print(f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} CPUs, kernel {os.uname().release}; "
      f"command: `SMALL_N={small_n} LARGE_N={large_n} ROUNDS={rounds} bench/h3-vs-h2.sh`")
print(f"- 4 KiB: {small_n} GETs one at a time, then 16 in flight; 64 MiB: {large_n} GETs one at a time; mTLS everywhere")
print(f"- every figure is the median of {rounds} rounds (the three servers take turns within a round); "
      f"CPU steal by the hypervisor during the run: {steal}% of all CPU time")
print("- server CPU = the serving process's user + system time per request (warm-up requests included), "
      "the figure least disturbed by other load on the machine\n")
print("| test | p50 ms | p99 ms | req/s | MiB/s | server CPU ms/request |")
print("|---|---:|---:|---:|---:|---:|")
for n, m in med.items():
    print(f"| {n} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.1f} | {m[3]:.1f} | {m[4]:.3f} |")
def ratio(a, b, i): return med[a][i] / med[b][i]
ours, gtls, h2 = "cachemesh H3", "gtlsserver H3", "cachemesh H2"
print("\nRatios (medians):\n")
print(f"- 4 KiB one at a time, p50: our H3 {ratio('4 KiB, 1 in flight, ' + ours, '4 KiB, 1 in flight, ' + gtls, 0):.2f}x gtlsserver's latency, "
      f"server CPU {ratio('4 KiB, 1 in flight, ' + ours, '4 KiB, 1 in flight, ' + gtls, 4):.2f}x")
print(f"- 4 KiB, 16 in flight: our H3 {ratio('4 KiB, 16 in flight, ' + ours, '4 KiB, 16 in flight, ' + gtls, 2):.2f}x gtlsserver's req/s, "
      f"server CPU {ratio('4 KiB, 16 in flight, ' + ours, '4 KiB, 16 in flight, ' + gtls, 4):.2f}x")
print(f"- 64 MiB: our H3 {ratio('64 MiB, ' + ours, '64 MiB, ' + gtls, 3):.2f}x gtlsserver's MiB/s, "
      f"server CPU {ratio('64 MiB, ' + ours, '64 MiB, ' + gtls, 4):.2f}x; "
      f"our H2 {ratio('64 MiB, ' + h2, '64 MiB, ' + ours, 3):.2f}x our H3's MiB/s")
j = f"{jumbo}-byte datagrams"   # as in the run names above
print(f"- 64 MiB with {j}: our H3 {ratio(f'64 MiB, {j}, ' + ours, f'64 MiB, {j}, ' + gtls, 3):.2f}x gtlsserver's MiB/s, "
      f"server CPU {ratio(f'64 MiB, {j}, ' + ours, f'64 MiB, {j}, ' + gtls, 4):.2f}x; "
      f"our H2 {ratio('64 MiB, ' + h2, f'64 MiB, {j}, ' + ours, 3):.2f}x our H3's MiB/s")
PY
cat bench/results/h3-vs-h2.md

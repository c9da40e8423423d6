#!/usr/bin/env bash
# bench/s3-origin.sh - cold reads through an S3-backed origin vs boto3 GETs on the same Ceph RGW.
#
# Starts a throwaway Ceph (Tests/tools/ceph/ceph.sh), puts BLOBS random blobs of SIZE bytes into a
# bucket at cas/<sha256> with boto3, then per round:
#   boto3:  one GET of every blob (Debian's python3-boto3, 1 MiB reads), the baseline;
#   origin: a release `cachemesh node` with `[origin] backend = "s3"` and an EMPTY data dir (every
#           read is a miss: the S3 GET streamed into the verifying store and forwarded to the client
#           while it arrives, the last chunk once verified), one curl GET of every blob over its
#           plaintext local endpoint (HTTP/1.1, like boto3's plain HTTP to RGW), one curl for all blobs.
# Prints MiB/s per round, the ratio, and CPU seconds per GiB of each side (boto3's process; the
# node and curl; the Ceph daemons), which the machine's load does not skew; writes
# bench/results/s3-origin.md. PERF=DIR also records a call-graph profile of the node per round.
#   SIZE=67108864 BLOBS=4 ROUNDS=3 bash bench/s3-origin.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-$((64 << 20))}
BLOBS=${BLOBS:-4}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-bench/results/s3-origin.md}
if [ -z "${CACHEMESH_BIN:-}" ]; then swift build -c release --product cachemesh 2>&1 | tail -1; fi
BIN=${CACHEMESH_BIN:-"$(swift build -c release --show-bin-path)/cachemesh"}
T=$(mktemp -d /tmp/cachemesh-s3bench.XXXXXX)
NODE=
cleanup() {
    [ -n "$NODE" ] && kill -9 "$NODE" 2>/dev/null || true
    bash Tests/tools/ceph/ceph.sh stop "$T/ceph" || true
    rm -rf "$T"
}
trap cleanup EXIT
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
AK=bench SK=bench-secret
bash Tests/tools/ceph/ceph.sh start "$T/ceph" "$AK" "$SK" >/dev/null
. "$T/ceph/env"
S3=(/usr/bin/python3 Tests/tools/ceph/s3.py "$ENDPOINT" "$AK" "$SK")
"${S3[@]}" mb bench
HASHES=()
for i in $(seq "$BLOBS"); do
    head -c "$SIZE" /dev/urandom > "$T/blob"
    h=$(sha256sum "$T/blob" | cut -d' ' -f1)
    "${S3[@]}" put bench "cas/$h" "$T/blob"
    HASHES+=("$h")
done
rm -f "$T/blob"
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$AK" "$SK" > "$T/creds"


mibs() { python3 -c "import sys; print('%.0f' % ($1 / 1048576 / $2))"; }
# CPU seconds (user + system) the given PIDs have used so far, summed.
cpu() {
    local t=0 p
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
    python3 -c "import os; print($t / os.sysconf('SC_CLK_TCK'))"
}
CEPH_PIDS=($(cat "$T/ceph/pids"))
gib=$(python3 -c "print($SIZE * $BLOBS / 1073741824)")
perg() { python3 -c "print('%.2f' % (($2 - $1) / $gib))"; }   # CPU seconds between two readings, per GiB
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
# One origin measurement with binary $1 (tag $2): an empty data dir, every GET a read-through.
# Sets om (MiB/s), nc (node CPU s/GiB), cc (curl CPU s/GiB), ro (Ceph CPU s/GiB meanwhile).
origin_run() {
    local bin=$1 tag=$2
    port=$(free_port); lport=$(free_port)
    rm -rf "$T/data"
    cat > "$T/node.toml" <<EOF
name = "s3bench"
listen = "127.0.0.1:$port"
local = "127.0.0.1:$lport"
data_dir = "$T/data"
max_bytes = "4G"
insecure = true
[origin]
backend = "s3"
endpoint = "$ENDPOINT"
bucket = "bench"
credentials_file = "$T/creds"
EOF
    "$bin" node --config "$T/node.toml" --log-level warning > "$T/node.out" 2> "$T/node.log" &
    NODE=$!
    for _ in $(seq 100); do grep -q "listening tcp=" "$T/node.out" 2>/dev/null && break; sleep 0.1; done
    # PERF=DIR: a call-graph profile of the node during the GETs (DIR/TAG-ROUND.perf.data).
    PERFPID=
    if [ -n "${PERF:-}" ]; then
        mkdir -p "$PERF"
        perf record -F 499 -g -p "$NODE" -o "$PERF/$tag-$r.perf.data" > /dev/null 2>&1 &
        PERFPID=$!
        sleep 1
    fi
    urls=(); for h in "${HASHES[@]}"; do urls+=(-o /dev/null "http://127.0.0.1:$lport/cas/$h"); done
    n0=$(cpu "$NODE"); c2=$(cpu "${CEPH_PIDS[@]}")
    start=$(date +%s.%N)
    # One curl for every blob (one connection, like boto3's one client); its CPU time from time(1).
    codes=$(/usr/bin/time -f '%U %S' -o "$T/curl.time" curl -s -w '%{http_code}\n' "${urls[@]}")
    o=$(python3 -c "import time; print(time.time() - $start)")
    n1=$(cpu "$NODE"); c3=$(cpu "${CEPH_PIDS[@]}")
    if [ -n "$PERFPID" ]; then kill -INT "$PERFPID"; wait "$PERFPID" || true; fi
    for code in $codes; do [ "$code" = 200 ] || { echo "origin GET: HTTP $code"; tail "$T/node.log"; exit 1; }; done
    # Where the forwarded bytes came from (the arriving buffers, or read back from disk).
    fwd=$(curl -s "http://127.0.0.1:$lport/metrics" | awk '/^cachemesh_s3_forwarded_bytes_total/ {printf "%s ", $0}')
    kill -9 "$NODE"; wait "$NODE" 2>/dev/null || true; NODE=
    om=$(mibs "$((SIZE * BLOBS))" "$o")
    nc=$(perg "$n0" "$n1"); cc=$(perg 0 "$(awk '{print $1 + $2}' "$T/curl.time")"); ro=$(perg "$c2" "$c3")
}
rows=()
for r in $(seq "$ROUNDS"); do
    # boto3: every blob once, in one process (timed inside it: Python's start-up is not counted).
    keys=(); for h in "${HASHES[@]}"; do keys+=("cas/$h"); done
    c0=$(cpu "${CEPH_PIDS[@]}")
    read -r _ b bcpu < <("${S3[@]}" bench-get-each bench "${keys[@]}")
    c1=$(cpu "${CEPH_PIDS[@]}")
    bm=$(mibs "$((SIZE * BLOBS))" "$b"); bc=$(perg 0 "$bcpu"); rb=$(perg "$c0" "$c1")
    origin_run "$BIN" origin
    ratio=$(python3 -c "print('%.2f' % ($om / $bm))")
    echo "round $r: boto3 GET $bm MiB/s, origin cold read $om MiB/s, ratio $ratio; CPU s/GiB: boto3 $bc, node $nc, curl $cc, Ceph $rb (boto3 run) / $ro (origin run)"
    rows+=("| $r | $bm | $om | $ratio | $bc | $nc | $cc | $rb / $ro |")
    [ -n "$fwd" ] && echo "  forwarded: $fwd"
    # BASE_BIN=path: the same with another binary (e.g. the previous commit's), same round.
    if [ -n "${BASE_BIN:-}" ]; then
        origin_run "$BASE_BIN" base
        ratio=$(python3 -c "print('%.2f' % ($om / $bm))")
        echo "round $r: BASE_BIN origin cold read $om MiB/s, ratio $ratio; CPU s/GiB: node $nc, curl $cc, Ceph $ro"
        [ -n "$fwd" ] && echo "  forwarded: $fwd"
        rows+=("| $r (${BASE_LABEL:-BASE_BIN}) | $bm | $om | $ratio | $bc | $nc | $cc | $rb / $ro |")
    fi
done
END_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo "# S3-backed origin: cold reads vs boto3 (bench/s3-origin.sh)"
    echo
    echo "$(date -u +%Y-%m-%d), $(nproc) cores, Ceph $(ceph --version | cut -d' ' -f3) (1 mon, 1 memstore OSD, radosgw beast tcp_nodelay) on loopback;"
    echo "$BLOBS blobs of $SIZE bytes per round. boto3: one GET per blob in one process, timed inside it (python3-boto3, 1 MiB reads)."
    echo "origin: release \`cachemesh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)) with \`[origin] backend = \"s3\"\` and an empty data dir, one curl"
    echo "for every blob (one connection) on its plaintext local endpoint: each GET is a read-through (the S3 GET streamed into the"
    echo "verifying store and forwarded while it arrives, the last chunk once the blob verified)."
    echo "Load average (1, 5, 15 min) at the start: ${LOAD:-?}; at the end: $END_LOAD."
    echo
    echo "CPU seconds per GiB (user + system, from /proc and time(1): not slowed by the machine's load, unlike MiB/s): boto3's"
    echo "process; the node; curl; the Ceph daemons (mon, OSD, radosgw) during the boto3 GETs / during the origin's."
    echo
    echo "| round | boto3 GET MiB/s | origin cold read MiB/s | origin / boto3 | boto3 CPU s/GiB | node CPU s/GiB | curl CPU s/GiB | Ceph CPU s/GiB |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} > "$OUT"
echo "wrote $OUT"

#!/usr/bin/env bash
# bench/s3-origin.sh - cold reads through an S3-backed origin vs boto3 GETs on the same Ceph RGW.
#
# Starts a throwaway Ceph (Tests/tools/ceph/ceph.sh), puts BLOBS random blobs of SIZE bytes into a
# bucket at cas/<sha256> with boto3, then per round:
#   boto3:  one GET of every blob (Debian's python3-boto3, 1 MiB reads), the baseline;
#   origin: a release `cachemesh node` with `[origin] backend = "s3"` and an EMPTY data dir (every
#           read is a miss: the S3 GET streamed into the verifying store and forwarded to the client
#           while it arrives, the last chunk once verified), one curl GET of every blob over its
#           plaintext local endpoint (HTTP/1.1, like boto3's plain HTTP to RGW).
# Prints MiB/s per round and the ratio; writes bench/results/s3-origin.md.
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
rows=()
ratios=()
for r in $(seq "$ROUNDS"); do
    # boto3: every blob once, in one process (timed inside it: Python's start-up is not counted).
    keys=(); for h in "${HASHES[@]}"; do keys+=("cas/$h"); done
    b=$("${S3[@]}" bench-get-each bench "${keys[@]}" | cut -d' ' -f2)
    # The origin, empty disk: every GET is a read-through.
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
    lport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
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
    "$BIN" node --config "$T/node.toml" --log-level warning > "$T/node.out" 2> "$T/node.log" &
    NODE=$!
    for _ in $(seq 100); do grep -q "listening tcp=" "$T/node.out" 2>/dev/null && break; sleep 0.1; done
    start=$(date +%s.%N)
    for h in "${HASHES[@]}"; do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$lport/cas/$h")
        [ "$code" = 200 ] || { echo "origin GET $h: HTTP $code"; tail "$T/node.log"; exit 1; }
    done
    o=$(python3 -c "import time; print(time.time() - $start)")
    kill -9 "$NODE"; wait "$NODE" 2>/dev/null || true; NODE=
    total=$((SIZE * BLOBS))
    bm=$(mibs "$total" "$b"); om=$(mibs "$total" "$o")
    ratio=$(python3 -c "print('%.2f' % ($om / $bm))")
    echo "round $r: boto3 GET $bm MiB/s, origin cold read $om MiB/s, ratio $ratio"
    rows+=("| $r | $bm | $om | $ratio |")
    ratios+=("$ratio")
done
{
    echo "# S3-backed origin: cold reads vs boto3 (bench/s3-origin.sh)"
    echo
    echo "$(date -u +%Y-%m-%d), $(nproc) cores, Ceph $(ceph --version | cut -d' ' -f3) (1 mon, 1 memstore OSD, radosgw beast tcp_nodelay) on loopback;"
    echo "$BLOBS blobs of $SIZE bytes per round. boto3: one GET per blob in one process, timed inside it (python3-boto3, 1 MiB reads)."
    echo "origin: \`cachemesh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)) with \`[origin] backend = \"s3\"\` and an empty data dir, one curl GET per"
    echo "blob on its plaintext local endpoint: each is a read-through (the S3 GET streamed into the verifying store and"
    echo "forwarded while it arrives, the last chunk once the blob verified). Load when it started: ${LOAD:-?}."
    echo
    echo "| round | boto3 GET MiB/s | origin cold read MiB/s | origin / boto3 |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} > "$OUT"
echo "wrote $OUT"

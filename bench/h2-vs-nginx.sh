#!/usr/bin/env bash
# bench/h2-vs-nginx.sh - HTTP/2 (or, with PROTO=h1, HTTP/1.1) GET throughput of a cachemesh
# node against nginx over TLS, same machine, same certificates, same files, same h2load runs, one run.
#
# A benchmark, not a test: it always exits 0 once it got numbers, and does not
# judge them. Loopback only (127.0.0.1). See bench/README.md.
#
# Environment:
#   PROTO=h2         h2 (ALPN h2) or h1 (h2load --h1: ALPN http/1.1, one request at a time per
#                    connection unless SMALL_M > 1 pipelines; defaults become SMALL_C=64 SMALL_M=1
#                    and RESULTS=bench/results/h1-vs-nginx.md)
#   SMALL_N=200000   requests of the 4 KiB GET run (h2load -n), c=16 m=10
#   LARGE_N=20       requests of the 64 MiB GET run (h2load -n), c=1 m=1
#   SMALL_C=16 SMALL_M=10 LARGE_C=1 LARGE_M=1
#   WARMUP_N=2000    4 KiB requests sent to each server before measuring (0: none)
#   CACHEMESH_BIN=   use this cachemesh binary instead of building one
#   SKIP_NODE=1      nginx half only (no build, no node)
#   SKIP_NGINX=1     cachemesh half only
#   PIN=1            pin each server to CPU 1 and h2load to CPU 0 (taskset)
#   RESULTS=         where to write the Markdown table
#                    (default: bench/results/h2-vs-nginx.md)
#   KEEP_TMP=1       keep the temp dir (certs, logs, raw h2load output)
#   H2LOAD_TIMEOUT=600  seconds one h2load run may take
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

PROTO=${PROTO:-h2}
case $PROTO in
    h2) PROTO_FLAGS=(); CURL_PROTO=--http2; DEFAULT_C=16; DEFAULT_M=10; PROTO_NAME=HTTP/2 ;;
    h1) PROTO_FLAGS=(--h1); CURL_PROTO=--http1.1; DEFAULT_C=64; DEFAULT_M=1; PROTO_NAME=HTTP/1.1 ;;
    *) echo "[bench] error: PROTO must be h2 or h1" >&2; exit 2 ;;
esac
SMALL_N=${SMALL_N:-200000}
LARGE_N=${LARGE_N:-20}
SMALL_C=${SMALL_C:-$DEFAULT_C}
SMALL_M=${SMALL_M:-$DEFAULT_M}
LARGE_C=${LARGE_C:-1}
LARGE_M=${LARGE_M:-1}
WARMUP_N=${WARMUP_N:-2000}
SKIP_NODE=${SKIP_NODE:-0}
SKIP_NGINX=${SKIP_NGINX:-0}
PIN=${PIN:-0}
KEEP_TMP=${KEEP_TMP:-0}
H2LOAD_TIMEOUT=${H2LOAD_TIMEOUT:-600}
RESULTS=${RESULTS:-$REPO/bench/results/$PROTO-vs-nginx.md}

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] error: $*" >&2; exit 1; }

[[ $SKIP_NODE == 1 && $SKIP_NGINX == 1 ]] && die "SKIP_NODE=1 and SKIP_NGINX=1: nothing to do"
for c in h2load curl sha256sum python3; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found (run .ci/install-deps)"
done
NGINX=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
[[ $SKIP_NGINX == 1 || -x $NGINX ]] || die "nginx not found (run .ci/install-deps)"
command -v certtool >/dev/null 2>&1 || die "certtool not found (run .ci/install-deps)"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/cachemesh-bench.XXXXXX")
NGINX_PID=""
NODE_PID=""

stop_pid() {   # stop_pid PID NAME: TERM, wait up to 10 s, then KILL - only this PID
    local pid=$1 name=$2 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not stop, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_pid "$NODE_PID" cachemesh
    stop_pid "$NGINX_PID" nginx
    if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
        log "temp dir kept: $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

SERVER_CPU=()
CLIENT_CPU=()
if [[ $PIN == 1 ]]; then
    command -v taskset >/dev/null 2>&1 || die "PIN=1 needs taskset (util-linux)"
    [[ $(nproc) -ge 2 ]] || die "PIN=1 needs 2 CPUs"
    SERVER_CPU=(taskset -c 1)
    CLIENT_CPU=(taskset -c 0)
fi

# ---------------------------------------------------------------- build
CM_BIN=""
if [[ $SKIP_NODE != 1 ]]; then
    if [[ -n ${CACHEMESH_BIN:-} ]]; then
        CM_BIN=$CACHEMESH_BIN
        log "using CACHEMESH_BIN=$CM_BIN"
    else
        log "building cachemesh (release)"
        ( cd "$REPO" && swift build -c release --product cachemesh ) >&2
        CM_BIN="$(cd "$REPO" && swift build -c release --show-bin-path)/cachemesh"
    fi
    [[ -x $CM_BIN ]] || die "cachemesh binary not found: $CM_BIN"
fi

# ---------------------------------------------------------------- certs + data
CERTS=$TMP/certs
"$REPO/certs/mkcerts.sh" all "$CERTS" 2>"$TMP/mkcerts.log" || { cat "$TMP/mkcerts.log" >&2; die "mkcerts failed"; }

mkdir -p "$TMP/data"
SMALL=$TMP/data/small.bin
LARGE=$TMP/data/large.bin
head -c 4096 /dev/urandom >"$SMALL"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$LARGE"
SMALL_SHA=$(sha256sum "$SMALL" | cut -d' ' -f1)
LARGE_SHA=$(sha256sum "$LARGE" | cut -d' ' -f1)
log "4 KiB file  sha256 $SMALL_SHA"
log "64 MiB file sha256 $LARGE_SHA"

# check_get BASEURL SHA NAME: an unauthenticated GET (like h2load's) returns the right bytes
check_get() {
    local url="$1/cas/$2" got
    got=$(curl -sS --fail "$CURL_PROTO" --max-time 60 --cacert "$CERTS/ca.pem" "$url" | sha256sum | cut -d' ' -f1) ||
        die "$3: GET $url failed"
    [[ $got == "$2" ]] || die "$3: GET $url returned sha256 $got"
}

# ---------------------------------------------------------------- nginx
NGINX_URL=""
if [[ $SKIP_NGINX != 1 ]]; then
    NGINX_PORT=$(free_port)
    NG=$TMP/nginx
    mkdir -p "$NG/www/cas" "$NG/tmp" "$NG/logs"
    ln "$SMALL" "$NG/www/cas/$SMALL_SHA" 2>/dev/null || cp "$SMALL" "$NG/www/cas/$SMALL_SHA"
    ln "$LARGE" "$NG/www/cas/$LARGE_SHA" 2>/dev/null || cp "$LARGE" "$NG/www/cas/$LARGE_SHA"
    # nginx workers drop to an unprivileged user when started as root: let them
    # reach the served files (mktemp -d made the temp dir 0700)
    chmod 711 "$TMP" "$NG"
    chmod -R a+rX "$NG/www"
    cat >"$NG/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $NG/nginx.pid;
error_log $NG/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $NG/tmp/body;
    proxy_temp_path $NG/tmp/proxy;
    fastcgi_temp_path $NG/tmp/fastcgi;
    uwsgi_temp_path $NG/tmp/uwsgi;
    scgi_temp_path $NG/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;   # else nginx sends GOAWAY after 1000 requests on a connection
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$NGINX_PORT ssl http2;
        ssl_certificate $CERTS/node.pem;
        ssl_certificate_key $CERTS/node.key;
        ssl_protocols TLSv1.3;
        root $NG/www;
        location /cas/ { }
        location / { return 404; }
    }
}
EOF
    "$NGINX" -t -q -p "$NG" -e "$NG/logs/error.log" -c "$NG/nginx.conf" 2>&1 >&2 || die "nginx config test failed"
    "${SERVER_CPU[@]}" "$NGINX" -p "$NG" -e "$NG/logs/error.log" -c "$NG/nginx.conf" >"$NG/logs/stdout.log" 2>&1 &
    NGINX_PID=$!
    NGINX_URL="https://127.0.0.1:$NGINX_PORT"
    log "nginx pid $NGINX_PID on $NGINX_URL"
    ok=0
    for _ in $(seq 100); do
        kill -0 "$NGINX_PID" 2>/dev/null || { cat "$NG/logs/error.log" >&2; die "nginx exited"; }
        if curl -s -o /dev/null --max-time 2 --cacert "$CERTS/ca.pem" "$NGINX_URL/cas/$SMALL_SHA"; then ok=1; break; fi
        sleep 0.1
    done
    [[ $ok == 1 ]] || die "nginx did not come up"
    check_get "$NGINX_URL" "$SMALL_SHA" nginx
    check_get "$NGINX_URL" "$LARGE_SHA" nginx
fi

# ---------------------------------------------------------------- cachemesh node
NODE_URL=""
if [[ $SKIP_NODE != 1 ]]; then
    NODE_PORT=$(free_port)
    NODE_URL="https://127.0.0.1:$NODE_PORT"
    mkdir -p "$TMP/node-data"
    "${SERVER_CPU[@]}" "$CM_BIN" node --listen "127.0.0.1:$NODE_PORT" --data-dir "$TMP/node-data" \
        --max-bytes 4G --cert "$CERTS/node.pem" --key "$CERTS/node.key" --ca "$CERTS/ca.pem" \
        --allow-unauthenticated-reads >"$TMP/node.log" 2>&1 &
    NODE_PID=$!
    log "cachemesh pid $NODE_PID on $NODE_URL"
    CLIENT_TLS=(--cacert "$CERTS/ca.pem" --cert "$CERTS/client.pem" --key "$CERTS/client.key")
    ok=0
    for _ in $(seq 150); do   # up to ~30 s
        kill -0 "$NODE_PID" 2>/dev/null || { tail -n 50 "$TMP/node.log" >&2; die "cachemesh exited"; }
        code=$(curl -s -o /dev/null -w '%{http_code}' --http2 --max-time 2 "${CLIENT_TLS[@]}" "$NODE_URL/healthz" || true)
        if [[ $code == 200 ]]; then ok=1; break; fi
        sleep 0.2
    done
    [[ $ok == 1 ]] || { tail -n 50 "$TMP/node.log" >&2; die "cachemesh /healthz never returned 200"; }
    for f in "$SMALL:$SMALL_SHA" "$LARGE:$LARGE_SHA"; do
        code=$(curl -sS -o "$TMP/put.out" -w '%{http_code}' --http2 --max-time 120 "${CLIENT_TLS[@]}" \
                    -T "${f%%:*}" "$NODE_URL/cas/${f##*:}") || die "upload of ${f##*:} failed"
        [[ $code == 2?? ]] || { cat "$TMP/put.out" >&2; die "upload of ${f##*:}: HTTP $code"; }
    done
    check_get "$NODE_URL" "$SMALL_SHA" cachemesh
    check_get "$NODE_URL" "$LARGE_SHA" cachemesh
fi

# ---------------------------------------------------------------- h2load
# cpu_ticks PID: user+system clock ticks of PID and its live children (nginx's worker), so the
# server's CPU per request can be compared even when the machine is not quiet.
cpu_ticks() {
    local total=0 p f
    for p in "$1" $(pgrep -P "$1" 2>/dev/null || true); do
        f=$(cut -d')' -f2 "/proc/$p/stat" 2>/dev/null) || continue
        read -r -a a <<<"$f"
        total=$((total + a[11] + a[12]))
    done
    echo "$total"
}

# run_h2load NAME BASEURL SHA N C M PID -> prints "req/s MB/s cpu-us/req ok|FAILED(details)"
run_h2load() {
    local name=$1 url="$2/cas/$3" n=$4 c=$5 m=$6 pid=$7
    local out="$TMP/h2load-$name.txt" t0 t1
    log "h2load $name: ${PROTO_FLAGS[*]} -n $n -c $c -m $m -t 1 $url"
    t0=$(cpu_ticks "$pid")
    timeout "$H2LOAD_TIMEOUT" "${CLIENT_CPU[@]}" h2load "${PROTO_FLAGS[@]}" -n "$n" -c "$c" -m "$m" -t 1 "$url" >"$out" 2>&1 || true
    t1=$(cpu_ticks "$pid")
    python3 - "$out" "$n" "$((t1 - t0))" "$(getconf CLK_TCK)" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
n = int(sys.argv[2])
cpu_us = int(sys.argv[3]) / int(sys.argv[4]) * 1e6 / n
fin = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s, ([\d.]+)([KMG]?B)/s", text)
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
st = re.search(r"status codes: (\d+) 2xx", text)
if not fin:
    print("- - - FAILED(no-result)")
    sys.exit(0)
# h2load's units are binary: its "MB" is 2^20 bytes
scale = {"B": 1.0 / 1048576, "KB": 1.0 / 1024, "MB": 1.0, "GB": 1024.0}[fin.group(5)]
rps, mbs = float(fin.group(3)), float(fin.group(4)) * scale
status = "ok"
if not req or int(req.group(4)) != n or not st or int(st.group(1)) != n:
    status = "FAILED(succeeded=%s,2xx=%s,of=%d)" % (req.group(4) if req else "?", st.group(1) if st else "?", n)
print("%.2f %.2f %.1f %s" % (rps, mbs, cpu_us, status))
PY
}

declare -A R   # R[server.test.rps|mbs|status]
servers=()
[[ $SKIP_NGINX != 1 ]] && servers+=(nginx)
[[ $SKIP_NODE != 1 ]] && servers+=(cachemesh)
url_of() { if [[ $1 == nginx ]]; then echo "$NGINX_URL"; else echo "$NODE_URL"; fi; }
pid_of() { if [[ $1 == nginx ]]; then echo "$NGINX_PID"; else echo "$NODE_PID"; fi; }

if [[ $WARMUP_N -gt 0 ]]; then
    for s in "${servers[@]}"; do
        run_h2load "$s-warmup" "$(url_of "$s")" "$SMALL_SHA" "$WARMUP_N" "$SMALL_C" "$SMALL_M" "$(pid_of "$s")" >/dev/null
    done
fi
for t in small large; do
    for s in "${servers[@]}"; do
        if [[ $t == small ]]; then
            read -r rps mbs cpu st < <(run_h2load "$s-small" "$(url_of "$s")" "$SMALL_SHA" "$SMALL_N" "$SMALL_C" "$SMALL_M" "$(pid_of "$s")")
        else
            read -r rps mbs cpu st < <(run_h2load "$s-large" "$(url_of "$s")" "$LARGE_SHA" "$LARGE_N" "$LARGE_C" "$LARGE_M" "$(pid_of "$s")")
        fi
        R[$s.$t.rps]=$rps; R[$s.$t.mbs]=$mbs; R[$s.$t.cpu]=$cpu; R[$s.$t.status]=$st
        log "  $s $t: $rps req/s, $mbs MB/s, $cpu us server CPU per request ($st)"
        [[ $st == ok ]] || { log "  h2load output:"; tail -n 20 "$TMP/h2load-$s-$t.txt" >&2; }
    done
done

# ---------------------------------------------------------------- report
cell() {   # cell SERVER TEST KEY
    local v=${R[$1.$2.$3]:--}
    if [[ $v != - && ${R[$1.$2.status]:-ok} != ok ]]; then v="$v (FAILED)"; fi
    echo "$v"
}
ratio() {  # ratio TEST KEY
    local a=${R[nginx.$1.$2]:-} b=${R[cachemesh.$1.$2]:-}
    if [[ -z $a || -z $b || $a == - || $b == - ]]; then echo "-"; return; fi
    python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (b/a) if a>0 else '-')" "$a" "$b"
}

ratio_inv() {  # ratio_inv TEST KEY: nginx / cachemesh (for costs, where less is better)
    local a=${R[nginx.$1.$2]:-} b=${R[cachemesh.$1.$2]:-}
    if [[ -z $a || -z $b || $a == - || $b == - ]]; then echo "-"; return; fi
    python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b>0 else '-')" "$a" "$b"
}

NGINX_VER=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //' || true)
H2LOAD_VER=$(h2load --version 2>&1 | head -n1)
{
    echo "# $PROTO_NAME GET throughput over TLS: cachemesh vs nginx"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- kernel: $(uname -r), CPUs: $(nproc)$( [[ $PIN == 1 ]] && echo ', servers pinned to CPU 1, h2load to CPU 0')"
    echo "- $NGINX_VER (worker_processes 1, TLSv1.3, no client auth); $H2LOAD_VER (-t 1 ${PROTO_FLAGS[*]})"
    echo "- cachemesh: $( [[ $SKIP_NODE == 1 ]] && echo 'not run (SKIP_NODE=1)' || echo "$CM_BIN (--allow-unauthenticated-reads)")"
    echo "- 4 KiB: h2load -n $SMALL_N -c $SMALL_C -m $SMALL_M; 64 MiB: h2load -n $LARGE_N -c $LARGE_C -m $LARGE_M; warm-up $WARMUP_N x 4 KiB each"
    echo "- MB/s is h2load's figure (2^20 bytes/s, response headers and framing included); ratio = cachemesh / nginx"
    echo "- CPU us/req: the server process's (and nginx's worker's) user+system CPU during the run ÷ requests; for this row the ratio is nginx / cachemesh (above 1: cachemesh spends less)"
    echo "- machine load (1-min average) at the end: $(cut -d' ' -f1 /proc/loadavg)"
    echo
    echo "| test | nginx | cachemesh | ratio |"
    echo "|---|---:|---:|---:|"
    for t in small large; do
        label=$([[ $t == small ]] && echo "4 KiB GET" || echo "64 MiB GET")
        echo "| $label req/s | $(cell nginx $t rps) | $(cell cachemesh $t rps) | $(ratio $t rps) |"
        echo "| $label MB/s | $(cell nginx $t mbs) | $(cell cachemesh $t mbs) | $(ratio $t mbs) |"
        echo "| $label server CPU us/req | $(cell nginx $t cpu) | $(cell cachemesh $t cpu) | $(ratio_inv $t cpu) |"
    done
} >"$TMP/table.md"

echo
cat "$TMP/table.md"
mkdir -p "$(dirname "$RESULTS")"
cp "$TMP/table.md" "$RESULTS"
log "written to $RESULTS"

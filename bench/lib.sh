# Shared by the single-node benchmarks (h3-vs-h2.sh, relay-overhead.sh): sourced, not run.
# Sets BIN (release cachemesh, built unless CACHEMESH_BIN is given), T (a temp dir removed on exit),
# PIDS (processes started with `bg`, TERM then KILL on exit), fresh certificates in $T/certs,
# free_port, start_node PORT [node flags…] (node on TCP + UDP PORT, waits until it listens), make_blobs
# and put_blobs PORT.
if [ -z "${CACHEMESH_BIN:-}" ]; then swift build -c release --product cachemesh 2>&1 | tail -1; fi
BIN=${CACHEMESH_BIN:-"$(swift build -c release --show-bin-path)/cachemesh"}
T=$(mktemp -d "/tmp/cachemesh-${BENCH_NAME:-bench}.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && compgen -G "$T/node-*.log" > /dev/null; then
    echo "benchmark failed (exit $rc); alive: $(for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && echo -n "$p "; done); last node log lines:" >&2
    tail -n 20 "$T"/node-*.log >&2
  fi
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; sleep 0.3
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT
# Node certificates carry the IP SANs 127.0.0.1 and ::1 (mkcerts.sh always adds them), so a client
# connecting to 127.0.0.1 (directly or through a relay) verifies the node's name.
bash certs/mkcerts.sh all "$T/certs" >/dev/null 2>&1
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
start_node() {
  local port=$1; shift
  "$BIN" node --listen 127.0.0.1:$port --quic-listen 127.0.0.1:$port --data-dir "$T/data-$port" --max-bytes 1G \
    --cert "$T/certs/node.pem" --key "$T/certs/node.key" --ca "$T/certs/ca.pem" "$@" > "$T/node-$port.out" 2> "$T/node-$port.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q "listening quic=" "$T/node-$port.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "listening quic=" "$T/node-$port.out" || { echo "node did not start:"; cat "$T/node-$port.log"; exit 1; }
}
# make_blobs: $T/www/small (4 KiB) and $T/www/large (64 MiB) of random bytes; SMALL and LARGE are their SHA-256.
make_blobs() {
  mkdir -p "$T/www"
  head -c 4096 /dev/urandom > "$T/www/small"; head -c $((64 << 20)) /dev/urandom > "$T/www/large"
  SMALL=$(sha256sum "$T/www/small" | cut -d' ' -f1); LARGE=$(sha256sum "$T/www/large" | cut -d' ' -f1)
}
# put_blobs PORT: our client's certificate in the environment (for bench-fetch too), both blobs stored on the node.
put_blobs() {
  export CACHEMESH_CA="$T/certs/ca.pem" CACHEMESH_CERT="$T/certs/client.pem" CACHEMESH_KEY="$T/certs/client.key"
  "$BIN" put "$T/www/small" --server 127.0.0.1:$1 >/dev/null
  "$BIN" put "$T/www/large" --server 127.0.0.1:$1 >/dev/null
}

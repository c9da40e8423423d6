#!/usr/bin/env bash
# Tests/tools/ceph/ceph.sh - a throwaway single-node Ceph with an S3 endpoint (RADOS Gateway),
# for the S3-origin tests and benchmarks. Nothing is installed as a service; everything lives in
# one directory and is stopped by PID.
#
#   ceph.sh start DIR [ACCESS_KEY SECRET_KEY]
#       Starts 1 monitor, 1 OSD (memstore: data in memory, nothing on disk but the monitor's
#       store) and 1 radosgw (beast, tcp_nodelay) on free loopback ports, creates an S3 user with
#       the given keys (default: cachemesh / cachemesh-secret; buckets are made with the S3 API by
#       the caller), waits until an S3 request answers, then
#       prints `endpoint=http://127.0.0.1:PORT`, `tls_endpoint=https://127.0.0.1:PORT2` (the same
#       gateway over TLS, its certificate for IP 127.0.0.1 issued by a throwaway CA made with
#       certtool) and `ca=DIR/tls/ca.pem`, and writes DIR/env (ENDPOINT, TLS_ENDPOINT, CA_FILE,
#       ACCESS_KEY, SECRET_KEY) and DIR/pids. Exit status non-zero (with the logs' tails) if it failed.
#   ceph.sh stop DIR
#       SIGKILL to the PIDs in DIR/pids (radosgw takes ~5 s on SIGTERM; memstore has nothing to
#       flush), then removes DIR.
#   ceph.sh stop-rgw DIR / start-rgw DIR
#       Kills / restarts only the radosgw (an S3 outage for failure tests); same port.
#
# Facts (issue 19): a monitor needs a monmap with its name (without one it is `noname-a` and never
# forms a quorum); with auth none radosgw loops on auth unless `ms mon client mode = crc`; without
# tcp_nodelay small GETs take 44 ms; radosgw creates its pools one by one (~12 s) unless they are
# created first, in parallel, with a short paxos propose interval.
set -euo pipefail

PROG=${0##*/}
die() { echo "$PROG: $*" >&2; exit 1; }

free_ports() {   # three free TCP ports on 127.0.0.1 below the ephemeral range
    /usr/bin/python3 - <<'EOF'
import random, socket
lo = int(open('/proc/sys/net/ipv4/ip_local_port_range').read().split()[0])
found = []
for _ in range(500):
    p = random.randint(max(1024, lo - 12000), lo - 1)
    s = socket.socket()
    try:
        s.bind(('127.0.0.1', p))
        if p not in found:
            found.append(p)
    except OSError:
        pass
    finally:
        s.close()
    if len(found) == 3:
        break
print(*found)
EOF
}

tails() {
    local d=$1
    for f in "$d"/log/*.log "$d"/*.out; do
        [[ -f $f ]] || continue
        echo "--- $f" >&2
        tail -n 15 "$f" >&2
    done
}

kill_pids() {
    local d=$1
    [[ -f $d/pids ]] || return 0
    while read -r pid; do
        [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null || true
    done <"$d/pids"
    while read -r pid; do
        [[ -n $pid ]] || continue
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    done <"$d/pids"
}

start_rgw() {
    local d=$1 rgw_port
    rgw_port=$(cat "$d/rgw_port")
    radosgw -c "$d/ceph.conf" -n client.rgw.a --foreground >"$d/rgw.out" 2>&1 &
    local pid=$!
    echo "$pid" >"$d/rgw.pid"
    echo "$pid" >>"$d/pids"
    wait_s3 "$d" "$rgw_port" || { tails "$d"; die "radosgw did not answer on 127.0.0.1:$rgw_port"; }
}

wait_s3() {   # until an S3 request answers (any HTTP status from radosgw)
    local d=$1 port=$2
    for _ in $(seq 1 600); do
        if curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/" 2>/dev/null | grep -q '^[2-4]'; then
            return 0
        fi
        kill -0 "$(cat "$d/rgw.pid")" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

cmd=${1:-}
case "$cmd" in
start)
    d=${2:?usage: $PROG start DIR [ACCESS SECRET]}
    access=${3:-cachemesh}
    secret=${4:-cachemesh-secret}
    for b in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool; do
        command -v "$b" >/dev/null || die "$b is missing (.ci/install-deps installs ceph-mon, ceph-osd, radosgw, ceph-common)"
    done
    mkdir -p "$d"/{mon,osd,log,run}
    d=$(cd "$d" && pwd)
    : >"$d/pids"
    read -r mon_port rgw_port tls_port < <(free_ports)
    echo "$rgw_port" >"$d/rgw_port"
    # A CA and a server certificate for 127.0.0.1 (ECDSA: made in milliseconds).
    mkdir -p "$d/tls"
    certtool --generate-privkey --key-type ecdsa --outfile "$d/tls/ca.key" 2>/dev/null
    printf 'cn = "ceph.sh test CA"\nca\ncert_signing_key\nexpiration_days = 30\n' >"$d/tls/ca.tmpl"
    certtool --generate-self-signed --load-privkey "$d/tls/ca.key" --template "$d/tls/ca.tmpl" --outfile "$d/tls/ca.pem" 2>/dev/null
    certtool --generate-privkey --key-type ecdsa --outfile "$d/tls/rgw.key" 2>/dev/null
    printf 'cn = "radosgw"\nip_address = "127.0.0.1"\ntls_www_server\nexpiration_days = 30\n' >"$d/tls/rgw.tmpl"
    certtool --generate-certificate --load-privkey "$d/tls/rgw.key" --load-ca-certificate "$d/tls/ca.pem" \
        --load-ca-privkey "$d/tls/ca.key" --template "$d/tls/rgw.tmpl" --outfile "$d/tls/rgw.pem" 2>/dev/null \
        || die "certtool could not make the gateway's certificate"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$d/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms bind ipv4 = true
ms bind ipv6 = false
run dir = $d/run
log file = $d/log/\$name.log
pid file = $d/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
paxos propose interval = 0.1
mon tick interval = 1
osd pool default pg autoscale mode = off
mon data avail warn = 1
mon data avail crit = 0
debug ms = 0
mon osd full ratio = .99
mon osd nearfull ratio = .98
osd failsafe full ratio = .995

[mon]
mon data = $d/mon/\$cluster-\$id

[osd]
osd data = $d/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 460
osd max object namespace len = 64

[client]
admin socket =

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port ssl_endpoint=127.0.0.1:$tls_port ssl_certificate=$d/tls/rgw.pem ssl_private_key=$d/tls/rgw.key tcp_nodelay=1
rgw data = $d/rgw
rgw dns name = localhost
rgw enable usage log = false
rgw thread pool size = 64
EOF
    conf=(-c "$d/ceph.conf")
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$d/monmap" >/dev/null
    ceph-mon "${conf[@]}" --mkfs -i a --monmap "$d/monmap" >/dev/null 2>"$d/mkfs.out" || { tails "$d"; die "ceph-mon --mkfs failed"; }
    ceph-mon "${conf[@]}" -i a --foreground >"$d/mon.out" 2>&1 &
    echo $! >>"$d/pids"
    # One OSD (id 0 in a fresh cluster) and radosgw's pools, made by one `ceph` process reading
    # its commands from stdin (each CLI start costs ~0.3 s; radosgw alone would make the pools one
    # by one), while the OSD's store is made.
    pools=(.rgw.root default.rgw.log default.rgw.control default.rgw.meta default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec)
    {
        echo "osd create"
        echo "osd crush add osd.0 1.0 host=localhost root=default"
        for p in "${pools[@]}"; do echo "osd pool create $p 8 8"; done
    } | ceph "${conf[@]}" --connect-timeout 20 >"$d/ceph-cli.out" 2>&1 &
    cli=$!
    mkdir -p "$d/osd/ceph-0"
    ceph-osd "${conf[@]}" -i 0 --mkfs >"$d/osd-mkfs.out" 2>&1 || { tails "$d"; kill_pids "$d"; die "ceph-osd --mkfs failed"; }
    wait "$cli" || { tails "$d"; kill_pids "$d"; die "ceph (osd create, pool create) failed"; }
    ceph-osd "${conf[@]}" -i 0 --foreground >"$d/osd.out" 2>&1 &
    echo $! >>"$d/pids"
    radosgw-admin "${conf[@]}" user create --uid cachemesh --display-name CacheMesh \
        --access-key "$access" --secret-key "$secret" >"$d/user.out" 2>&1 || { tails "$d"; kill_pids "$d"; die "radosgw-admin user create failed"; }
    start_rgw "$d"
    cat >"$d/env" <<EOF
ENDPOINT=http://127.0.0.1:$rgw_port
TLS_ENDPOINT=https://127.0.0.1:$tls_port
CA_FILE=$d/tls/ca.pem
ACCESS_KEY=$access
SECRET_KEY=$secret
EOF
    echo "endpoint=http://127.0.0.1:$rgw_port"
    echo "tls_endpoint=https://127.0.0.1:$tls_port"
    echo "ca=$d/tls/ca.pem"
    ;;
stop)
    d=${2:?usage: $PROG stop DIR}
    [[ -d $d ]] || exit 0
    kill_pids "$d"
    rm -rf "$d"
    ;;
stop-rgw)
    d=${2:?usage: $PROG stop-rgw DIR}
    pid=$(cat "$d/rgw.pid")
    kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    ;;
start-rgw)
    d=${2:?usage: $PROG start-rgw DIR}
    start_rgw "$d"
    ;;
*)
    die "usage: $PROG start DIR [ACCESS SECRET] | stop DIR | stop-rgw DIR | start-rgw DIR"
    ;;
esac

#!/usr/bin/env bash
# mkcerts.sh - make the X.509 certificates of a CacheMesh mesh with GnuTLS certtool.
#
# Roles are carried in the subject's Organizational Unit (OU=node|client|reader),
# with CN=NAME and O=CacheMesh. Keys are ECDSA P-256. See certs/README.md.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)

DAYS=${DAYS:-825}          # leaf certificates
CA_DAYS=${CA_DAYS:-3650}   # CAs outlive the leaves they sign
ORG=CacheMesh

usage() {
    cat <<EOF
Usage: $PROG [-o DIR] [--force] COMMAND [ARGS]

Makes the certificates of a CacheMesh mesh (GnuTLS certtool, ECDSA P-256).
Files go to DIR (default: $SCRIPT_DIR/out). Existing files are kept:
the CA is created only if absent, and a leaf certificate is reissued only if
it is missing, not signed by the CA, lacks a requested SAN, or --force is given.
Existing private keys are always reused.

Commands:
  ca                                   make the mesh CA (ca.pem, ca.key) if absent
  node NAME [--ip IP]... [--dns DNS]...
                                       node certificate, OU=node, TLS server+client;
                                       SANs: the given IPs/DNS names plus
                                       127.0.0.1, ::1 and localhost
  client NAME                          client certificate, OU=client (read+write)
  reader NAME                          reader certificate, OU=reader (read-only)
  all [DIR]                            ca + node "node" + client "client" +
                                       reader "reader" + an unrelated CA "otherca"
                                       with a client "stranger" signed by it
                                       (for negative tests)

Options:
  -o, --out DIR    output directory (created if needed)
  -f, --force      reissue leaf certificates even if valid ones exist
  -h, --help       this message

Every command writes NAME.pem (certificate), NAME.key (private key, mode 600)
and NAME.pkcs8.key (the same key, unencrypted PKCS#8, mode 600) - node, client
and reader commands also make the CA first if it is absent.
Environment: DAYS (leaf validity in days, default 825), CA_DAYS (default 3650);
both must be positive whole numbers. Keys are written with openssl (32-byte
private scalars, which every TLS stack loads).

Examples:
  $PROG all /tmp/mesh-certs
  $PROG -o certs/out node cache-1 --ip 10.0.0.5 --dns cache-1.internal
  $PROG -o certs/out client ci-writer
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

command -v certtool >/dev/null 2>&1 ||
    die "certtool not found (Debian package gnutls-bin; .ci/install-deps installs it)"

# certtool takes -1 (and other negatives) for "never expires": only whole positive days here.
for v in DAYS CA_DAYS; do
    [[ ${!v} =~ ^[1-9][0-9]{0,5}$ ]] ||
        die "$v must be a positive number of days (1-999999), got '${!v}'"
done

command -v openssl >/dev/null 2>&1 ||
    die "openssl not found (Debian package openssl; .ci/install-deps installs it)"

# ---- argument parsing: -o/--force may appear before or after the command ----
OUT=""
FORCE=0
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -o|--out)   [[ $# -ge 2 ]] || die "$1 needs a directory"; OUT=$2; shift 2 ;;
        --out=*)    OUT=${1#--out=}; shift ;;
        -f|--force) FORCE=1; shift ;;
        -h|--help|help) usage; exit 0 ;;
        --)         shift; ARGS+=("$@"); break ;;
        *)          ARGS+=("$1"); shift ;;
    esac
done
[[ ${#ARGS[@]} -ge 1 ]] || { usage >&2; exit 2; }
CMD=${ARGS[0]}
ARGS=("${ARGS[@]:1}")

TMPDIR_MK=$(mktemp -d)
trap 'rm -rf "$TMPDIR_MK"' EXIT

valid_name() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]] || die "invalid name '$1' (letters, digits, . _ -)"
    case "$1" in
        ca|otherca) die "'$1' is reserved for a CA" ;;
        *.pkcs8) die "'$1' would clash with a PKCS#8 key file" ;;
    esac
}

# make_key BASE [nop8]: OUT/BASE.key (ECDSA P-256, SEC1 "EC PRIVATE KEY") unless
# present, and (unless nop8) BASE.pkcs8.key, the same key as unencrypted PKCS#8
# (rewritten if older). Keys are written by openssl: certtool 3.7.9 sometimes
# encodes the private scalar in 33 bytes with a leading zero (RFC 5915 says 32),
# which Python's cryptography (and other strict readers) refuse. A key such a
# certtool wrote earlier is re-encoded in place (the same key, 32 bytes).
make_key() {
    local base=$1 key="$OUT/$1.key" p8="$OUT/$1.pkcs8.key"
    if [[ ! -s $key ]]; then
        log "generating ECDSA P-256 key $key"
        ( umask 077
          openssl ecparam -name prime256v1 -genkey -noout \
                  -out "$TMPDIR_MK/$base.key" 2>/dev/null ) || die "openssl could not make a P-256 key"
        mv -f "$TMPDIR_MK/$base.key" "$key"
    else
        # openssl writes the scalar in exactly 32 bytes; replace the file only if that differs.
        ( umask 077
          openssl ec -in "$key" -out "$TMPDIR_MK/$base.sec1.key" 2>/dev/null ) ||
            die "$key is not an EC private key openssl can read"
        if ! cmp -s "$key" "$TMPDIR_MK/$base.sec1.key"; then
            log "re-encoding $key (same key; 32-byte private scalar as RFC 5915 says)"
            mv -f "$TMPDIR_MK/$base.sec1.key" "$key"
        fi
    fi
    chmod 600 "$key"
    [[ ${2:-} == nop8 ]] && return 0
    if [[ ! -s $p8 || $key -nt $p8 ]]; then
        ( umask 077
          openssl pkcs8 -topk8 -nocrypt -in "$key" \
                  -out "$TMPDIR_MK/$base.pkcs8.key" 2>/dev/null ) || die "openssl could not write $p8"
        mv -f "$TMPDIR_MK/$base.pkcs8.key" "$p8"
    fi
    chmod 600 "$p8"
    grep -q -- "-----BEGIN PRIVATE KEY-----" "$p8" || die "$p8 is not unencrypted PKCS#8"
}

# make_ca BASE CN: self-signed CA BASE.pem/BASE.key, only if absent
make_ca() {
    local base=$1 cn=$2 pem="$OUT/$1.pem"
    if [[ -s $pem && -s "$OUT/$base.key" ]]; then
        [[ -n ${CA_SEEN[$base]:-} ]] || log "CA $pem exists, reusing it"
        CA_SEEN[$base]=1
        chmod 600 "$OUT/$base.key"
        return 0
    fi
    [[ -e $pem ]] && die "$pem exists but $OUT/$base.key does not; refusing to replace a CA"
    make_key "$base" nop8
    CA_SEEN[$base]=1
    cat >"$TMPDIR_MK/$base.tmpl" <<EOF
cn = "$cn"
organization = "$ORG"
expiration_days = $CA_DAYS
ca
cert_signing_key
crl_signing_key
EOF
    log "creating CA $pem (CN=$cn, $CA_DAYS days)"
    certtool --generate-self-signed --load-privkey "$OUT/$base.key" \
             --template "$TMPDIR_MK/$base.tmpl" --no-text \
             --outfile "$TMPDIR_MK/$base.pem" 2>/dev/null
    mv -f "$TMPDIR_MK/$base.pem" "$pem"
    chmod 644 "$pem"
}

# cert_ok PEM CA_PEM SAN...: true if PEM is signed by CA_PEM and has every SAN given
cert_ok() {
    local pem=$1 ca=$2; shift 2
    [[ -s $pem ]] || return 1
    certtool --verify --load-ca-certificate "$ca" --infile "$pem" >/dev/null 2>&1 || return 1
    local info san
    info=$(certtool -i --infile "$pem" 2>/dev/null | sed 's/^[[:space:]]*//') || return 1
    for san in "$@"; do
        grep -qixF -- "$san" <<<"$info" || return 1
    done
}

# make_leaf CA_BASE NAME ROLE SERVER(0|1) [ip:IP|dns:NAME]...
make_leaf() {
    local cabase=$1 name=$2 role=$3 server=$4; shift 4
    local pem="$OUT/$name.pem" capem="$OUT/$cabase.pem" cakey="$OUT/$cabase.key"
    local sans=("$@") checks=() s
    for s in "${sans[@]+"${sans[@]}"}"; do
        case "$s" in
            ip:*)  checks+=("IPAddress: ${s#ip:}") ;;
            dns:*) checks+=("DNSname: ${s#dns:}") ;;
        esac
    done
    make_key "$name"
    if [[ $FORCE -eq 0 ]] && cert_ok "$pem" "$capem" "${checks[@]+"${checks[@]}"}" &&
       certtool -i --infile "$pem" 2>/dev/null | grep -E "^[[:space:]]*Subject:" |
           grep -qE "(:|,) ?OU=$role(,|\$)"; then
        log "$pem exists and is valid (OU=$role, signed by $cabase), keeping it (--force to reissue)"
        return 0
    fi
    {
        echo "cn = \"$name\""
        echo "organization = \"$ORG\""
        echo "unit = \"$role\""
        echo "expiration_days = $DAYS"
        echo "signing_key"
        echo "tls_www_client"
        [[ $server -eq 1 ]] && echo "tls_www_server"
        for s in "${sans[@]+"${sans[@]}"}"; do
            case "$s" in
                ip:*)  echo "ip_address = \"${s#ip:}\"" ;;
                dns:*) echo "dns_name = \"${s#dns:}\"" ;;
            esac
        done
    } >"$TMPDIR_MK/$name.tmpl"
    log "issuing $pem (CN=$name, O=$ORG, OU=$role, signed by $cabase, $DAYS days)"
    certtool --generate-certificate --load-privkey "$OUT/$name.key" \
             --load-ca-certificate "$capem" --load-ca-privkey "$cakey" \
             --template "$TMPDIR_MK/$name.tmpl" --no-text \
             --outfile "$TMPDIR_MK/$name.pem" 2>/dev/null
    certtool --verify --load-ca-certificate "$capem" --infile "$TMPDIR_MK/$name.pem" >/dev/null 2>&1 ||
        die "freshly issued $name.pem does not verify against $capem"
    mv -f "$TMPDIR_MK/$name.pem" "$pem"
    chmod 644 "$pem"
}

declare -A CA_SEEN=()
mesh_ca()  { make_ca ca "CacheMesh Mesh CA"; }
other_ca() { make_ca otherca "CacheMesh Unrelated CA (negative tests only)"; }

cmd_node() {
    [[ ${#ARGS[@]} -ge 1 ]] || die "usage: $PROG node NAME [--ip IP]... [--dns NAME]..."
    local name=${ARGS[0]} i sans=() ips=() dnss=()
    valid_name "$name"
    i=1
    while [[ $i -lt ${#ARGS[@]} ]]; do
        case "${ARGS[$i]}" in
            --ip)    [[ $((i+1)) -lt ${#ARGS[@]} ]] || die "--ip needs an address"
                     ips+=("${ARGS[$((i+1))]}"); i=$((i+2)) ;;
            --ip=*)  ips+=("${ARGS[$i]#--ip=}"); i=$((i+1)) ;;
            --dns)   [[ $((i+1)) -lt ${#ARGS[@]} ]] || die "--dns needs a name"
                     dnss+=("${ARGS[$((i+1))]}"); i=$((i+2)) ;;
            --dns=*) dnss+=("${ARGS[$i]#--dns=}"); i=$((i+1)) ;;
            *) die "node: unexpected argument '${ARGS[$i]}'" ;;
        esac
    done
    local x
    for x in "${ips[@]+"${ips[@]}"}"; do
        [[ $x =~ ^[0-9A-Fa-f.:]+$ ]] || die "bad --ip '$x'"
    done
    for x in "${dnss[@]+"${dnss[@]}"}"; do
        [[ $x =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die "bad --dns '$x'"
    done
    # always-present SANs first, then the requested ones (deduplicated)
    local seen=" "
    for x in ip:127.0.0.1 ip:::1 dns:localhost \
             "${ips[@]/#/ip:}" "${dnss[@]/#/dns:}"; do
        [[ $x == ip: || $x == dns: ]] && continue
        [[ $seen == *" $x "* ]] && continue
        seen+="$x "; sans+=("$x")
    done
    mesh_ca
    make_leaf ca "$name" node 1 "${sans[@]}"
}

cmd_simple() {   # client|reader NAME
    local role=$1
    [[ ${#ARGS[@]} -eq 1 ]] || die "usage: $PROG $role NAME"
    valid_name "${ARGS[0]}"
    mesh_ca
    make_leaf ca "${ARGS[0]}" "$role" 0
}

cmd_all() {
    [[ ${#ARGS[@]} -le 1 ]] || die "usage: $PROG all [DIR]"
    if [[ ${#ARGS[@]} -eq 1 ]]; then
        [[ -z $OUT || $OUT == "${ARGS[0]}" ]] || die "both -o $OUT and DIR ${ARGS[0]} given"
        OUT=${ARGS[0]}
    fi
    setup_out
    mesh_ca
    ARGS=(node); cmd_node
    make_leaf ca client client 0
    make_leaf ca reader reader 0
    other_ca
    make_leaf otherca stranger client 0
}

setup_out() {
    [[ -n $OUT ]] || OUT="$SCRIPT_DIR/out"
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
}

case "$CMD" in
    ca)     [[ ${#ARGS[@]} -eq 0 ]] || die "usage: $PROG ca"; setup_out; mesh_ca ;;
    node)   setup_out; cmd_node ;;
    client) setup_out; cmd_simple client ;;
    reader) setup_out; cmd_simple reader ;;
    all)    cmd_all ;;
    *)      echo "$PROG: unknown command '$CMD'" >&2; usage >&2; exit 2 ;;
esac
log "done: $OUT"

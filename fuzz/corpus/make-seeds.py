#!/usr/bin/env python3
"""Regenerates the gRPC and route seed corpora (gossip seeds were written with JSONEncoder from
MeshCore's own types; http-head seeds are hand-made). Run from fuzz/: python3 corpus/make-seeds.py"""
import hashlib, os, struct

def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F; n >>= 7
        if n: out += bytes([b | 0x80])
        else: return out + bytes([b])
def key(f, wt): return varint(f << 3 | wt)
def ld(f, b): return key(f, 2) + varint(len(b)) + b
def vi(f, n): return key(f, 0) + varint(n)
def s(f, t): return ld(f, t.encode())
def digest(h, n): return s(1, h) + vi(2, n)
def frame(p): return b"\0" + struct.pack(">I", len(p)) + p

METHODS = ["FindMissingBlobs", "BatchUpdateBlobs", "BatchReadBlobs", "GetTree", "GetActionResult",
           "UpdateActionResult", "GetCapabilities", "Read", "Write"]
def seed(name, method, body, split=0):
    with open(f"corpus/grpc/{name}", "wb") as f:
        f.write(bytes([METHODS.index(method), split]) + body)

hello = b"hello"; hh = hashlib.sha256(hello).hexdigest()
dirmsg = ld(1, s(1, "hello.txt") + ld(2, digest(hh, 5)) + vi(4, 1))   # Directory{files:[hello.txt]}
dh = hashlib.sha256(dirmsg).hexdigest()
root = ld(2, s(1, "sub") + ld(2, digest(dh, len(dirmsg))))            # Directory{directories:[sub]}
rh = hashlib.sha256(root).hexdigest()
missing = "0" * 63 + "1"
os.makedirs("corpus/grpc", exist_ok=True)
seed("find-missing", "FindMissingBlobs", frame(s(1, "main") + ld(2, digest(hh, 5)) + ld(2, digest(missing, 10)) + vi(3, 1)))
seed("find-missing-split", "FindMissingBlobs", frame(ld(2, digest(hh, 5))), split=3)
seed("batch-update", "BatchUpdateBlobs", frame(s(1, "") +
     ld(2, ld(1, digest(hh, 5)) + ld(2, hello)) +
     ld(2, ld(1, digest(dh, len(dirmsg))) + ld(2, dirmsg)) +
     ld(2, ld(1, digest(rh, len(root))) + ld(2, root)) +
     ld(2, ld(1, digest(missing, 3)) + ld(2, b"bad"))))
seed("batch-read", "BatchReadBlobs", frame(ld(2, digest(hh, 5)) + ld(2, digest(missing, 1))))
seed("get-tree", "GetTree", frame(ld(2, digest(rh, len(root))) + vi(3, 2)))
seed("get-tree-token", "GetTree", frame(ld(2, digest(rh, len(root))) + vi(3, 1) + s(4, "1")))
seed("get-action-result", "GetActionResult", frame(ld(2, digest(hh, 5)) + vi(3, 1)))
seed("update-action-result", "UpdateActionResult", frame(ld(2, digest(hh, 5)) +
     ld(3, ld(4, s(1, "out/hello") + ld(2, digest(hh, 5))) + vi(4, 0))))
seed("get-capabilities", "GetCapabilities", frame(s(1, "main")))
seed("bytestream-read", "Read", frame(s(1, f"blobs/{hh}/5") + vi(2, 1) + vi(3, 3)))
seed("bytestream-write", "Write", frame(s(1, f"uploads/1b4e28ba-2fa1-11d2-883f-0016d3cca427/blobs/{hh}/5") + vi(2, 0) + ld(10, b"hel")) +
     frame(vi(2, 3) + vi(3, 1) + ld(10, b"lo")), split=7)
seed("two-messages", "FindMissingBlobs", frame(ld(2, digest(hh, 5))) + frame(b""))
# Regression seeds (both trapped the node before the fix in REAPIService, arithmetic overflow):
seed("regress-batch-read-size-overflow", "BatchReadBlobs", frame(ld(2, digest(hh, 1 << 62)) + ld(2, digest(hh, 1 << 62))))
seed("regress-get-tree-token-overflow", "GetTree", frame(ld(2, digest(rh, len(root))) + s(4, str((1 << 63) - 1))))
seed("truncated", "FindMissingBlobs", frame(ld(2, digest(hh, 5)))[:-3])

os.makedirs("corpus/route", exist_ok=True)
routes = {
    "cas": f"/cas/{hh}", "ac": f"/ac/{hh}", "instance-cas": f"/main/ci-1/cas/{hh}",
    "instance-ac-query": f"/team_a/ac/{hh}?x=1", "gossip": "/mesh/gossip", "mesh-status": "/mesh/status",
    "metrics": "/metrics", "healthz": "/healthz", "status": "/status", "root": "/",
    "dotdot": f"/../cas/{hh}", "upper": f"/cas/{hh.upper()}", "empty-seg": f"//cas/{hh}", "star": "*",
}
for n, p in routes.items():
    open(f"corpus/route/{n}", "w").write(p)

# HTTP/2 (fuzz-h2): byte 0 = split/limit selector, then frames after the preface (the harness sends it).
def h2frame(ftype, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload
def lit(name, value):  # literal header field without indexing, new name
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
SETTINGS = h2frame(4, 0, 0, b"")
SETTINGS_ACK = h2frame(4, 1, 0, b"")
get = b"\x82\x87" + lit(":path", f"/cas/{hh}") + b"\x41\x05node1"          # GET https /cas/… authority node1
put = lit(":method", "PUT") + b"\x87" + lit(":path", f"/cas/{hh}") + b"\x41\x05node1" + lit("content-length", "5")
grpc = b"\x83\x87" + lit(":path", "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs") + \
       lit("content-type", "application/grpc") + lit("te", "trailers")
os.makedirs("corpus/h2", exist_ok=True)
h2seeds = {
    "get": bytes([0]) + SETTINGS + h2frame(1, 5, 1, get),
    "get-split": bytes([7]) + SETTINGS + SETTINGS_ACK + h2frame(1, 5, 1, get) + h2frame(1, 5, 3, get),
    "put": bytes([0]) + SETTINGS + h2frame(1, 4, 1, put) + h2frame(0, 1, 1, hello),
    "grpc-trailers": bytes([0]) + SETTINGS + h2frame(1, 4, 1, grpc) + h2frame(0, 0, 1, frame(ld(2, digest(hh, 5)))) +
                     h2frame(1, 5, 1, lit("x-trailer", "1")),
    "continuation": bytes([0]) + SETTINGS + h2frame(1, 0, 1, get[:10]) + h2frame(9, 4, 1, get[10:]),
    "small-limit": bytes([0x40]) + SETTINGS + h2frame(1, 5, 1, get + lit("cookie", "c" * 200)),
    "ping-window-rst": bytes([0]) + SETTINGS + h2frame(6, 0, 0, b"12345678") + h2frame(8, 0, 0, struct.pack(">I", 1000)) +
                       h2frame(1, 4, 1, put) + h2frame(3, 0, 1, struct.pack(">I", 8)),
    "goaway": bytes([0]) + SETTINGS + h2frame(7, 0, 0, struct.pack(">II", 0, 0)),
}
for n, b in h2seeds.items():
    open(f"corpus/h2/{n}", "wb").write(b)

#!/usr/bin/python3
"""Connections to a node's plaintext local endpoint that never say which protocol they speak.

Opens --silent connections that send nothing and --prefix connections that send the start of
the HTTP/2 preface ("PRI * HTTP/2.0\\r\\n"), on the unix socket (--socket) and/or the TCP
endpoint (--port); then waits up to --hold seconds and prints one JSON line: how many the server
closed, and how many were still open at the end.
"""
import argparse, json, select, socket, time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--socket")
    p.add_argument("--port", type=int)
    p.add_argument("--silent", type=int, default=10)
    p.add_argument("--prefix", type=int, default=10)
    p.add_argument("--hold", type=float, default=15)
    a = p.parse_args()
    conns = []
    for kind, n in (("silent", a.silent), ("prefix", a.prefix)):
        for i in range(n):
            if a.socket and (not a.port or i % 2 == 0):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(a.socket)
            else:
                s = socket.create_connection(("127.0.0.1", a.port))
            if kind == "prefix":
                s.sendall(b"PRI * HTTP/2.0\r\n")
            conns.append(s)
    start = time.time()
    open_ = set(conns)
    closed_after = []
    while open_ and time.time() < start + a.hold:
        ready, _, _ = select.select(list(open_), [], [], 0.5)
        for s in ready:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                open_.discard(s)
                closed_after.append(round(time.time() - start, 1))
    print(json.dumps({"opened": len(conns), "closed_by_server": len(closed_after), "still_open": len(open_),
                      "first_closed_after": min(closed_after) if closed_after else None}))
    for s in conns:
        s.close()


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""HTTP/1.1 GETs on a node's unix-socket local endpoint whose responses are never read.

Opens --connections connections (receive buffer shrunk to 4 KiB), sends one GET of --path on
each and reads nothing for --hold seconds; then drains each connection and prints one JSON line
with how many the server closed before the whole response arrived (a short body then EOF or a
reset) and the bytes each got.
"""
import argparse, json, socket, time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--hold", type=float, default=10)
    p.add_argument("--size", type=int, required=True, help="the blob's size")
    a = p.parse_args()
    conns = []
    for _ in range(a.connections):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(a.socket)
        s.sendall(f"GET {a.path} HTTP/1.1\r\nHost: local\r\n\r\n".encode())
        conns.append(s)
    print(json.dumps({"event": "opened"}), flush=True)
    time.sleep(a.hold)
    got, cut = [], 0
    for s in conns:
        s.settimeout(5)
        n = 0
        try:
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                n += len(data)
        except (socket.timeout, OSError):
            pass
        got.append(n)
        if n < a.size:
            cut += 1
        s.close()
    print(json.dumps({"cut": cut, "got": got}))


if __name__ == "__main__":
    main()

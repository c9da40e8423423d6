#!/usr/bin/env python3
"""A UDP forwarder that behaves like a NAT rebinding mid-connection.

Datagrams from the client (to --listen) go to --server from one socket; after --after
datagrams from the client it closes that socket and continues from a new one (a new source
port, as when a NAT forgets a mapping). Answers from the server to the current socket go back
to the client; answers to the old port are lost. Prints "rebound OLD -> NEW" when it switches
and "forwarded N M" (client->server, server->client datagrams) when it stops after --seconds.
"""
import argparse
import select
import socket
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--server", type=int, required=True)
    ap.add_argument("--after", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    a = ap.parse_args()
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", a.listen))

    def new_back():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        return s

    back = new_back()
    print("ready", flush=True)
    client = None
    up = down = 0
    switched = False
    deadline = time.time() + a.seconds
    while time.time() < deadline:
        ready, _, _ = select.select([front, back], [], [], 0.2)
        for s in ready:
            if s is front:
                data, client = front.recvfrom(65535)
                back.sendto(data, ("127.0.0.1", a.server))
                up += 1
                if not switched and up >= a.after:
                    switched = True
                    old = back.getsockname()[1]
                    back.close()
                    back = new_back()
                    print(f"rebound {old} -> {back.getsockname()[1]}", flush=True)
            elif s is back and client is not None:
                data, _ = back.recvfrom(65535)
                front.sendto(data, client)
                down += 1
    print(f"forwarded {up} {down}", flush=True)


if __name__ == "__main__":
    main()

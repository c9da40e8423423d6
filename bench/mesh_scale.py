#!/usr/bin/env python3
"""A real mesh of N node processes on one machine (issue 12, "Scale on one machine");
bench/mesh-scale.sh runs it.

One origin and N-1 peers (default N = 24) on loopback, mTLS, replication = 2, write_quorum = 2,
small stores (max_bytes = "64M"); every peer is seeded with the origin and one or two other peers.
Measured, in this order, on one mesh:

1. membership convergence: from spawning the first node until every node's /mesh/status lists all
   N members alive;
2. locality convergence: K blobs PUT at random nodes; from the last acknowledgement until every
   node's locality map holds every (blob, holder) pair that exists on disk (its
   `locality_entries` >= the number of such pairs whose holder is another node);
3. gossip bytes per node per second in steady state (`cachemesh_gossip_bytes_total`), next to
   `cachemesh simulate-gossip` for the same N;
4. churn: 25% of the peers kill -9'd under a light write+read load, declared dead, restarted on
   their data dirs; every acknowledged blob must stay readable with the right bytes, and the time
   until every acknowledged blob sits on its R rendezvous owners (computed as the product does:
   `Placement.owners`, ported below and checked against vectors from the Swift code) is measured
   from the data directories;
5. memory: RSS per node, locality map bytes per (digest, holder) entry.

Writes mesh-scale.md and mesh-scale.json. Exit status: 0 all acknowledged blobs intact; 1 an
acknowledged blob lost or a corrupt read; 2 the benchmark could not finish (a node crashed, a phase
timed out), with what was measured still written. Standard library only; process helpers come from
mesh_bench.py.
"""
import argparse
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mesh_bench as mb  # noqa: E402  (free_port, stop, kill_all, STARTED, PR_SET_PDEATHSIG helper)
from mesh_bench import STARTED, free_port, kill_all, stop  # noqa: E402

ROOT = mb.ROOT

# ---------------------------------------------------------------------------------------------
# Placement, exactly as the product computes it (Sources/MeshCore/Core.swift, Rendezvous.swift;
# MeshService.placementKey keys placement by the hash with size 0).

M64 = (1 << 64) - 1


def mix(z):
    """SplitMix64.mix."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def name_hash(name):
    """NodeID.nameHash: FNV-1a 64 over the UTF-8 name."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def digest_hash(hexdigest, size=0):
    """Digest.stableHash (four big-endian 64-bit words of the SHA-256, then the size)."""
    w = [int(hexdigest[i * 16:(i + 1) * 16], 16) for i in range(4)]
    return mix(w[0] ^ mix(w[1] ^ mix(w[2] ^ mix(w[3] ^ (size & M64)))))


def weight(hexdigest, name):
    """Rendezvous.weight(of: placementKey(hash), on: node)."""
    return mix(digest_hash(hexdigest) ^ mix((mix(name_hash(name)) + 0x632BE59BD9B4E019) & M64))


def owners(hexdigest, live, replicas=2):
    """Placement.owners(of:live:replicas:): the `replicas` best-ranked live names (ties by name)."""
    return sorted(set(live), key=lambda n: (-weight(hexdigest, n), n))[:replicas]


# From bench/placement_vectors.swift, compiled with the product's Core.swift + Rendezvous.swift.
VECTORS = """
namehash origin 13396771823158957263
namehash peer01 12837322208111022046
namehash peer23 12839272741739089910
namehash - 14695981039346656037
weight 0000000000000000000000000000000000000000000000000000000000000000 peer07 13602475898284023496
owners24 0000000000000000000000000000000000000000000000000000000000000000 peer18,peer11
owners7 0000000000000000000000000000000000000000000000000000000000000000 peer11,peer07
weight e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 peer07 9030628169683203765
owners24 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 peer03,peer17
owners7 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 peer08,peer09
weight ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad peer07 1116151088407199787
owners24 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad peer01,peer20
owners7 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad peer06,peer09
weight ffffffffffffffff0000000000000001aaaaaaaaaaaaaaaa5555555555555555 peer07 49908789015655413
owners24 ffffffffffffffff0000000000000001aaaaaaaaaaaaaaaa5555555555555555 peer05,peer21
owners7 ffffffffffffffff0000000000000001aaaaaaaaaaaaaaaa5555555555555555 peer05,peer08
"""


def node_names(n):
    return ["origin"] + [f"peer{i:02d}" for i in range(1, n)]


def self_test():
    """The Python port against the Swift vectors; raises on the first mismatch."""
    names24 = node_names(24)
    checked = 0
    for line in VECTORS.strip().splitlines():
        kind, a, b = line.split()[0], line.split()[1], line.split()[2:]
        if kind == "namehash":
            got, want = name_hash("" if a == "-" else a), int(b[0])
        elif kind == "weight":
            got, want = weight(a, b[0]), int(b[1])
        elif kind == "owners24":
            got, want = ",".join(owners(a, names24, 2)), b[0]
        elif kind == "owners7":
            got, want = ",".join(owners(a, names24[5:12], 2)), b[0]
        else:
            continue
        if got != want:
            raise AssertionError(f"placement port disagrees with the Swift code: {line!r}: got {got}")
        checked += 1
    return checked


# ---------------------------------------------------------------------------------------------

T0 = time.time()


def log(msg):
    print(f"[mesh-scale {time.strftime('%H:%M:%S')} +{time.time() - T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchFailure(RuntimeError):
    """The benchmark could not finish a phase (the product's problem or the machine's): reported."""


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def listen_port(rng, taken):
    """A port free for TCP and UDP, below the kernel's ephemeral range: 24 nodes open many outbound
    UDP/TCP sockets, and a port picked by mesh_bench.free_port (from the ephemeral range) can be
    taken by one of them before the node that owns it binds it. Falls back to free_port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError):
        low = 32768
    for _ in range(200):
        port = rng.randint(max(1024, low - 12000), low - 1)
        if port in taken:
            continue
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            t.bind(("127.0.0.1", port))
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    return free_port()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class ScaleMesh:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.names = node_names(args.nodes)
        self.peers = self.names[1:]
        prng, taken = random.Random(), set()
        self.port = {}
        for n in self.names:
            self.port[n] = listen_port(prng, taken)
            taken.add(self.port[n])
        self.certs = os.path.join(tmp, "certs")
        self.procs = {}       # name -> Popen (current process)
        self.generation = {n: 0 for n in self.names}
        self.expected_down = set()  # killed on purpose
        self.crashes = []
        self.rng = random.Random(args.seed)
        self.seeds = {}

    # -- set-up
    def make_certs(self):
        for n in self.names + ["prober"]:  # prober: a node certificate, for /mesh/status
            subprocess.run(["bash", f"{ROOT}/certs/mkcerts.sh", "-o", self.certs, "node", n], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        subprocess.run(["bash", f"{ROOT}/certs/mkcerts.sh", "-o", self.certs, "client", "driver"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def data_dir(self, n):
        return os.path.join(self.tmp, f"data-{n}")

    def topology(self):
        a = self.args
        t = ['name = "mesh-scale"', f'ca = "{self.certs}/ca.pem"', f"replication = {a.replication}",
             f"write_quorum = {a.write_quorum}", "",
             "[repair]", f"interval_seconds = {a.repair_interval}", f"blobs_per_second = {a.repair_rate}", ""]
        for i, n in enumerate(self.names):
            if n == "origin":
                seeds = []
            else:
                others = [p for p in self.peers if p != n]
                seeds = ["origin"] + self.rng.sample(others, self.rng.choice((1, 2)))
            self.seeds[n] = seeds
            t += ["[[nodes]]", f'name = "{n}"', f'role = "{"origin" if n == "origin" else "peer"}"',
                  f'tcp = "127.0.0.1:{self.port[n]}"', f'quic = "127.0.0.1:{self.port[n]}"',
                  f'data_dir = "{self.data_dir(n)}"', f'max_bytes = "{a.max_bytes}"',
                  f'cert = "{self.certs}/{n}.pem"', f'key = "{self.certs}/{n}.key"', f"seeds = {json.dumps(seeds)}", ""]
        self.topo = os.path.join(self.tmp, "topology.toml")
        with open(self.topo, "w") as f:
            f.write("\n".join(t))

    # -- processes
    def log_path(self, n):
        return os.path.join(self.tmp, f"node-{n}.log")

    def spawn(self, n):
        self.generation[n] += 1
        out = open(self.log_path(n), "a")
        out.write(f"==== mesh-scale: start #{self.generation[n]} at +{time.time() - T0:.2f}s\n")
        out.flush()
        p = subprocess.Popen([self.args.bin, "node", "--topology", self.topo, "--name", n, "--log-level", self.args.log_level],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=mb._die_with_parent)
        out.close()
        STARTED.append(p)
        self.procs[n] = p
        return p

    def kill9(self, n):
        p = self.procs[n]
        self.expected_down.add(n)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        if p in STARTED:
            STARTED.remove(p)

    def running(self):
        return [n for n in self.names if n in self.procs and self.procs[n].poll() is None]

    def check_alive(self):
        for n, p in self.procs.items():
            if n in self.expected_down:
                continue
            if p.poll() is not None and not any(c["node"] == n and c["generation"] == self.generation[n] for c in self.crashes):
                text = self.text(n)
                self.crashes.append({"node": n, "generation": self.generation[n], "exit": p.returncode,
                                     "at_s": round(time.time() - T0, 1), "log_tail": text[-3000:]})
                log(f"NODE EXITED: {n} (exit {p.returncode}); log tail:\n{text[-1500:]}")

    def text(self, n):
        try:
            with open(self.log_path(n), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_listening(self, names, timeout):
        deadline = time.time() + timeout
        pending = set(names)
        while pending and time.time() < deadline:
            for n in list(pending):
                t = self.text(n)
                last = t.rsplit("==== mesh-scale: start", 1)[-1]
                if "listening tcp=" in last:
                    pending.discard(n)
            self.check_alive()
            time.sleep(0.1)
        if pending:
            raise BenchFailure(f"nodes did not start listening within {timeout} s: {sorted(pending)}")

    def stop_all(self, grace=10.0):
        """SIGTERM every running node at once (a drain), SIGKILL what is left after `grace`."""
        procs = [p for p in self.procs.values() if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        codes = {}
        for n, p in self.procs.items():
            if p.poll() is None:
                stop(p, timeout=0.1)  # SIGTERM again, then SIGKILL
                codes[n] = "killed after grace"
            else:
                codes[n] = p.returncode
            if p in STARTED:
                STARTED.remove(p)
        return codes

    # -- HTTP (curl: HTTP/2 + mTLS)
    def cert_args(self, who):
        c = self.certs
        return ["--cacert", f"{c}/ca.pem", "--cert", f"{c}/{who}.pem", "--key", f"{c}/{who}.key"]

    def curl_many(self, targets, path, who="prober", timeout=5.0):
        """GET `path` from every node in `targets` with one parallel curl; {node: (status, body)}."""
        if not targets:
            return {}
        d = tempfile.mkdtemp(dir=self.tmp, prefix="curl.")
        args = ["curl", "-sS", "--http2", "-Z", "--parallel-max", "64", "--max-time", str(timeout),
                "-w", "%{http_code} %{url_effective}\\n"] + self.cert_args(who)
        urls = {}
        for i, n in enumerate(targets):
            url = f"https://127.0.0.1:{self.port[n]}{path}"
            urls[url] = (n, os.path.join(d, str(i)))
            args += ["-o", os.path.join(d, str(i)), url]
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 15)
        finally:
            pass
        out = {}
        for line in r.stdout.splitlines():
            parts = line.split(" ", 1)
            if len(parts) != 2 or parts[1] not in urls:
                continue
            n, f = urls[parts[1]]
            try:
                with open(f, "rb") as fh:
                    body = fh.read()
            except OSError:
                body = b""
            out[n] = (int(parts[0]), body)
        shutil.rmtree(d, ignore_errors=True)
        return out

    def statuses(self, targets):
        res = {}
        for n, (code, body) in self.curl_many(targets, "/mesh/status").items():
            if code == 200:
                try:
                    res[n] = json.loads(body)
                except ValueError:
                    pass
        return res

    def metrics(self, targets):
        return {n: parse_metrics(body.decode(errors="replace"))
                for n, (code, body) in self.curl_many(targets, "/metrics", who="driver").items() if code == 200}

    def put(self, node, path, digest, timeout=15.0):
        t = time.time()
        r = subprocess.run(["curl", "-sS", "--http2", "--max-time", str(timeout), "-o", "/dev/null", "-w", "%{http_code}",
                            "-T", path] + self.cert_args("driver") + [f"https://127.0.0.1:{self.port[node]}/cas/{digest}"],
                           capture_output=True, text=True, timeout=timeout + 10)
        try:
            code = int(r.stdout.strip() or "0")
        except ValueError:
            code = 0
        return code, time.time() - t, r.stderr.strip()[:200]

    def get(self, node, digest, dest, timeout=15.0):
        t = time.time()
        r = subprocess.run(["curl", "-sS", "--http2", "--max-time", str(timeout), "-o", dest, "-w", "%{http_code}"]
                           + self.cert_args("driver") + [f"https://127.0.0.1:{self.port[node]}/cas/{digest}"],
                           capture_output=True, text=True, timeout=timeout + 10)
        try:
            code = int(r.stdout.strip() or "0")
        except ValueError:
            code = 0
        return code, time.time() - t

    # -- data directories
    def holders(self, digest, among=None):
        among = self.names if among is None else among
        return {n for n in among if os.path.exists(os.path.join(self.data_dir(n), "cas", digest[:2], digest))}


class Blobs:
    """Random blobs, written under tmp/blobs/<sha256>; the acknowledged ones are remembered."""

    def __init__(self, tmp, rng):
        self.dir = os.path.join(tmp, "blobs")
        os.makedirs(self.dir)
        self.rng = rng
        self.acked = []   # (digest, phase)
        self.lock = threading.Lock()

    def make(self, lo=1024, hi=64 * 1024):
        data = self.rng.randbytes(self.rng.randint(lo, hi))
        d = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.dir, d)
        with open(path, "wb") as f:
            f.write(data)
        return d, path

    def ack(self, d, phase):
        with self.lock:
            self.acked.append((d, phase))

    def snapshot(self):
        with self.lock:
            return [d for d, _ in self.acked]


class Load(threading.Thread):
    """Light write + read load: ~`rate` operations/s, 40% PUTs of new blobs, 60% GETs of acknowledged
    ones, each at a random node (the client does not know who is dead: it retries a connection
    error or a 5xx at another random node, at most 3 attempts, like our MeshClient)."""

    def __init__(self, mesh, blobs, rate, rng):
        super().__init__(daemon=True)
        self.mesh, self.blobs, self.rate, self.rng = mesh, blobs, rate, rng
        self.stop_event = threading.Event()
        self.s = {"puts": 0, "puts_acked": 0, "puts_failed": 0, "put_attempt_codes": {}, "put_latency_s": [],
                  "gets": 0, "gets_ok": 0, "gets_failed": 0, "gets_corrupt": 0, "get_attempt_codes": {},
                  "get_latency_s": [], "failed_gets": [], "corrupt_gets": [], "slow_puts": [], "phase": "warm-up"}
        self.tmpfile = os.path.join(mesh.tmp, "load-get.bin")

    def attempt_nodes(self):
        return self.rng.sample(self.mesh.names, 3)

    def run(self):
        while not self.stop_event.is_set():
            t = time.time()
            acked = self.blobs.snapshot()
            try:
                if not acked or self.rng.random() < 0.4:
                    self.do_put()
                else:
                    self.do_get(self.rng.choice(acked))
            except Exception as e:  # the load must not die silently
                log(f"load: {e!r}")
            time.sleep(max(0.0, 1.0 / self.rate - (time.time() - t)))

    def count(self, key, code):
        k = str(code)
        self.s[key][k] = self.s[key].get(k, 0) + 1

    def do_put(self):
        d, path = self.blobs.make()
        self.s["puts"] += 1
        t = time.time()
        tries = []
        for node in self.attempt_nodes():
            code, took, _ = self.mesh.put(node, path, d, timeout=15)
            tries.append((node, code, round(took, 3)))
            self.count("put_attempt_codes", code)
            if code in (200, 201):
                self.s["puts_acked"] += 1
                self.s["put_latency_s"].append(time.time() - t)
                if time.time() - t > 1.0:
                    self.s["slow_puts"].append({"digest": d, "at_s": round(t - T0, 1), "took_s": round(time.time() - t, 2),
                                                "attempts": tries, "phase": self.s["phase"]})
                self.blobs.ack(d, self.s["phase"])
                return
            if code not in (0, 502, 503, 504):
                break
        self.s["puts_failed"] += 1

    def do_get(self, d):
        self.s["gets"] += 1
        t = time.time()
        codes = []
        for node in self.attempt_nodes():
            code, _ = self.mesh.get(node, d, self.tmpfile, timeout=15)
            self.count("get_attempt_codes", code)
            codes.append((node, code))
            if code == 200:
                with open(self.tmpfile, "rb") as f:
                    got = hashlib.sha256(f.read()).hexdigest()
                if got != d:
                    self.s["gets_corrupt"] += 1
                    self.s["corrupt_gets"].append({"digest": d, "node": node, "got": got})
                else:
                    self.s["gets_ok"] += 1
                    self.s["get_latency_s"].append(time.time() - t)
                return
            if code not in (0, 404, 502, 503, 504):
                break
        self.s["gets_failed"] += 1
        live = self.mesh.running()
        self.s["failed_gets"].append({"digest": d, "attempts": codes, "phase": self.s["phase"], "at_s": round(time.time() - T0, 1),
                                      "live_holders_then": sorted(self.mesh.holders(d, live)),
                                      "dead_holders_then": sorted(self.mesh.holders(d) - set(live))})


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="cachemesh-scale.")
        self.mesh = ScaleMesh(args, self.tmp)
        self.blobs = Blobs(self.tmp, random.Random(args.seed + 1))
        self.r = {"phases": {}, "problems": []}
        self.lost = []
        self.corrupt = []

    def problem(self, msg):
        log("PROBLEM: " + msg)
        self.r["problems"].append(msg)

    # -- waiting helpers
    def wait_until(self, what, cond, timeout, interval=0.25):
        """Polls cond() until it returns a true value; (value, seconds) or raises BenchFailure."""
        t0 = time.time()
        last = None
        rounds = []
        while time.time() - t0 < timeout:
            self.mesh.check_alive()
            t = time.time()
            last = cond()
            rounds.append(time.time() - t)
            self.poll_rounds = rounds
            if last and last[0]:
                return last, time.time() - t0
            time.sleep(interval)
        raise BenchFailure(f"timed out after {timeout:.0f} s waiting for {what}; last state: {last[1] if last else None}")

    def members_view(self, observers, want_alive, want_dead=()):
        """(ok, detail, per-observer ok): every observer lists every name in want_alive as alive and
        none of want_dead as alive or suspect."""
        st = self.mesh.statuses(observers)
        per = {}
        for o in observers:
            s = st.get(o)
            if s is None:
                per[o] = False
                continue
            alive = {m["name"] for m in s.get("members", []) if m["status"] == "alive"}
            live = {m["name"] for m in s.get("members", []) if m["status"] in ("alive", "suspect")}
            per[o] = set(want_alive) <= alive and not (set(want_dead) & live)
        bad = [o for o, ok in per.items() if not ok]
        return all(per.values()), f"{len(bad)} observer(s) not there yet: {bad[:6]}", per

    # -- phases
    def phase_membership(self):
        m = self.mesh
        t0 = time.time()
        for n in m.names:
            m.spawn(n)
        spawned = time.time() - t0
        m.wait_listening(m.names, 60)
        listening = time.time() - t0
        first = {}

        def cond():
            ok, detail, per = self.members_view(m.names, m.names)
            now = time.time() - t0
            for o, good in per.items():
                if good and o not in first:
                    first[o] = now
            return ok, detail
        self.wait_until(f"all {len(m.names)} nodes to see {len(m.names)} alive members", cond, self.args.converge_timeout)
        total = time.time() - t0
        self.r["phases"]["membership"] = {
            "spawn_s": round(spawned, 2), "all_listening_s": round(listening, 2), "converged_s": round(total, 2),
            "per_node_p50_s": round(pct(list(first.values()), 50), 2), "per_node_max_s": round(max(first.values()), 2),
            "poll_interval_s": 0.25, "poll_round_s_mean": round(statistics.mean(self.poll_rounds), 2),
        }
        log(f"membership: all {len(m.names)} alive everywhere {total:.2f} s after the first spawn "
            f"(all listening at {listening:.2f} s)")

    def locality_target(self, digests):
        """For every node: the (digest, holder) pairs on disk whose holder is another node."""
        hold = {d: self.mesh.holders(d) for d in digests}
        return {n: sum(len(h - {n}) for h in hold.values()) for n in self.mesh.names}, hold

    def phase_locality(self):
        m, a = self.mesh, self.args
        base = {n: s["locality_entries"] for n, s in m.statuses(m.names).items()}
        digests, lat = [], []
        rng = random.Random(a.seed + 2)
        t_first = time.time()
        for i in range(a.blobs):
            d, path = self.blobs.make()
            node = rng.choice(m.names)
            code, took, err = m.put(node, path, d)
            if code not in (200, 201):
                self.problem(f"locality phase: PUT {d[:12]} at {node} answered {code} {err}")
                continue
            lat.append(took)
            digests.append(d)
            self.blobs.ack(d, "locality")
        t_last = time.time()
        first_all = {}

        def cond():
            target, hold = self.locality_target(digests)
            st = m.statuses(m.names)
            now = time.time()
            short = {}
            for n in m.names:
                e = st.get(n, {}).get("locality_entries")
                if e is None or e - base.get(n, 0) < target[n]:
                    short[n] = (e, target[n])
                elif n not in first_all:
                    first_all[n] = now - t_last
            return not short, f"short: {dict(list(short.items())[:5])}"
        self.wait_until("every node's locality map to name every holder of the new blobs", cond, a.converge_timeout)
        took = time.time() - t_last
        target, hold = self.locality_target(digests)
        copies = [len(h) for h in hold.values()]
        self.r["phases"]["locality"] = {
            "blobs": len(digests), "put_p50_ms": round(1000 * pct(lat, 50), 1), "put_max_ms": round(1000 * max(lat), 1),
            "puts_took_s": round(t_last - t_first, 2), "converged_after_last_ack_s": round(took, 2),
            "converged_after_first_put_s": round(time.time() - t_first, 2),
            "per_node_p50_s": round(pct(list(first_all.values()), 50), 2), "per_node_max_s": round(max(first_all.values()), 2),
            "copies_per_blob": {str(c): copies.count(c) for c in sorted(set(copies))},
            "poll_round_s_mean": round(statistics.mean(self.poll_rounds), 2),
            "pairs_per_node_target_mean": round(statistics.mean(target.values()), 1),
            "entries_before": sum(base.values()),
        }
        log(f"locality: {len(digests)} blobs, every node knows every holder {took:.2f} s after the last ack")

    def gossip_rates(self, window):
        m = self.mesh
        key_s, key_r = 'cachemesh_gossip_bytes_total{direction="sent"}', 'cachemesh_gossip_bytes_total{direction="received"}'
        m0, t0 = m.metrics(m.names), time.time()
        # Sampled every 5 s as well: whether the rate is flat over the window (steady) or decays.
        self.gossip_timeline = []
        prev, tp = m0, t0
        while time.time() - t0 < window - 0.5:
            time.sleep(min(5.0, max(0.0, window - (time.time() - t0))))
            cur, tc = m.metrics(m.names), time.time()
            rates = [(cur[n].get(key_s, 0) - prev[n].get(key_s, 0)) / (tc - tp) for n in m.names if n in cur and n in prev]
            if rates:
                self.gossip_timeline.append((round(tc - t0, 1), round(statistics.mean(rates), 1)))
            prev, tp = cur, tc
        m1, t1 = prev, tp
        span = t1 - t0
        sent = {n: (m1[n].get(key_s, 0) - m0[n].get(key_s, 0)) / span for n in m.names if n in m0 and n in m1}
        recv = {n: (m1[n].get(key_r, 0) - m0[n].get(key_r, 0)) / span for n in m.names if n in m0 and n in m1}
        return span, sent, recv

    def phase_idle_gossip(self):
        """Gossip of the converged mesh before any blob exists (closest to the simulation's set-up)."""
        if self.args.idle_window <= 0:
            return
        time.sleep(3)  # the joins' alive updates finish their retransmissions
        span, sent, _ = self.gossip_rates(self.args.idle_window)
        self.r["phases"]["gossip_idle"] = {"window_s": round(span, 1), "timeline_5s": self.gossip_timeline, "sent_bytes_per_node_per_s_mean": round(statistics.mean(sent.values()), 1),
                                           "sent_min": round(min(sent.values()), 1), "sent_max": round(max(sent.values()), 1)}
        log(f"gossip, no blobs yet: {self.r['phases']['gossip_idle']['sent_bytes_per_node_per_s_mean']} B/node/s over {span:.0f} s")

    def phase_gossip(self):
        m, a = self.mesh, self.args
        span, sent, recv = self.gossip_rates(a.steady)
        if not sent or all(v == 0 for v in sent.values()):
            self.problem("cachemesh_gossip_bytes_total is missing or did not move: is the binary older than the metric?")
        sim = self.simulation
        self.r["phases"]["gossip"] = {
            "window_s": round(span, 1), "nodes_measured": len(sent),
            "sent_bytes_per_node_per_s_mean": round(statistics.mean(sent.values()), 1) if sent else None,
            "sent_min": round(min(sent.values()), 1) if sent else None, "sent_max": round(max(sent.values()), 1) if sent else None,
            "origin_sent": round(sent.get("origin", 0), 1),
            "received_bytes_per_node_per_s_mean": round(statistics.mean(recv.values()), 1) if recv else None,
            "timeline_5s": self.gossip_timeline,
            "simulation": sim,
        }
        g = self.r["phases"]["gossip"]
        log(f"gossip: {g['sent_bytes_per_node_per_s_mean']} B/node/s sent over {span:.0f} s "
            f"(simulation: {sim.get('bytes_per_node_per_s_mean') if sim else '?'})")

    def run_simulation(self):
        out = {}
        rows = []
        t = time.time()
        for seed in range(1, self.args.sim_seeds + 1):
            path = os.path.join(self.tmp, f"sim-{seed}.json")
            r = subprocess.run([self.args.bin, "simulate-gossip", "--sizes", str(self.args.nodes), "--seed", str(seed), "--json", path],
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                self.problem(f"simulate-gossip failed: {r.stderr[-500:]}")
                return None
            with open(path) as f:
                rows += json.load(f)["results"]
        out["seeds"] = self.args.sim_seeds
        out["bytes_per_node_per_s_mean"] = round(statistics.mean(r["bytes_per_node_per_s"] for r in rows), 1)
        out["push_pull_bytes_per_node_per_s_mean"] = round(statistics.mean(r["push_pull_bytes_per_node_per_s"] for r in rows), 1)
        out["messages_per_node_per_s_mean"] = round(statistics.mean(r["messages_per_node_per_s"] for r in rows), 2)
        out["bytes_per_entry"] = rows[0].get("bytes_per_entry")
        out["time_to_99_ms_mean"] = round(statistics.mean(r.get("time_to_99_ms", 0) for r in rows), 1)
        out["took_s"] = round(time.time() - t, 1)
        return out

    def placement_gaps(self, digests, live, timeline=None):
        """Blobs not on all their owners among `live` (and those with no live copy at all)."""
        missing, no_copy = [], []
        for d in digests:
            h = self.mesh.holders(d, live)
            if not h:
                no_copy.append(d)
                continue
            own = owners(d, live, self.args.replication)
            if not set(own) <= h:
                missing.append((d, own, sorted(h)))
        if timeline is not None:
            timeline.append((round(time.time() - T0, 2), len(missing), len(no_copy)))
        return missing, no_copy

    def phase_churn(self):
        m, a = self.mesh, self.args
        ch = {}
        self.r["phases"]["churn"] = ch
        load = Load(m, self.blobs, a.load_rate, random.Random(a.seed + 3))
        self.load = load
        load.start()
        log(f"churn: load running ({a.load_rate} ops/s), {a.warm} s before the kill")
        time.sleep(a.warm)
        k = max(1, round(a.kill_fraction * len(m.peers)))
        victims = sorted(random.Random(a.seed + 4).sample(m.peers, k))
        survivors = [n for n in m.names if n not in victims]
        ch["victims"] = victims
        mc0 = m.metrics(m.names)
        load.s["phase"] = "after kill"
        t_kill = time.time()
        for v in victims:
            m.kill9(v)
        log(f"churn: kill -9 {victims}")

        _, took = self.wait_until("every survivor to declare the victims dead",
                                  lambda: self.members_view(survivors, survivors, victims)[:2], a.converge_timeout)
        t_dead = time.time()
        ch["declared_dead_s"] = round(t_dead - t_kill, 2)
        ch["kill_at_s"], ch["dead_at_s"] = round(t_kill - T0, 1), round(t_dead - T0, 1)
        log(f"churn: all survivors declare the {k} victims dead {t_dead - t_kill:.2f} s after the kill")

        # R restored among the survivors, for the blobs acknowledged up to now that have a live copy.
        acked_at_death = self.blobs.snapshot()
        ch["gap_timeline_survivors"] = tl = []  # (seconds since the script started, blobs off their owners, blobs with no live copy)
        try:
            (_, detail), took = self.wait_until(
                "every acknowledged blob with a live copy to be on its owners among the survivors",
                lambda: (lambda g: (not g[0], f"{len(g[0])} off their owners"))(self.placement_gaps(acked_at_death, survivors, tl)),
                a.restore_timeout, interval=0.5)
            ch["restored_among_survivors_s"] = round(time.time() - t_dead, 2)
            ch["restored_among_survivors_after_kill_s"] = round(time.time() - t_kill, 2)
            log(f"churn: R restored among survivors {time.time() - t_dead:.2f} s after death was declared")
        except BenchFailure:
            missing, _ = self.placement_gaps(acked_at_death, survivors)
            ch["restored_among_survivors_s"] = None
            ch["not_restored_among_survivors"] = len(missing)
            ch["not_restored_examples"] = [{"digest": d, "owners": o, "holders": h} for d, o, h in missing[:5]]
            self.problem(f"churn: {len(missing)} of {len(acked_at_death)} acknowledged blobs still off their owners among the "
                         f"survivors {a.restore_timeout} s after death was declared")
        missing, no_copy = self.placement_gaps(acked_at_death, survivors)
        ch["acked_at_death"] = len(acked_at_death)
        ch["no_live_copy_while_down"] = len(no_copy)
        ch["no_live_copy_digests"] = [{"digest": d, "holders": sorted(m.holders(d))} for d in no_copy]

        load.s["phase"] = "after restart"
        acked_before_restart = self.blobs.snapshot()
        t_restart = time.time()
        # The blobs acknowledged before the restart are checked from the restart on (also while
        # the victims rejoin and the load goes on), every poll.
        ch["gap_timeline_pre_restart_blobs"] = tl_pre = []
        t_pre = None

        def check_pre():
            nonlocal t_pre
            if t_pre is None:
                g = self.placement_gaps(acked_before_restart, m.names, tl_pre)
                if not g[0] and not g[1]:
                    t_pre = time.time()
        for v in victims:
            m.expected_down.discard(v)
            m.spawn(v)
        m.wait_listening(victims, 60)
        self.wait_until("every node to see all members alive again",
                        lambda: (check_pre(), self.members_view(m.names, m.names)[:2])[1], a.converge_timeout)
        t_back = time.time()
        ch["rejoined_s"] = round(t_back - t_restart, 2)
        ch["restart_at_s"] = round(t_restart - T0, 1)
        ch["down_s"] = round(t_restart - t_kill, 2)
        log(f"churn: victims restarted; all {len(m.names)} alive everywhere {t_back - t_restart:.2f} s after the restart")
        while time.time() - t_back < a.after_restart_load:
            check_pre()
            time.sleep(0.5)
        load.stop_event.set()
        load.join(timeout=60)
        t_load_end = time.time()
        final = self.blobs.snapshot()
        ch["acked_before_restart"] = len(acked_before_restart)
        ch["acked_total"] = len(final)
        ch["gap_timeline_all"] = tl = []
        last_gaps = []
        try:
            def cond():
                check_pre()
                g = self.placement_gaps(final, m.names, tl)
                if g[0]:
                    last_gaps[:] = g[0]
                return not g[0] and not g[1], f"{len(g[0])} off their owners, {len(g[1])} with no copy"
            self.wait_until("every acknowledged blob to be on its owners among all nodes", cond, a.restore_timeout, interval=0.5)
            ch["restored_pre_restart_blobs_after_restart_s"] = round(t_pre - t_restart, 2) if t_pre else None
            ch["restored_all_after_restart_s"] = round(time.time() - t_restart, 2)
            phase = dict(self.blobs.acked)
            ch["last_blobs_off_their_owners"] = [{"digest": d, "owners": o, "holders": h, "acked": phase.get(d)} for d, o, h in last_gaps]
            ch["restored_all_after_load_end_s"] = round(time.time() - t_load_end, 2)
            log(f"churn: every acknowledged blob on its owners {time.time() - t_restart:.2f} s after the restart")
        except BenchFailure:
            missing, no_copy = self.placement_gaps(final, m.names)
            phase = dict(self.blobs.acked)
            ch["not_restored_after_restart_examples"] = [{"digest": d, "owners": o, "holders": h, "acked": phase.get(d)} for d, o, h in missing[:10]]
            ch["restored_all_after_restart_s"] = None
            ch["restored_pre_restart_blobs_after_restart_s"] = round(t_pre - t_restart, 2) if t_pre else None
            ch["not_restored_after_restart"] = len(missing)
            self.problem(f"churn: {len(missing)} of {len(final)} acknowledged blobs off their owners {a.restore_timeout} s "
                         f"after the restart (and {len(no_copy)} with no copy on any data dir)")
        mc1 = m.metrics(m.names)
        s = load.s
        ch["load"] = {k2: v for k2, v in s.items() if k2 not in ("put_latency_s", "get_latency_s", "phase")}
        ch["load"]["put_p50_ms"] = round(1000 * pct(s["put_latency_s"], 50), 1) if s["put_latency_s"] else None
        ch["load"]["put_p99_ms"] = round(1000 * pct(s["put_latency_s"], 99), 1) if s["put_latency_s"] else None
        ch["load"]["put_max_ms"] = round(1000 * max(s["put_latency_s"]), 1) if s["put_latency_s"] else None
        ch["load"]["get_p50_ms"] = round(1000 * pct(s["get_latency_s"], 50), 1) if s["get_latency_s"] else None
        ch["load"]["get_p99_ms"] = round(1000 * pct(s["get_latency_s"], 99), 1) if s["get_latency_s"] else None
        ch["load"]["failed_gets"] = s["failed_gets"][:20]
        self.corrupt += s["corrupt_gets"]
        copies = sum(v.get("cachemesh_antientropy_copies_total", 0) - mc0.get(n, {}).get("cachemesh_antientropy_copies_total", 0)
                     if n not in victims else v.get("cachemesh_antientropy_copies_total", 0) for n, v in mc1.items())
        ch["antientropy_copies_during_churn"] = int(copies)
        ch["antientropy_copy_failures_total"] = int(sum(v.get("cachemesh_antientropy_copy_failures_total", 0) for v in mc1.values()))
        rs = {n: v.get("cachemesh_antientropy_restore_seconds") for n, v in mc1.items() if v.get("cachemesh_antientropy_restore_seconds") is not None}
        ch["antientropy_restore_seconds"] = {"nodes_reporting": len(rs), "p50": round(pct(list(rs.values()), 50), 2) if rs else None,
                                             "max": round(max(rs.values()), 2) if rs else None}
        ch["antientropy_underreplicated_last_pass"] = int(sum(v.get("cachemesh_antientropy_underreplicated_blobs", 0) for v in mc1.values()))

    def phase_verify(self):
        """Every acknowledged blob: GET at a random node (right bytes), and every copy on disk."""
        m = self.mesh
        final = self.blobs.snapshot()
        rng = random.Random(self.args.seed + 5)
        dest = os.path.join(self.tmp, "verify.bin")
        ok, first_try_fail, disk_copies, disk_bad = 0, [], 0, []
        for d in final:
            good = False
            tried = []
            for node in rng.sample(m.names, 3):
                code, _ = m.get(node, d, dest)
                tried.append((node, code))
                if code == 200:
                    with open(dest, "rb") as f:
                        got = hashlib.sha256(f.read()).hexdigest()
                    if got != d:
                        self.corrupt.append({"digest": d, "node": node, "got": got, "phase": "verify"})
                    else:
                        good = True
                    break
            if good:
                ok += 1
                if len(tried) > 1:
                    first_try_fail.append({"digest": d, "attempts": tried})
            for n in m.holders(d):
                disk_copies += 1
                with open(os.path.join(m.data_dir(n), "cas", d[:2], d), "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() != d:
                        disk_bad.append({"digest": d, "node": n})
            if not good and not m.holders(d):
                self.lost.append({"digest": d, "attempts": tried, "on_disk": []})
            elif not good:
                self.lost.append({"digest": d, "attempts": tried, "on_disk": sorted(m.holders(d)), "note": "unreadable, copies on disk"})
        self.corrupt += [dict(x, phase="disk") for x in disk_bad]
        self.r["phases"]["verify"] = {"acknowledged": len(final), "read_ok": ok, "needed_retry": len(first_try_fail),
                                      "needed_retry_examples": first_try_fail[:5], "lost_or_unreadable": len(self.lost),
                                      "corrupt": len(self.corrupt), "disk_copies_checked": disk_copies, "disk_copies_corrupt": len(disk_bad)}
        log(f"verify: {ok}/{len(final)} acknowledged blobs read back with the right bytes; {len(self.lost)} lost/unreadable, "
            f"{len(self.corrupt)} corrupt; {disk_copies} copies on disk checked")

    def phase_memory(self):
        m = self.mesh
        met = m.metrics(m.names)
        rss = {n: rss_kib(m.procs[n].pid) for n in m.running()}
        rss = {n: v for n, v in rss.items() if v}
        per = {}
        for n, v in met.items():
            e, b = v.get("cachemesh_locality_entries", 0), v.get("cachemesh_locality_bytes", 0)
            if e:
                per[n] = b / e
        ent = [v.get("cachemesh_locality_entries", 0) for v in met.values()]
        self.r["phases"]["memory"] = {
            "rss_mib_p50": round(pct(list(rss.values()), 50) / 1024, 1), "rss_mib_min": round(min(rss.values()) / 1024, 1),
            "rss_mib_max": round(max(rss.values()) / 1024, 1), "rss_mib_total": round(sum(rss.values()) / 1024, 1),
            "rss_mib_origin": round(rss.get("origin", 0) / 1024, 1),
            "locality_entries_p50": pct(ent, 50), "locality_entries_max": max(ent) if ent else None,
            "locality_bytes_per_entry_p50": round(pct(list(per.values()), 50), 1) if per else None,
            "locality_bytes_per_entry_max": round(max(per.values()), 1) if per else None,
            "gossip_refused_total": int(sum(v.get("cachemesh_gossip_refused_total", 0) for v in met.values())),
            "rss_kib": rss,
        }
        log(f"memory: RSS p50 {self.r['phases']['memory']['rss_mib_p50']} MiB per node; "
            f"{self.r['phases']['memory']['locality_bytes_per_entry_p50']} B per locality entry")

    def scan_logs(self, upto=None, since=None):
        """Warnings, errors, gossip refusals and fatal errors in the node logs, between the offsets
        `since` and `upto` ({node: bytes}; the shutdown's drain is scanned apart from the run)."""
        out = {"warning_lines": 0, "error_lines": 0, "by_node": {}, "examples": [], "refusals": [], "fatal": []}
        refusal = re.compile(r"gossip[^\n]*refus|refus[^\n]*gossip|not in topology|not admitted", re.I)
        for n in self.mesh.names:
            raw = self.mesh.text(n)
            lo = (since or {}).get(n, 0)
            hi = (upto or {}).get(n, len(raw))
            text = raw[lo:hi].splitlines()
            w = [l for l in text if " warning " in l or " warning:" in l]
            e = [l for l in text if " error " in l or " error:" in l or " critical " in l]
            out["warning_lines"] += len(w)
            out["error_lines"] += len(e)
            if w or e:
                out["by_node"][n] = {"warnings": len(w), "errors": len(e)}
            out["examples"] += [f"{n}: {l[:300]}" for l in (e + w)[:3]]
            out["refusals"] += [f"{n}: {l[:300]}" for l in text if refusal.search(l)][:5]
            out["fatal"] += [f"{n}: {l[:300]}" for l in text if "Fatal error" in l or "fatal error" in l]
        out["examples"] = out["examples"][:30]
        out["refusals"] = out["refusals"][:30]
        return out

    def run(self):
        a, m = self.args, self.mesh
        self.r["placement_self_test_vectors"] = self_test()
        log(f"placement port: {self.r['placement_self_test_vectors']} vectors from the Swift code agree")
        load0 = os.getloadavg()
        self.r["meta"] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "nproc": os.cpu_count(), "kernel": os.uname().release, "command": a.command, "nodes": a.nodes,
            "replication": a.replication, "write_quorum": a.write_quorum, "max_bytes": a.max_bytes,
            "repair_interval_s": a.repair_interval, "repair_blobs_per_second": a.repair_rate, "blobs": a.blobs,
            "steady_window_s": a.steady, "kill_fraction": a.kill_fraction, "load_rate": a.load_rate, "seed": a.seed,
            "loadavg_start": [round(x, 2) for x in load0],
        }
        try:
            commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
            self.r["meta"]["commit"] = commit
        except OSError:
            pass
        log("simulation: cachemesh simulate-gossip for the same N")
        self.simulation = self.run_simulation()
        m.make_certs()
        m.topology()
        self.r["meta"]["seeds"] = m.seeds
        failure = None
        try:
            self.phase_membership()
            self.phase_idle_gossip()
            self.phase_locality()
            self.phase_gossip()
            self.phase_churn()
        except BenchFailure as e:
            failure = str(e)
            self.problem(f"benchmark stopped: {e}")
            if getattr(self, "load", None):
                self.load.stop_event.set()
                self.load.join(timeout=30)
        try:
            self.phase_verify()
            self.phase_memory()
        except Exception as e:
            failure = failure or f"{e!r}"
            self.problem(f"verification/memory phase failed: {e!r}")
        m.check_alive()
        self.r["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        self.r["crashes"] = m.crashes
        before_stop = {n: len(m.text(n)) for n in m.names}
        self.r["exit_codes_at_stop"] = m.stop_all()
        self.r["logs"] = self.scan_logs(upto=before_stop)
        self.r["logs_during_stop"] = self.scan_logs(since=before_stop)
        self.r["lost"] = self.lost
        self.r["corrupt"] = self.corrupt
        self.r["failure"] = failure
        self.r["meta"]["took_s"] = round(time.time() - T0, 1)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "mesh-scale.json"), "w") as f:
            json.dump(self.r, f, indent=1, sort_keys=True)
        with open(os.path.join(a.out, "mesh-scale.md"), "w") as f:
            f.write(markdown(self.r))
        if self.lost or self.corrupt:
            return 1
        if failure or m.crashes:
            return 2
        return 0


def fmt(v, unit=""):
    return "—" if v is None else f"{v}{unit}"


def markdown(r):
    meta, ph = r["meta"], r["phases"]
    L = ["# Mesh at scale on one machine (one run)", ""]
    L.append(f"- date: {meta['date']}; commit {meta.get('commit', '?')}; machine: {meta['nproc']} CPUs, kernel {meta['kernel']}; "
             f"load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta.get('loadavg_end')}; run took {meta.get('took_s')} s")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- mesh: {meta['nodes']} node processes (origin + {meta['nodes'] - 1} peers) on 127.0.0.1, TLS+HTTP/2 and QUIC, mTLS "
             f"(certs/mkcerts.sh); replication = {meta['replication']}, write_quorum = {meta['write_quorum']}, max_bytes = \"{meta['max_bytes']}\", "
             f"`[repair] interval_seconds = {meta['repair_interval_s']}`, `blobs_per_second = {meta['repair_blobs_per_second']}`; "
             "every peer seeded with the origin and one or two random other peers")
    L.append(f"- placement port (Python) checked against {r.get('placement_self_test_vectors')} vectors printed by the product's own "
             "`Core.swift` + `Rendezvous.swift` (bench/placement_vectors.swift)")
    L.append("")
    L.append("| measure | result |")
    L.append("|---|---|")
    mem = ph.get("membership")
    if mem:
        L.append(f"| membership convergence (first spawn → every node lists all {meta['nodes']} alive) | **{mem['converged_s']} s** "
                 f"(all listening at {mem['all_listening_s']} s; per node p50 {mem['per_node_p50_s']} s, max {mem['per_node_max_s']} s; "
                 f"one poll of all nodes took {mem.get('poll_round_s_mean')} s + 0.25 s pause: the resolution) |")
    loc = ph.get("locality")
    if loc:
        L.append(f"| locality convergence ({loc['blobs']} PUTs at random nodes → every node's map holds every (blob, holder) pair on disk) | "
                 f"**{loc['converged_after_last_ack_s']} s** after the last ack ({loc['converged_after_first_put_s']} s after the first PUT; "
                 f"PUTs took {loc['puts_took_s']} s, p50 {loc['put_p50_ms']} ms; per node p50 {loc['per_node_p50_s']} s, max {loc['per_node_max_s']} s; "
                 f"a poll round took {loc.get('poll_round_s_mean')} s; "
                 f"copies per blob {loc['copies_per_blob']}) |")
    g = ph.get("gossip")
    if g:
        sim = g.get("simulation") or {}
        L.append(f"| gossip bytes sent per node per second, steady state ({g['window_s']} s) | **{g['sent_bytes_per_node_per_s_mean']}** "
                 f"(min {g['sent_min']}, max {g['sent_max']}, origin {g['origin_sent']}; received mean {g['received_bytes_per_node_per_s_mean']}) "
                 f"(every 5 s: {', '.join(str(v) for _, v in g.get('timeline_5s', []))}) vs simulation for N = {meta['nodes']}: **{sim.get('bytes_per_node_per_s_mean', '—')}** (of which push-pull "
                 f"{sim.get('push_pull_bytes_per_node_per_s_mean', '—')}; mean of {sim.get('seeds', '?')} seeds) |")
    gi = ph.get("gossip_idle")
    if gi:
        L.append(f"| gossip bytes sent per node per second, converged mesh before any blob ({gi['window_s']} s) | {gi['sent_bytes_per_node_per_s_mean']} "
                 f"(min {gi['sent_min']}, max {gi['sent_max']}; every 5 s: {', '.join(str(v) for _, v in gi.get('timeline_5s', []))}) |")
    ch = ph.get("churn")
    if ch:
        ld = ch.get("load", {})
        L.append(f"| churn: kill -9 of {len(ch.get('victims', []))} peers ({', '.join(ch.get('victims', []))}) | declared dead by every survivor "
                 f"after **{fmt(ch.get('declared_dead_s'), ' s')}** |")
        L.append(f"| R restored among the survivors (acknowledged blobs with a live copy on their 2 owners among live nodes) | "
                 f"**{fmt(ch.get('restored_among_survivors_s'), ' s')}** after death was declared "
                 f"({ch.get('acked_at_death', '?')} blobs; {ch.get('no_live_copy_while_down', '?')} had no live copy while the victims were down) |")
        L.append(f"| restart on the old data dirs → all alive everywhere | {fmt(ch.get('rejoined_s'), ' s')} (victims down {fmt(ch.get('down_s'), ' s')}) |")
        L.append(f"| the {ch.get('acked_before_restart', '?')} blobs acknowledged before the restart on their owners among all {meta['nodes']} nodes | "
                 f"**{fmt(ch.get('restored_pre_restart_blobs_after_restart_s'), ' s')}** after the restart |")
        L.append(f"| all {ch.get('acked_total', '?')} acknowledged blobs (also those written after the restart) on their owners | "
                 f"{fmt(ch.get('restored_all_after_restart_s'), ' s')} after the restart (a blob whose writer is not an owner reaches "
                 f"its second owner at a membership change or the next periodic pass, `interval_seconds` = {meta['repair_interval_s']}) |")
        rs = ch.get("antientropy_restore_seconds", {})
        L.append(f"| anti-entropy (metrics) | {ch.get('antientropy_copies_during_churn')} copies made, {ch.get('antientropy_copy_failures_total')} failed; "
                 f"`cachemesh_antientropy_restore_seconds` p50 {fmt(rs.get('p50'), ' s')}, max {fmt(rs.get('max'), ' s')} "
                 f"({rs.get('nodes_reporting')} nodes reporting); under-replicated found by each node's last pass, summed: {ch.get('antientropy_underreplicated_last_pass')} |")
        if ld:
            L.append(f"| load during churn ({meta['load_rate']} ops/s, 3 attempts at random nodes) | PUTs {ld['puts_acked']}/{ld['puts']} acknowledged "
                     f"(p50 {fmt(ld.get('put_p50_ms'), ' ms')}, p99 {fmt(ld.get('put_p99_ms'), ' ms')}, max {fmt(ld.get('put_max_ms'), ' ms')}; attempt codes {ld['put_attempt_codes']}); "
                     f"GETs {ld['gets_ok']}/{ld['gets']} right bytes, {ld['gets_failed']} failed after 3 attempts, {ld['gets_corrupt']} corrupt "
                     f"(attempt codes {ld['get_attempt_codes']}) |")
    v = ph.get("verify")
    if v:
        L.append(f"| every acknowledged blob read back (GET at a random node, sha256) | **{v['read_ok']}/{v['acknowledged']}** right; "
                 f"lost/unreadable {v['lost_or_unreadable']}, corrupt {v['corrupt']}; {v['needed_retry']} needed a 2nd node; "
                 f"{v['disk_copies_checked']} copies on disk hashed, {v['disk_copies_corrupt']} bad |")
    mm = ph.get("memory")
    if mm:
        L.append(f"| memory at the end | RSS per node p50 **{mm['rss_mib_p50']} MiB** (min {mm['rss_mib_min']}, max {mm['rss_mib_max']}, origin "
                 f"{mm['rss_mib_origin']}, all {mm['rss_mib_total']} MiB); locality map **{fmt(mm['locality_bytes_per_entry_p50'])} bytes per (digest, holder)** "
                 f"(`cachemesh_locality_bytes` / `cachemesh_locality_entries`, p50 over nodes; {mm['locality_entries_p50']} entries p50) |")
        L.append(f"| gossip refusals | `cachemesh_gossip_refused_total` summed: {mm['gossip_refused_total']}; log lines mentioning a refusal: "
                 f"{len(r.get('logs', {}).get('refusals', []))} |")
    L.append("")
    L.append("Definitions: *membership convergence* polls every node's `/mesh/status` (node certificate) every 0.25 s; a node is "
             "converged when all N names are `alive` in its member list. *Locality convergence*: after each PUT (client certificate, "
             "HTTP/2, W = 2 so the writer and one mirror hold the blob before the ack) the script lists which data dirs hold "
             "`cas/<2 hex>/<sha256>`; node n is converged when its `locality_entries` grew by at least the number of (blob, holder) "
             "pairs with a holder other than n — i.e. it knows every holder of every new blob. *Gossip bytes*: "
             "`cachemesh_gossip_bytes_total{direction=\"sent\"}` (JSON bodies of `POST /mesh/gossip`) differenced over the window, "
             "divided by its length, mean over nodes; the simulation (`cachemesh simulate-gossip`) counts the same message bodies in "
             "virtual time over ~10 s after one locality gain (push-pull every 30 s, so a 10 s window sees about a third of a "
             "push-pull period per node). *Owners*: `Placement.owners` (rendezvous over node names, R = 2) over the nodes actually "
             "running, from the data dirs; extra copies (a writer that is not an owner, a reader's cached copy) do not count. "
             "*Declared dead*: no survivor lists a victim as `alive` or `suspect`.")
    L.append("")
    probs = r.get("problems", [])
    crashes = r.get("crashes", [])
    logs = r.get("logs", {})
    L.append("## Problems seen")
    L.append("")
    if not probs and not crashes and not r.get("lost") and not r.get("corrupt"):
        L.append("None: no node crashed, nothing acknowledged was lost or read corrupt, every phase finished in time.")
    for p in probs:
        L.append(f"- {p}")
    for c in crashes:
        L.append(f"- node {c['node']} (start #{c['generation']}) exited with {c['exit']} at +{c['at_s']} s (log tail in mesh-scale.json)")
    if r.get("lost"):
        L.append(f"- **{len(r['lost'])} acknowledged blob(s) lost or unreadable** (mesh-scale.json `lost`)")
    if r.get("corrupt"):
        L.append(f"- **{len(r['corrupt'])} corrupt read(s)/copies** (mesh-scale.json `corrupt`)")
    L.append(f"- node logs (level notice), before the final stop: {logs.get('warning_lines', 0)} warning and {logs.get('error_lines', 0)} "
             f"error lines over all nodes; gossip refusals in the logs: {len(logs.get('refusals', []))}; fatal errors: {len(logs.get('fatal', []))}"
             + (f"; e.g. `{logs['examples'][0]}`" if logs.get("examples") else ""))
    ls = r.get("logs_during_stop", {})
    codes = r.get("exit_codes_at_stop", {})
    L.append(f"- the final stop (SIGTERM to every node at once, 10 s grace): exit codes {sorted(set(map(str, codes.values())))}; "
             f"{ls.get('warning_lines', 0)} warning lines while draining (e.g. mirror copies to nodes already gone)")
    L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="the cachemesh binary")
    ap.add_argument("--nodes", type=int, default=24)
    ap.add_argument("--blobs", type=int, default=20, help="PUTs for the locality measurement")
    ap.add_argument("--replication", type=int, default=2)
    ap.add_argument("--write-quorum", type=int, default=2)
    ap.add_argument("--max-bytes", default="64M")
    ap.add_argument("--repair-interval", type=int, default=20, help="[repair] interval_seconds")
    ap.add_argument("--repair-rate", type=int, default=20000, help="[repair] blobs_per_second")
    ap.add_argument("--steady", type=float, default=30, help="gossip measurement window, seconds")
    ap.add_argument("--idle-window", type=float, default=15, help="gossip window before any PUT, seconds (0: skip)")
    ap.add_argument("--kill-fraction", type=float, default=0.25)
    ap.add_argument("--load-rate", type=float, default=4, help="churn load, operations per second")
    ap.add_argument("--warm", type=float, default=8, help="load before the kill, seconds")
    ap.add_argument("--after-restart-load", type=float, default=5, help="load after the rejoin, seconds")
    ap.add_argument("--converge-timeout", type=float, default=60)
    ap.add_argument("--restore-timeout", type=float, default=60)
    ap.add_argument("--sim-seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log-level", default="notice")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data dirs)")
    ap.add_argument("--command", default="bench/mesh-scale.sh")
    ap.add_argument("--self-test", action="store_true", help="only check the placement port against the Swift vectors")
    args = ap.parse_args()
    if args.self_test:
        print(f"placement port: {self_test()} vectors agree")
        return 0
    if not args.bin:
        ap.error("--bin is required")
    args.bin = os.path.abspath(args.bin)

    def on_signal(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    bench = None
    rc = 2
    try:
        bench = Bench(args)
        rc = bench.run()
    except KeyboardInterrupt:
        log("interrupted (SIGINT, or SIGTERM from the time bound): stopping every node this run started")
        rc = 2
    finally:
        kill_all()
        if bench and not args.keep:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        elif bench:
            log(f"kept {bench.tmp}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

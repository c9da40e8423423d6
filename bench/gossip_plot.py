#!/usr/bin/env python3
"""gossip_plot.py OUT_MD OUT_PNG RUN.json... -- table + plot of `cachemesh simulate-gossip --json` runs
(one per seed): rounds until 99% of nodes know a new holder vs N on a log x axis, with a log N
reference (a least-squares fit rounds = a + b * ln N), gossip bytes/node/s and bytes per entry.
The table is written always; the PNG only if matplotlib is importable."""
import json
import math
import statistics
import sys


def main():
    out_md, out_png, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    per_n = {}
    for path in runs:
        with open(path) as f:
            doc = json.load(f)
        for r in doc["results"]:
            per_n.setdefault(r["nodes"], []).append(r)
    ns = sorted(per_n)
    mean = {n: statistics.mean(r.get("rounds_to_99", float("nan")) for r in per_n[n]) for n in ns}
    # Fit rounds = a + b ln N (least squares) and compare with rounds = c N^k (power law).
    xs = [math.log(n) for n in ns]
    ys = [mean[n] for n in ns]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-9
    r2 = 1 - ss_res / ss_tot
    growth = mean[ns[-1]] / mean[ns[0]]
    lines = ["| nodes | rounds to 99%% (mean of %d seeds; min–max) | time to 99%% | rounds to 100%% | bytes/node/s (all) | of which push-pull | msgs/node/s | bytes per (digest, holder) |" % len(runs),
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in ns:
        rs = per_n[n]
        r99 = [r["rounds_to_99"] for r in rs if "rounds_to_99" in r]
        rall = [r["rounds_to_all"] for r in rs if "rounds_to_all" in r]
        t99 = [r["time_to_99_ms"] for r in rs if "time_to_99_ms" in r]
        lines.append(f"| {n} | {statistics.mean(r99):.1f} ({min(r99)}–{max(r99)}) | {statistics.mean(t99):.0f} ms | "
                     f"{statistics.mean(rall):.1f} | {statistics.mean(r['bytes_per_node_per_s'] for r in rs):.0f} | "
                     f"{statistics.mean(r['push_pull_bytes_per_node_per_s'] for r in rs):.0f} | "
                     f"{statistics.mean(r['messages_per_node_per_s'] for r in rs):.1f} | {statistics.mean(r['bytes_per_entry'] for r in rs):.0f} |")
    lines.append("")
    ln_ratio = math.log(ns[-1]) / math.log(ns[0])
    k = math.log(growth) / math.log(ns[-1] / ns[0]) if growth > 0 else 0
    verdict = ("consistent with O(log N) (the rounds grow no faster than ln N)" if growth <= ln_ratio * 1.25
               else "FASTER than log N: look at the simulation")
    lines.append(f"Rounds to 99% vs N: least-squares fit rounds ≈ {a:.2f} + {b:.2f}·ln N (R² = {r2:.2f}). "
                 f"From N = {ns[0]} to N = {ns[-1]} (×{ns[-1] / ns[0]:.0f} nodes, ln N ×{ln_ratio:.1f}) "
                 f"the rounds grow ×{growth:.2f} (as a power law: N^{k:.2f}): {verdict}.")
    with open(out_md, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("gossip_plot: matplotlib missing, no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n in ns:
        vals = [r["rounds_to_99"] for r in per_n[n] if "rounds_to_99" in r]
        ax.scatter([n] * len(vals), vals, color="tab:blue", alpha=0.35, s=18)
    ax.plot(ns, ys, "o-", color="tab:blue", label="rounds to 99% (mean over seeds)")
    grid = [ns[0] * (ns[-1] / ns[0]) ** (i / 50) for i in range(51)]
    ax.plot(grid, [a + b * math.log(g) for g in grid], "--", color="grey", label=f"reference {a:.2f} + {b:.2f}·ln N")
    ax.plot(grid, [math.log2(g) for g in grid], ":", color="tab:red", label="log2 N")
    ax.set_xscale("log")
    ax.set_xlabel("mesh size N (log)")
    ax.set_ylabel("gossip rounds (200 ms)")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Gossip convergence: a new holder known by 99% of nodes", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


if __name__ == "__main__":
    main()

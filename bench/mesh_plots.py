#!/usr/bin/env python3
"""Plots of a mesh-bench run: mesh_plots.py RESULTS.json OUTDIR
- mesh-latency-cdf.png: latency CDF of peer-held small blobs per strategy, QUIC and TCP side by side
- mesh-origin-egress.png: origin egress vs peer hit ratio per strategy x transport
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"hedged": "tab:blue", "immediate": "tab:orange", "peers-only": "tab:green", "origin-only": "tab:red",
          "direct": "black"}


def main():
    src, out = sys.argv[1], sys.argv[2]
    with open(src) as f:
        doc = json.load(f)
    meta, rows, raw = doc["meta"], doc["rows"], doc["raw"]
    transports = sorted({r["transport"] for r in rows}, reverse=True)  # quic, tcp

    fig, axes = plt.subplots(1, len(transports), figsize=(6 * len(transports), 4.5), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], transports):
        for r in rows:
            if r["transport"] != t:
                continue
            lat = sorted(raw.get(r["config"], {}).get("peer-small", {}).get("latencies_ms", []))
            if not lat:
                continue
            ys = [(i + 1) / len(lat) for i in range(len(lat))]
            label = "direct peer fetch (baseline)" if r["baseline"] else r["strategy"]
            ax.step(lat, ys, where="post", label=label, color=COLORS.get(r["strategy"], None),
                    linestyle="--" if r["baseline"] else "-")
        ax.set_xscale("log")
        ax.set_xlabel("fetch latency at the worker (ms, log)")
        ax.set_title(f"peer-held small blobs, mesh over {t.upper()}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].set_ylabel("fraction of requests")
    fig.suptitle(f"Latency CDF, scenario {meta['scenario_name']} ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mesh-latency-cdf.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["baseline"]:
            continue
        ax.scatter(100 * r["peer_hit_ratio"], r["origin_egress_pct"], s=70, color=COLORS.get(r["strategy"]),
                   marker="o" if r["transport"] == "quic" else "s", label=f"{r['strategy']} / {r['transport']}")
        ax.annotate(f"{r['strategy']}/{r['transport']}", (100 * r["peer_hit_ratio"], r["origin_egress_pct"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.axhline(10, color="grey", linestyle=":", label="aim: ≤ 10% egress")
    ax.set_xlabel("peer hit ratio (% of requests served by a peer)")
    ax.set_ylabel("origin egress (% of bytes fetched)")
    ax.set_title(f"Origin egress per strategy (o = QUIC, □ = TCP), scenario {meta['scenario_name']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mesh-origin-egress.png"), dpi=110)
    plt.close(fig)
    print(f"wrote {out}/mesh-latency-cdf.png, {out}/mesh-origin-egress.png")


if __name__ == "__main__":
    main()

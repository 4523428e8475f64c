"""PNG plots for bench/RESULTS.md (matplotlib, Agg backend; a bench-only dependency).

    python bench/plots.py [bench/results.json]

- ``transfer.png``: the transfer rows of bench_peers (vcomp, TCP, TLS, QUIC) as bars,
  MB/s on a log scale, one group per blob size.
- ``window.png``: vcomp throughput against window size (bench_peers' sweep), a line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRANSFER_PNG = "transfer.png"
WINDOW_PNG = "window.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_transfer(peers: dict[str, Any], out: Path, subtitle: str = "") -> bool:
    """Grouped bars of MB/s per row and blob size; False if there is nothing to plot."""
    rows = [r for r in peers.get("rows", []) if r.get("mb_per_s")]
    if not rows:
        return False
    plt = _pyplot()
    names = list(dict.fromkeys(r["name"] for r in rows))
    sizes = sorted({int(r["bytes"]) for r in rows})
    width = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, size in enumerate(sizes):
        values = [
            next((r["mb_per_s"] for r in rows if r["name"] == n and r["bytes"] == size), 0.0)
            for n in names
        ]
        xs = [k + (i - (len(sizes) - 1) / 2) * width for k in range(len(names))]
        bars = ax.bar(xs, values, width, label=f"{size / (1 << 20):g} MiB")
        ax.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in values], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("MB/s (10^6 bytes/s, median; log scale)")
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_title(
        "Server -> receiver transfer over loopback" + (f"\n{subtitle}" if subtitle else "")
    )
    ax.legend(title="blob")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_window(peers: dict[str, Any], out: Path, subtitle: str = "") -> bool:
    """MB/s against window size (log2 x axis); False if there is nothing to plot."""
    points = sorted(
        (int(r["window"]), float(r["mb_per_s"]))
        for r in peers.get("sweep", [])
        if r.get("mb_per_s")
    )
    if not points:
        return False
    plt = _pyplot()
    size = next((r["bytes"] for r in peers["sweep"] if r.get("mb_per_s")), 0)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, marker="o")
    for x, y in points:
        ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("window (packets in flight)")
    ax.set_ylabel("MB/s (10^6 bytes/s, median)")
    ax.set_ylim(0, max(ys) * 1.15)
    ax.set_title(
        f"vcomp throughput against window, {size / (1 << 20):g} MiB over loopback"
        + (f"\n{subtitle}" if subtitle else "")
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_all(results: dict[str, Any], directory: Path) -> list[str]:
    """Every plot the suite's results allow; returns the file names written."""
    peers = results.get("benchmarks", {}).get("peers", {}).get("data") or {}
    subtitle = "quick run" if results.get("quick") else ""
    written = []
    if plot_transfer(peers, directory / TRANSFER_PNG, subtitle):
        written.append(TRANSFER_PNG)
    if plot_window(peers, directory / WINDOW_PNG, subtitle):
        written.append(WINDOW_PNG)
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else HERE / "results.json"
    written = plot_all(json.loads(path.read_text()), path.parent)
    print("wrote " + (", ".join(written) if written else "nothing (no transfer figures)"))


if __name__ == "__main__":
    main()

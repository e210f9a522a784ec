"""SWD, SWD at the top pyramid level and recall against minutes for several runs, in one figure.

python tools/plot_minutes.py OUT.png LABEL=RUN/metrics.jsonl [LABEL=RUN/metrics.jsonl ...]
The dashed lines are twice the first run's held-out figures (real slices of unseen subjects).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) < 3 or any("=" not in a for a in sys.argv[2:]):
        sys.exit(__doc__.strip().splitlines()[2])
    runs = [a.split("=", 1) for a in sys.argv[2:]]
    first = [json.loads(line) for line in open(runs[0][1])][-1]
    top = max(int(k[4:]) for k in first if k[4:].isdigit() and k.startswith("swd_"))
    panels = [("swd", "SWD x1e3 (mean of the levels)"), (f"swd_{top}", f"SWD at {top}x{top}"), ("recall", "recall")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, path in runs:
        lines = [json.loads(line) for line in open(path)]
        minutes = [d["time_s"] / 60 for d in lines]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(minutes, [d[key] for d in lines], marker="o", label=label)
    for ax, (key, title) in zip(axes, panels):
        reference = first.get(f"{key}_heldout")
        if reference is not None:
            ax.axhline(2 * reference if key != "recall" else reference, ls="--", c="gray", lw=1,
                       label="held-out x2" if key != "recall" else "held-out")
        ax.set_title(title)
        ax.set_xlabel("minutes")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 * ((len(runs) + 4) // 4), 1, 1))
    fig.savefig(sys.argv[1], dpi=90)


if __name__ == "__main__":
    main()

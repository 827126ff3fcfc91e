"""The fidelity plot: one panel per metric, predicted against measured, one marker per deployment."""

from __future__ import annotations

from pathlib import Path

from planning.fidelity.check import METRICS, Row


def plot_rows(rows: list[Row], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deployments = list(dict.fromkeys(row.deployment for row in rows))
    markers = "osD^v<>"
    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    for ax, metric in zip(axes.flat, METRICS):
        points = [row for row in rows if row.metric == metric]
        high = max(v for row in points for v in (row.predicted, row.measured)) * 1.25
        ax.fill_between([0, high], [0, high * 0.7], [0, high * 1.3], color="0.9", label="±30%")
        ax.plot([0, high], [0, high], color="0.5", lw=1)
        for row in points:
            i = deployments.index(row.deployment)
            ax.scatter(row.measured, row.predicted, marker=markers[i % len(markers)], s=40, label=row.deployment)
        ax.set(xlim=(0, high), ylim=(0, high), title=metric, xlabel="measured", ylabel="predicted")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(handles, labels, loc="center")
    fig.suptitle("hexgen fidelity: cost model + simulator vs the real engine (SmolLM2-135M, this machine)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

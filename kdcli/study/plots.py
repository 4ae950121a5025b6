"""The paper's Figure 2: per fold, one box per configuration over seeds, and an "average" group whose boxes are
the per-seed means over folds (left out with a single fold, where it would repeat that fold's panel). Tukey
whiskers (1.5 IQR), outliers as points, every cell as a dot. A
configuration with a single cell (the quickstart) has no spread to box: its 95 % interval over test images is
drawn instead, and the axis spans at least 5 points so that a difference of a tenth of a point does not fill it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kdcli.study import stats  # noqa: E402


def boxplot(study: dict[str, Any], metric: str, out_base: Path) -> list[Path]:
    """Write `<out_base>.png` and `.svg` for one study of a report summary."""
    configs = study["configs"]
    folds = study["folds"]
    average = len(folds) > 1
    groups = [f"fold {f}" for f in folds] + (["average"] if average else [])
    cmap = plt.get_cmap("tab10" if len(configs) <= 10 else "tab20")
    width = 0.8 / max(len(configs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(configs)) * 0.35 + 2), 4.8))
    rng = np.random.default_rng(0)
    for j, config in enumerate(configs):
        cells = {(f, s): v for f, s, v in study["values"][config]}
        data = [[v for (f, _), v in cells.items() if f == fold] for fold in folds]
        if average:
            data.append(list(stats.fold_means(cells).values()))
        pos = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(groups))]
        keep = [(p, d) for p, d in zip(pos, data) if d]
        if not keep:
            continue
        ps, ds = zip(*keep)
        colour = cmap(j % cmap.N)
        ax.boxplot(ds, positions=ps, widths=width * 0.85, whis=1.5, patch_artist=True, manage_ticks=False,
                   boxprops={"facecolor": (*colour[:3], 0.35), "edgecolor": colour},
                   medianprops={"color": "black"}, whiskerprops={"color": colour}, capprops={"color": colour},
                   flierprops={"marker": "o", "markersize": 3, "markeredgecolor": colour})
        for p, d in keep:
            ax.scatter(p + rng.uniform(-width * 0.2, width * 0.2, len(d)), d, s=6, color=colour, zorder=3)
        ci = study["table"].get(config, {}).get("ci95")
        if ci is not None:
            for p, d in keep:
                ax.errorbar([p], [d[0]], yerr=[[d[0] - ci[0]], [ci[1] - d[0]]], color=colour, capsize=4, lw=1.2,
                            zorder=2)
        ax.plot([], [], color=colour, lw=6, alpha=0.5, label=config)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    for i in range(len(groups) - 1):
        ax.axvline(i + 0.5, color="0.85", lw=0.8)
    ax.set_ylabel(f"{metric} ({study['split']} split)")
    seeds = study["seeds"]
    bars = ("\nbars: 95 % interval over test images" if any("ci95" in t for t in study["table"].values()) else "")
    what = "average = per-seed mean over folds; " if average else ""
    ax.set_title(f"{study['name']}: {metric} per fold over {len(seeds)} seed(s)\n{what}whiskers 1.5 IQR{bars}",
                 fontsize=9)
    lo, hi = ax.get_ylim()
    if hi - lo < 0.05:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - 0.025, mid + 0.025)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(5, len(configs)), loc="upper center", bbox_to_anchor=(0.5, -0.08),
              frameon=False)
    fig.tight_layout()
    files = []
    for ext in ("png", "svg"):
        path = out_base.with_suffix(f".{ext}")
        fig.savefig(path, dpi=120)
        files.append(path)
    plt.close(fig)
    return files

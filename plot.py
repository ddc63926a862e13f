"""
Pictures from a run: the training curves of a metrics.jsonl, or a reward-vs-KL frontier of demo.py's
results (as in the DPO paper's IMDb figure). matplotlib is optional: `pip install matplotlib`.

    python plot.py --metrics=out-dpo-synthetic/metrics.jsonl --png=curves.png
    python plot.py --frontier=out-demo/demo.json --png=frontier.png
"""

import json
import sys

from configurator import configure

# -----------------------------------------------------------------------------
metrics = ''  # a run's metrics.jsonl: draws its training curves
frontier = ''  # demo.py's demo.json: draws true reward against KL, one point per policy
png = 'plot.png'
# -----------------------------------------------------------------------------

CURVES = ('loss', 'rewards/accuracies', 'rewards/margins', 'rewards/chosen', 'rewards/rejected')


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install matplotlib")
    matplotlib.use('Agg')  # files only, no screen
    import matplotlib.pyplot as plt
    return plt


def plot_curves(metrics_path, png_path):
    """One panel per metric of CURVES found in the file, train and held-out (eval/) values."""
    plt = pyplot()
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    names = [n for n in CURVES if any(n in r or f'eval/{n}' in r for r in rows)]
    if not names:
        sys.exit(f"error: {metrics_path} has none of {', '.join(CURVES)}")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, label, style in ((name, 'train', '-'), (f'eval/{name}', 'held-out', 'o-')):
            points = [(r['iter'], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=3)
        ax.set_title(name)
        ax.set_xlabel('iteration')
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def plot_frontier(results_path, png_path):
    """Mean true reward against KL to the reference, one labelled point per policy."""
    plt = pyplot()
    with open(results_path) as f:
        rows = json.load(f)['policies']
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in rows:
        ax.scatter(row['kl'], row['mean_true_reward'], s=40, marker='s' if row['policy'] == 'SFT' else 'o')
        ax.annotate(row['policy'], (row['kl'], row['mean_true_reward']), textcoords='offset points', xytext=(5, 4))
    ax.set_xlabel('KL(policy || SFT reference), from samples')
    ax.set_ylabel('mean true reward of samples')
    ax.set_title('embedded task: reward vs KL')
    ax.grid(alpha=0.3)
    kl_low, kl_high = min(0.0, *(row['kl'] for row in rows)), max(row['kl'] for row in rows)
    span = (kl_high - kl_low) or 1.0  # KL estimated from samples can come out below 0
    ax.set_xlim(kl_low - 0.04 * span, kl_high + 0.3 * span)  # room for the labels right of the points
    ax.margins(y=0.1)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == '__main__':
    configure(globals())
    if bool(metrics) == bool(frontier):
        sys.exit("error: give one of --metrics=run/metrics.jsonl or --frontier=out-demo/demo.json")
    plot_curves(metrics, png) if metrics else plot_frontier(frontier, png)
    print(f"wrote {png}")

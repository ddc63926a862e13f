"""
Pictures from a run: the training curves of a metrics.jsonl, or a reward-vs-KL frontier of demo.py's
results (as in the DPO paper's IMDb figure). matplotlib is optional: `pip install matplotlib`.

    python tools/plot.py --metrics=out-dpo-synthetic/metrics.jsonl --png=curves.png
    python tools/plot.py --frontier=out-demo/demo.json --png=frontier.png
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

from configurator import configure

# -----------------------------------------------------------------------------
metrics = ''  # a run's metrics.jsonl: draws its training curves
frontier = ''  # demo.py's demo.json: draws true reward against KL, one point per policy
png = 'plot.png'
# -----------------------------------------------------------------------------

CURVES = {  # metric: the y-axis label
    'loss': 'loss',
    'rewards/accuracies': 'reward accuracy (ties count 1/2)',
    'rewards/margins': 'reward margin, chosen - rejected',
    'rewards/chosen': 'reward of chosen responses',
    'rewards/rejected': 'reward of rejected responses',
    'logps/chosen': 'log-prob of chosen responses',
}


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install matplotlib")
    matplotlib.use('Agg')  # files only, no screen
    import matplotlib.pyplot as plt
    return plt


def read_rows(path, what):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        sys.exit(f"error: cannot read {path} ({what}): {e.strerror}")
    except json.JSONDecodeError as e:
        sys.exit(f"error: {path} is not a JSON-lines file ({what}): {e.msg}")


def limits_without(first, later):
    """The y-axis limits of the later values, padded, when the first (an untrained model's, at
    iteration 0) lie so far off them that they would squash the curve into a line; else None."""
    if not first or not later or max(later) == min(later):
        return None
    low, high = min(later), max(later)
    if all(abs(v - (low + high) / 2) <= 2 * (high - low) for v in first):
        return None
    return low - 0.1 * (high - low), high + 0.1 * (high - low)


def plot_curves(metrics_path, png_path):
    """A grid of panels, one per metric of CURVES found in the file: the training values as a line,
    the held-out (eval/) values as markers, joined by a line only when there are more than two
    (two points are not a trend)."""
    plt = pyplot()
    rows = read_rows(metrics_path, 'a metrics.jsonl of sft.py or dpo.py')
    names = [n for n in CURVES if any(n in r or f'eval/{n}' in r for r in rows)]
    if not names:
        sys.exit(f"error: {metrics_path} has none of {', '.join(CURVES)}")
    cols = min(3, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        train = [(r['iter'], r[name]) for r in rows if name in r]
        held_out = [(r['iter'], r[f'eval/{name}']) for r in rows if f'eval/{name}' in r]
        if train:
            ax.plot(*zip(*train), '-', linewidth=1, label='train')
        if held_out:
            ax.plot(*zip(*held_out), 'o-' if len(held_out) > 2 else 'o', markersize=5, label='held-out')
        ax.set_xlabel('iteration')
        dpo = name == 'loss' and any('rewards/margins' in r or 'eval/rewards/margins' in r for r in rows)
        ax.set_ylabel("loss (DPO's, + rpo_alpha x chosen NLL if set)" if dpo else CURVES[name])
        first = [v for i, v in train + held_out if i == 0]
        limits = limits_without(first, [v for i, v in train + held_out if i > 0])
        if limits:
            ax.set_ylim(*limits)
            ax.set_title(f"iteration 0 ({', '.join(f'{v:.4g}' for v in first)}) off the axis", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis('off')
    run = os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    fig.suptitle(f"{run}: training curves ({metrics_path})", fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


FAMILIES = {  # how a policy's name begins: its marker and colour on the frontier
    'SFT': ('s', 'black'), 'DPO': ('o', 'tab:blue'), 'KTO': ('^', 'tab:orange'),
    'LoRA DPO': ('P', 'tab:purple'), 'online DPO': ('D', 'tab:green'), 'best-of': ('*', 'tab:red'),
}
LABEL_OFFSETS = {'DPO': (-6, 7, 'right'), 'KTO': (6, -12, 'left')}  # points apart, text: DPO's above left, KTO's below right


def plot_frontier(results_path, png_path):
    """Mean true reward against KL to the reference, one point per policy: over several seeds the
    mean, with bars of one standard deviation both ways. Runs of one family at several betas are
    joined in order of KL, as a frontier."""
    import numpy as np
    plt = pyplot()
    try:
        with open(results_path) as f:
            rows = json.load(f)['policies']
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: cannot read {results_path} as demo.py's demo.json: {e}")
    seeds = len({r.get('seed') for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 5))
    plotted = []  # every point drawn: (KL, reward, name), the means over seeds
    for family, (marker, colour) in FAMILIES.items():
        points = []
        for name in dict.fromkeys(r['policy'] for r in rows if r['policy'].startswith(family)):
            kl, reward = (np.array([r[k] for r in rows if r['policy'] == name]) for k in ('kl', 'mean_true_reward'))
            points.append((kl.mean(), reward.mean(), name))
            ax.errorbar(kl.mean(), reward.mean(), xerr=kl.std() if len(kl) > 1 else None,
                        yerr=reward.std() if len(reward) > 1 else None, fmt=marker, color=colour,
                        markersize=11 if marker == '*' else 7, capsize=3, label=family if len(points) == 1 else None)
            label = name if family in ('SFT', 'best-of') else name.replace(family, '').strip(' ,')
            dx, dy, align = LABEL_OFFSETS.get(family, (6, 5, 'left'))  # DPO and KTO lie close together
            ax.annotate(label, (kl.mean(), reward.mean()), textcoords='offset points', xytext=(dx, dy), ha=align,
                        fontsize=8, color=colour)
        points.sort()
        if len(points) > 1 and family in ('DPO', 'KTO', 'LoRA DPO'):
            ax.plot([p[0] for p in points], [p[1] for p in points], '-', color=colour, alpha=0.4)
        plotted += points
    far = [p for p in plotted if p[0] > 5]  # runs that ran far from the reference (collapsed, most often)
    if far:  # then the KL axis is linear up to 1 nat, logarithmic beyond
        ax.set_xscale('symlog', linthresh=1.0, linscale=6.0)  # most policies lie below 1 nat: give them room
        top = int(np.log10(max(p[0] for p in far)))
        ticks = [0, 0.25, 0.5, 0.75] + [10.0 ** k for k in range(top + 1)]
        ax.set_xticks(ticks, [f'{t:g}' for t in ticks])  # symlog's own ticks leave the linear part bare
    # a far run's reward far off the rest would squash them into a line: the axis is theirs
    limits = limits_without([p[1] for p in far], [p[1] for p in plotted if p not in far])
    if limits:
        ax.set_ylim(*limits)
        low, high = limits
        for kl, reward, name in far:
            if not low <= reward <= high:  # an arrow at the edge it lies beyond
                edge, towards = (low, 1) if reward < low else (high, -1)
                ax.annotate(f"{name}: reward {reward:.2f}, off the axis", (kl, edge), ha='right', fontsize=8,
                            xytext=(kl, edge + towards * 0.12 * (high - low)), arrowprops={'arrowstyle': '->'})
    ax.set_xlabel('KL(policy || SFT reference), from samples (nats)')
    ax.set_ylabel('mean true reward of samples')
    ax.set_title('embedded task: true reward vs KL' + (f' (mean ± sd over {seeds} seeds)' if seeds > 1 else ''))
    ax.grid(alpha=0.3)
    ax.legend(loc='center right', fontsize=9)  # where neither points nor their labels are (more reward goes up, more KL right)
    ax.margins(x=0.12, y=0.1)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return ax


if __name__ == '__main__':
    configure(globals())
    if bool(metrics) == bool(frontier):
        sys.exit("error: give one of --metrics=run/metrics.jsonl or --frontier=out-demo/demo.json")
    plot_curves(metrics, png) if metrics else plot_frontier(frontier, png)
    print(f"wrote {png}")

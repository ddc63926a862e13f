"""evaluate.py's numbers on hand-made cases, plot.py's pictures, and a shortened demo end to end."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from common import UserError
import evaluate
import parallel
from data import tokenize_pairs
from model import GPT, GPTConfig
from data import synthetic_pairs, true_reward
from conftest import ROOT

PNG = b'\x89PNG\r\n\x1a\n'


def test_win_rate_by_hand():
    assert evaluate.win_rate([1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 1.0, 1.0]) == (1 + 0.5 + 0 + 1) / 4
    assert evaluate.win_rate([0.3, -1.0], [0.3, -1.0]) == 0.5  # all ties


def test_summary_table_gives_each_figure_its_words_and_its_key():
    lines = evaluate.summary_table({'samples': 32, 'kl': 0.0744199, 'new_figure': -1.0}).splitlines()
    assert [line.split() for line in lines] == [['samples', '32', '(samples)'],
                                                ['KL', 'to', 'the', 'reference', '0.07442', '(kl)'],
                                                ['new_figure', '-1', '(new_figure)']]  # no words: its key
    assert len({line.index('(') for line in lines}) == 1  # the keys in one column


def test_curves_leave_an_outlying_first_point_off_the_axis():
    from plot import limits_without
    assert limits_without([-138.0], [-25.0, -20.0, -15.0]) == pytest.approx((-26.0, -14.0))  # 10% padding
    assert limits_without([-40.0], [-25.0, -20.0, -15.0]) is None  # within twice the range of the midpoint
    assert limits_without([], [-25.0, -20.0]) is None and limits_without([-138.0], [-20.0, -20.0]) is None


def test_ranking_agreement_by_hand():
    records = [{'prompt': 'a', 'implicit_reward': 2.0, 'true_reward': 1.0},
               {'prompt': 'a', 'implicit_reward': 1.0, 'true_reward': 0.0},
               {'prompt': 'b', 'implicit_reward': -1.0, 'true_reward': 0.2},
               {'prompt': 'b', 'implicit_reward': 3.0, 'true_reward': 0.6}]
    assert evaluate.ranking_agreement(records) == {'true_reward_of_top_ranked': (1.0 + 0.6) / 2,
                                                   'true_reward_of_random': (1.0 + 0.0 + 0.2 + 0.6) / 4}


def test_ranking_agreement_ties_count_by_their_mean():
    """A ranking that cannot tell samples apart (all implicit rewards 0) gains nothing over a random pick,
    whatever order the samples came in."""
    records = [{'prompt': 'a', 'implicit_reward': 0.0, 'true_reward': t} for t in (0.9, 0.1, 0.2)]
    result = evaluate.ranking_agreement(records)
    assert result['true_reward_of_top_ranked'] == result['true_reward_of_random'] == (0.9 + 0.1 + 0.2) / 3
    records[1]['implicit_reward'] = 1.0
    assert evaluate.ranking_agreement(records)['true_reward_of_top_ranked'] == 0.1


def test_a_policy_equal_to_its_reference_and_baseline():
    """KL 0 and implicit reward 0 on every sample, win rate 0.5 against itself, accuracy 0.5."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    pairs = tokenize_pairs(synthetic_pairs(10, seed=5), 64, 32)
    prompts = [p['prompt'] for p in synthetic_pairs(3, seed=6)]
    run = parallel.start('cpu', 'float32', 0)
    summary, records = evaluate.evaluate_policy(model, prompts, run, ref=model, baseline=model, pairs=pairs,
                                                true_reward=true_reward)
    assert summary['samples'] == len(records) == 3 * evaluate.samples_per_prompt
    assert summary['kl'] == 0.0 and all(r['implicit_reward'] == 0.0 for r in records)
    assert summary['win_rate'] == 0.5 and summary['preference_accuracy'] == 0.5
    assert summary['mean_true_reward'] == pytest.approx(sum(r['true_reward'] for r in records) / len(records))
    assert all(r['true_reward'] == true_reward(r['prompt'], r['response']) for r in records)


def test_bad_prompt_file_names_the_line(tmp_path):
    path = tmp_path / 'p.jsonl'
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(evaluate.UserError, match=r"p\.jsonl, line 2: missing field 'prompt'"):
        evaluate.read_prompts(str(path))
    with pytest.raises(evaluate.UserError, match=r"^prompts='/nonexistent.jsonl' does not exist: give a JSONL file"):
        evaluate.read_prompts('/nonexistent.jsonl')


def test_plots_write_pngs(tmp_path):
    import plot
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(''.join(json.dumps(r) + '\n' for r in [
        {'iter': 0, 'eval/loss': 0.69, 'eval/rewards/accuracies': 0.5},
        {'iter': 1, 'loss': 0.6, 'rewards/accuracies': 0.7, 'rewards/margins': 0.1},
        {'iter': 2, 'loss': 0.5, 'rewards/accuracies': 0.8, 'rewards/margins': 0.3, 'eval/loss': 0.55}]))
    plot.plot_curves(str(metrics), str(tmp_path / 'curves.png'))
    demo = tmp_path / 'demo.json'
    demo.write_text(json.dumps({'policies': [{'policy': 'SFT', 'kl': 0.0, 'mean_true_reward': 0.3},
                                             {'policy': 'DPO beta=0.1', 'kl': 2.0, 'mean_true_reward': 0.6}]}))
    plot.plot_frontier(str(demo), str(tmp_path / 'frontier.png'))
    for name in ('curves.png', 'frontier.png'):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    result = subprocess.run([sys.executable, 'tools/plot.py', f'--metrics={tmp_path / "missing.jsonl"}'], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.stderr.strip() == f"error: cannot read {tmp_path / 'missing.jsonl'} (a metrics.jsonl of sft.py or dpo.py): No such file or directory"


def test_frontier_leaves_a_collapsed_run_off_the_axis(tmp_path):
    """A run that ran away (KL 100, reward -1) would squash the rest into a line: the y-axis is the
    others', the collapsed run an arrow at the bottom edge; the symlog x-axis has ticks below 1 nat."""
    import plot
    demo = tmp_path / 'demo.json'
    demo.write_text(json.dumps({'policies': [
        {'policy': 'SFT', 'kl': 0.0, 'mean_true_reward': 0.3}, {'policy': 'DPO beta=0.1', 'kl': 0.4, 'mean_true_reward': 0.5},
        {'policy': 'online DPO, judge true reward', 'kl': 2.5, 'mean_true_reward': 0.8},
        {'policy': 'online DPO, judge implicit', 'kl': 150.0, 'mean_true_reward': -1.0}]}))
    ax = plot.plot_frontier(str(demo), str(tmp_path / 'frontier.png'))
    assert ax.get_ylim() == pytest.approx((0.25, 0.85))  # 0.3 to 0.8, padded by 10% of 0.5
    assert list(ax.get_xticks()) == [0, 0.25, 0.5, 0.75, 1, 10, 100]
    assert [(t.get_text(), t.xy[1]) for t in ax.texts if 'off the axis' in t.get_text()] == [
        ('online DPO, judge implicit: reward -1.00, off the axis', pytest.approx(0.25))]  # at the bottom edge
    rows = json.loads(demo.read_text())
    rows['policies'][-1]['mean_true_reward'] = 3.0  # far above the rest instead: the arrow at the top edge
    demo.write_text(json.dumps(rows))
    ax = plot.plot_frontier(str(demo), str(tmp_path / 'frontier.png'))
    assert [(t.get_text(), t.xy[1]) for t in ax.texts if 'off the axis' in t.get_text()] == [
        ('online DPO, judge implicit: reward 3.00, off the axis', pytest.approx(0.85))]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The README's smoke run (quick=True), where the command line's settings win over QUICK's."""
    out = tmp_path / 'demo'
    result = subprocess.run([sys.executable, 'tools/demo.py', '--quick=True', f'--out_dir={out}', '--num_prompts=4',
                             '--device=cpu', '--dtype=float32', f'--frontier_png={tmp_path / "frontier.png"}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '--max_iters=6 ' in result.stdout and '--max_iters=3 ' in result.stdout  # QUICK's SFT and DPO steps
    assert '8 samples per policy (4 held-out prompts x 2)' in result.stdout  # num_prompts as given
    assert 'A smoke run (quick=True: 6 SFT and 3 DPO steps)' in result.stdout
    assert '| policy | mean true reward | win rate vs SFT | KL to reference | held-out reward accuracy |' in result.stdout
    assert 'DPO beta=0.1: held-out reward accuracy 0.50 to ' in result.stdout  # the README's prose figures
    with open(out / 'demo.json') as f:
        rows = json.load(f)['policies']
    assert [r['policy'] for r in rows] == ['SFT', 'DPO beta=0.1']
    assert rows[0]['kl'] == 0.0 and rows[0]['win_rate'] == 0.5 and rows[0]['preference_accuracy'] == 0.5
    assert (tmp_path / 'frontier.png').read_bytes()[:8] == PNG
    assert (out / 'dpo-beta0.1' / 'curves.png').read_bytes()[:8] == PNG  # the demo draws its training curves
    next_steps = result.stdout[result.stdout.index('Next, for example:'):].splitlines()[1:5]
    sample = next_steps[0].split()  # the first command the demo suggests runs as printed
    assert sample[:2] == ['python', 'sample.py']
    sampled = subprocess.run([sys.executable, *sample[1:], '--num_samples=1', '--max_new_tokens=4', '--device=cpu'],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0 and 'Human: Write a' in sampled.stdout, sampled.stderr[-2000:]


@pytest.mark.slow
def test_shortened_comparison_end_to_end(tmp_path):
    """The DPO family's figure command, shortened: two seeds, DPO, KTO, LoRA DPO, online DPO judged by the DPO
    run's implicit reward (a 10-step SFT model's samples all score -1 by the true reward: every pair
    a tie), best-of-2, two runs at a time; the table gives mean ± sd, in the order of a run one at a
    time, and the figure is drawn."""
    out = tmp_path / 'compare'
    result = subprocess.run([sys.executable, 'tools/demo.py', f'--out_dir={out}', '--seeds=1,2', '--sft_iters=10',
                             '--dpo_iters=3', '--eval_iters=2', '--betas=0.1', '--kto_betas=0.2', '--lora_betas=0.3',
                             '--online_judges=implicit', '--best_of=2',
                             '--num_prompts=4', '--samples_per_prompt=2', '--num_pairs=16', '--device=cpu',
                             '--dtype=float32', f'--frontier_png={tmp_path / "frontier.png"}', '--jobs=2'],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / 'demo.json') as f:
        rows = json.load(f)['policies']
    names = ['SFT', 'DPO beta=0.1', 'KTO beta=0.2', 'LoRA DPO beta=0.3', 'online DPO, judge implicit', 'best-of-2 (SFT)']
    assert [(r['policy'], r['seed']) for r in rows] == [(n, s) for s in (1, 2) for n in names]
    best_of = [r for r in rows if r['policy'] == 'best-of-2 (SFT)']
    assert all(r['kl'] == pytest.approx(math.log(2) - 1 / 2) for r in best_of)  # the best-of-N bound, N = 2
    assert all(r['samples'] == 4 for r in best_of)  # one kept sample a prompt
    assert re.search(r"\| KTO beta=0\.2 \| -?\d\.\d{3} ± \d\.\d{3} \|", result.stdout)  # mean ± sd over the seeds
    assert re.search(r"\| best-of-2 \(SFT\) \| -?\d\.\d{3} ± \d\.\d{3} \| .* \| - \|", result.stdout)  # no implicit reward
    config = torch.load(out / 'seed2' / 'online-implicit' / 'ckpt.pt', weights_only=True)['config']
    assert config['online'] and config['judge'] == f"implicit:{out / 'seed2' / 'dpo-beta0.1'}"
    config = torch.load(out / 'seed1' / 'lora-beta0.3' / 'ckpt.pt', weights_only=True)['config']
    assert (config['lora_rank'], config['beta']) == (32, 0.3)  # config/dpo_lora_synthetic.py's adapters, the beta given
    assert (tmp_path / 'frontier.png').read_bytes()[:8] == PNG
    assert 'iter 3: eval/loss' in (out / 'seed1' / 'logs' / 'kto-beta0.2.log').read_text()  # each run's output, apart

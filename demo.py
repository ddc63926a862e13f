"""
The whole path on the embedded task, offline, on a CPU: a small GPT trained from scratch by SFT on
the task's demonstrations, DPO on its preference pairs, then both scored on held-out prompts with
sampled responses and the task's true reward.

    python demo.py
    python demo.py --betas=0.05,0.1,0.2,0.5 --frontier_png=frontier.png   # the reward-vs-KL frontier

Each stage is the command a user would type (sft.py, dpo.py, evaluate.py with the configs in
config/), run one after the other; the results land in out_dir/demo.json. Running the demo again
replaces the runs it made in out_dir before (--overwrite=True).
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

from configurator import at_least, configure
from data import SYNTHETIC
from synthetic import synthetic_pairs

# -----------------------------------------------------------------------------
out_dir = 'out-demo'
seed = 1337
sft_iters = 600  # config/sft_synthetic.py's schedule, cut or stretched to this many steps
dpo_iters = 300  # config/dpo_synthetic.py's
betas = '0.1'  # one DPO run per comma-separated value
num_prompts = 200  # held-out prompts, each answered samples_per_prompt times by each policy
samples_per_prompt = 4
num_pairs = 1000  # held-out pairs for the implicit reward's accuracy
device = 'auto'
dtype = 'auto'
frontier_png = ''  # also draw true reward against KL for the SFT and every DPO policy
# -----------------------------------------------------------------------------
RANGES = {'seed': at_least(0), 'sft_iters': at_least(1), 'dpo_iters': at_least(1), 'num_prompts': at_least(1),
          'samples_per_prompt': at_least(1), 'num_pairs': at_least(0)}
COLUMNS = ('policy', 'mean true reward', 'win rate vs SFT', 'KL to reference', 'held-out reward accuracy')


def stage(name, *command):
    """Run one script as its own process, the way a user would, and stop the demo if it fails."""
    print(f"\n=== {name}: python {' '.join(command)}", flush=True)
    t0 = time.time()
    result = subprocess.run([sys.executable, *command], cwd=os.path.dirname(os.path.abspath(__file__)))
    if result.returncode != 0:
        sys.exit(f"error: the {name} stage failed (exit code {result.returncode}); its output is above")
    print(f"=== {name}: {time.time() - t0:.0f} s", flush=True)


def table(rows):
    """A markdown table of the policies' results."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['mean_true_reward']:.3f} | {r['win_rate']:.3f} | {r['kl']:.2f} | "
                     f"{r['preference_accuracy']:.3f} |")
    return '\n'.join(lines)


def held_out_change(dpo_dir):
    """What DPO did on the held-out pairs, from its first and last evaluations in metrics.jsonl."""
    with open(os.path.join(dpo_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if '"eval/loss"' in line]
    first, last = rows[0], rows[-1]
    change = lambda key, spec: f"{format(first['eval/' + key], spec)} to {format(last['eval/' + key], spec)}"
    return (f"held-out reward accuracy {change('rewards/accuracies', '.2f')}, margin {change('rewards/margins', '.2f')}; "
            f"log-prob of the chosen responses {change('logps/chosen', '.2f')}, of the rejected {change('logps/rejected', '.2f')}")


def main():
    t0 = time.time()
    system = [f'--device={device}', f'--dtype={dtype}', f'--seed={seed}']
    sft_dir = os.path.join(out_dir, 'sft')
    stage('SFT', 'sft.py', 'config/sft_synthetic.py', f'--out_dir={sft_dir}', f'--max_iters={sft_iters}',
          f'--lr_decay_iters={sft_iters}', f'--eval_interval={sft_iters}', '--overwrite=True', *system)
    policies = [('SFT', sft_dir)]
    for beta in betas.split(','):
        dpo_dir = os.path.join(out_dir, f'dpo-beta{beta}')
        stage(f'DPO beta={beta}', 'dpo.py', 'config/dpo_synthetic.py', f'--init_from={sft_dir}', f'--out_dir={dpo_dir}',
              f'--beta={beta}', f'--max_iters={dpo_iters}', f'--eval_interval={dpo_iters}', '--overwrite=True', *system)
        policies.append((f'DPO beta={beta}', dpo_dir))
    rows = []
    for name, policy_dir in policies:  # every policy against the SFT model: its reference and baseline
        summary_path = os.path.join(policy_dir, 'summary.json')
        stage(f'evaluate {name}', 'evaluate.py', f'--init_from={policy_dir}', f'--ref_from={sft_dir}',
              f'--baseline_from={sft_dir}', f'--num_prompts={num_prompts}', f'--samples_per_prompt={samples_per_prompt}', f'--num_pairs={num_pairs}',
              f'--summary_out={summary_path}', *system)
        with open(summary_path) as f:
            rows.append({'policy': name, **json.load(f)})
    with open(os.path.join(out_dir, 'demo.json'), 'w') as f:
        json.dump({'seed': seed, 'seconds': time.time() - t0, 'policies': rows}, f, indent=2)
    for name, policy_dir in policies[1:]:
        print(f"{name}: {held_out_change(policy_dir)}")
    print(f"\n{table(rows)}\n\n{rows[0]['samples']} samples per policy "
          f"({num_prompts} held-out prompts x {samples_per_prompt}); seed {seed}; {time.time() - t0:.0f} s in all")
    if frontier_png:
        stage('plot', 'plot.py', f'--frontier={os.path.join(out_dir, "demo.json")}', f'--png={frontier_png}')
    dpo_dir = policies[-1][1]
    curves = os.path.join(dpo_dir, 'curves.png')
    plot_curves = f"python plot.py --metrics={os.path.join(dpo_dir, 'metrics.jsonl')} --png={curves}"
    if importlib.util.find_spec('matplotlib'):
        stage('plot', *plot_curves.split()[1:])
        curves_said = f"the DPO run's training curves: {curves}"
    else:
        curves_said = f"to draw the DPO run's training curves: pip install matplotlib, then {plot_curves}"
    prompt_file = os.path.join(out_dir, 'prompt.txt')  # a held-out prompt, in the task's format
    with open(prompt_file, 'w') as f:
        f.write(synthetic_pairs(1, SYNTHETIC['test'][1])[0]['prompt'])
    print(f"""
Results: {os.path.join(out_dir, 'demo.json')}. The models: {sft_dir} (SFT), {dpo_dir} (DPO); each policy's
samples with their scores: samples.jsonl in its directory; {curves_said}.
Next, for example:
  python sample.py --init_from={dpo_dir} --ref_from={sft_dir} --num_samples=8 --max_new_tokens=48 --start=FILE:{prompt_file}
  python demo.py --betas=0.05,0.1,0.5 --frontier_png=frontier.png --out_dir=out-demo-frontier
  python export.py --init_from={dpo_dir} --to=hf-dpo   # for transformers and the hub
(The task's prompts have the form of {prompt_file}, "\\n\\nHuman: ...\\n\\nAssistant:": a plain prompt gives
run-on or empty samples.)""")


if __name__ == '__main__':
    configure(globals(), RANGES)
    main()

"""
The whole path on the embedded task, offline, on a CPU: a small GPT trained from scratch by SFT on
the task's demonstrations, DPO on its preference pairs, then both scored on held-out prompts with
sampled responses and the task's true reward.

    python tools/demo.py
    python tools/demo.py --quick=True  # a smoke run of every stage, about a minute: see it work first
    python tools/demo.py --betas=0.05,0.1,0.5 --lora_betas=0.1 --frontier_png=out-demo-frontier/frontier.png --out_dir=out-demo-frontier
    python tools/demo.py --seeds=1337,1 --betas=0.05,0.1,0.5 --kto_betas=0.05,0.1,0.5 --online_judges=true_reward,implicit \
        --best_of=4 --out_dir=out-family --frontier_png=out-family/family.png   # the whole DPO family

Each stage is the command a user would type (sft.py, dpo.py, evaluate.py with the configs in
config/), run one after the other; the results land in out_dir/demo.json. Running the demo again
replaces the runs it made in out_dir before (--overwrite=True). With several seeds, each seed runs
every stage in out_dir/seed{N}, and the table and the figure give the mean and the spread.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: scripts run from there
sys.path.insert(0, ROOT)

from configurator import Range, configure
from parallel import cpu_has_native_bf16, resolve_device, resolve_dtype
from data import SYNTHETIC, synthetic_pairs

# -----------------------------------------------------------------------------
out_dir = 'out-demo'
seed = 1337
sft_iters = 600  # config/sft_synthetic.py's schedule, cut or stretched to this many steps
dpo_iters = 300  # config/dpo_synthetic.py's
eval_iters = -1  # held-out batches per evaluation of the training runs (-1: all of them, as the configs have it)
betas = '0.1'  # one DPO run per comma-separated value
kto_betas = ''  # one KTO run (config/kto_synthetic.py) per value, e.g. '0.1,0.5'
lora_betas = ''  # one LoRA DPO run (config/dpo_lora_synthetic.py: rank-32 adapters, the base frozen) per value
online_judges = ''  # online DPO runs (config/online_synthetic.py): 'true_reward', 'implicit', 'implicit_per_token' (the first DPO run's implicit reward)
best_of = 0  # N >= 2: also the best-of-N baseline, N samples of the SFT model per prompt, the best by true reward kept
seeds = ''  # several seeds, e.g. '1337,1': every stage once per seed ('' runs seed alone)
jobs = 1  # runs of a seed trained at once, each a process with cores/jobs threads (a GPU has room for several); > 1: their output in out_dir/logs
num_prompts = 200  # held-out prompts, each answered samples_per_prompt times by each policy
samples_per_prompt = 4
num_pairs = 1000  # held-out pairs for the implicit reward's accuracy
device = 'auto'
dtype = 'auto'
frontier_png = ''  # also draw true reward against KL for the SFT and every DPO policy
quick = False  # a smoke run of every stage in about a minute (QUICK's settings, below): it shows the path works, its figures mean nothing
# -----------------------------------------------------------------------------
RANGES = {'seed': '>= 0', 'sft_iters': '>= 1', 'dpo_iters': '>= 1', 'num_prompts': '>= 1',
          'samples_per_prompt': '>= 1', 'num_pairs': '>= 0', 'eval_iters': '-1 (all) or >= 1',
          'best_of': '0 (off) or >= 2', 'jobs': '>= 1',
          'betas': Range(lambda v: all(v.split(',')), "one or more comma-separated betas, e.g. '0.1' (the demo needs a DPO run)"),
          'online_judges': Range(lambda v: set(filter(None, v.split(','))) <= {'true_reward', 'implicit', 'implicit_per_token'},
                                 "'' or a comma-separated list of true_reward, implicit, implicit_per_token")}
QUICK = {'out_dir': 'out-demo-quick', 'sft_iters': 6, 'dpo_iters': 3, 'eval_iters': 1, 'num_prompts': 8,
         'samples_per_prompt': 2, 'num_pairs': 32}  # quick=True: these, unless the command line sets them
COLUMNS = ('policy', 'mean true reward', 'win rate vs SFT', 'KL to reference', 'held-out reward accuracy')


def stage(name, *command, log=None):
    """Run one script as its own process, the way a user would, and stop the demo if it fails. log:
    a file for its output (runs side by side, jobs > 1), shown only when it fails."""
    gap = '' if log else '\n'  # a blank line before a stage whose output follows
    print(f"{gap}=== {name}: python {' '.join(command)}", flush=True)
    t0 = time.time()
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', str(max(1, os.cpu_count() // jobs)))}
    with open(log, 'a') if log else nullcontext() as out:
        result = subprocess.run([sys.executable, *command], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT if log else None, env=env if jobs > 1 else None)
    if result.returncode != 0:
        if log:
            with open(log) as f:
                print(''.join(f.readlines()[-30:]), file=sys.stderr)
        sys.exit(f"error: the {name} stage failed (exit code {result.returncode}); its output is "
                 f"{'in ' + log + ' (its end above)' if log else 'above'}")
    print(f"=== {name}: {time.time() - t0:.0f} s", flush=True)


def table(rows):
    """A markdown table of the policies' results: over several seeds, the mean ± the standard
    deviation; '-' where a policy has no such figure (best-of-N has no implicit reward)."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for name in dict.fromkeys(r['policy'] for r in rows):
        cells = [name]
        for key, digits in (('mean_true_reward', 3), ('win_rate', 3), ('kl', 2), ('preference_accuracy', 3)):
            values = [r[key] for r in rows if r['policy'] == name and key in r]
            spread = f" ± {np.std(values):.{digits}f}" if len(values) > 1 else ''
            cells.append(f"{np.mean(values):.{digits}f}{spread}" if values else '-')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def held_out_change(dpo_dir):
    """What DPO did on the held-out pairs, from its first and last evaluations in metrics.jsonl."""
    with open(os.path.join(dpo_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if '"eval/loss"' in line]
    first, last = rows[0], rows[-1]
    change = lambda key, spec: f"{format(first['eval/' + key], spec)} to {format(last['eval/' + key], spec)}"
    return (f"held-out reward accuracy {change('rewards/accuracies', '.2f')}, margin {change('rewards/margins', '.2f')}; "
            f"log-prob of the chosen responses {change('logps/chosen', '.2f')}, of the rejected {change('logps/rejected', '.2f')}")


def run_seed(seed, out):
    """Every stage for one seed, in the directory out: the SFT model first, then the runs that start
    from it, up to jobs of them at once, each evaluated as soon as it is trained. Returns the policies
    trained [(name, directory)] and one row of results a policy, in the order of the table."""
    system = [f'--device={device}', f'--dtype={dtype}', f'--seed={seed}']
    logs = os.path.join(out, 'logs') if jobs > 1 else None
    log = lambda name: os.path.join(logs, f'{name}.log') if logs else None
    if logs:
        os.makedirs(logs, exist_ok=True)
    sft_dir = os.path.join(out, 'sft')
    stage('SFT', 'sft.py', 'config/sft_synthetic.py', f'--out_dir={sft_dir}', f'--max_iters={sft_iters}',
          f'--lr_decay_iters={sft_iters}', f'--eval_interval={sft_iters}', f'--eval_iters={eval_iters}',
          '--overwrite=True', *system, log=log('sft'))
    runs = [(f'{method} beta={b}', f'{directory}-beta{b}', config, f'--beta={b}')  # one run a beta of each method
            for method, directory, config, values in (('DPO', 'dpo', 'config/dpo_synthetic.py', betas),
                                                      ('KTO', 'kto', 'config/kto_synthetic.py', kto_betas),
                                                      ('LoRA DPO', 'lora', 'config/dpo_lora_synthetic.py', lora_betas))
            for b in filter(None, values.split(','))]
    for judge in filter(None, online_judges.split(',')):  # the implicit judges: the first DPO run's implicit reward
        runs.append((f'online DPO, judge {judge.replace("_", " ")}', f'online-{judge}', 'config/online_synthetic.py',
                     '--judge=' + ('true_reward' if judge == 'true_reward' else f'{judge}:{os.path.join(out, runs[0][1])}')))
    scoring = [f'--ref_from={sft_dir}', f'--baseline_from={sft_dir}', f'--num_prompts={num_prompts}',
               f'--samples_per_prompt={samples_per_prompt}', f'--num_pairs={num_pairs}', *system]

    def scored(name, policy_dir, summary_path, log_name, *extra):  # evaluate.py's summary of a policy, as a row
        stage(f'evaluate {name}', 'tools/evaluate.py', f'--init_from={policy_dir}', f'--summary_out={summary_path}', *extra,
              *scoring, log=log(log_name))
        with open(summary_path) as f:
            return {'policy': name, 'seed': seed, **json.load(f)}

    def trained_and_scored(name, directory, config, setting, judge_run=None):
        if judge_run is not None:
            judge_run.result()  # the DPO run whose implicit reward judges this one (started earlier)
        run_dir = os.path.join(out, directory)
        stage(name, 'dpo.py', config, f'--init_from={sft_dir}', f'--out_dir={run_dir}', setting,
              f'--max_iters={dpo_iters}', f'--eval_interval={dpo_iters}', f'--eval_iters={eval_iters}',
              '--overwrite=True', *system, log=log(directory))
        return scored(name, run_dir, os.path.join(run_dir, 'summary.json'), directory)

    with ThreadPoolExecutor(jobs) as pool:  # a task waits only for one submitted before it: no deadlock
        rows = [pool.submit(scored, 'SFT', sft_dir, os.path.join(sft_dir, 'summary.json'), 'sft')]
        for name, directory, config, setting in runs:
            judge_run = rows[1] if setting.startswith('--judge=implicit') else None
            rows.append(pool.submit(trained_and_scored, name, directory, config, setting, judge_run))
        if best_of:
            name = f'best-of-{best_of}'
            rows.append(pool.submit(scored, f'{name} (SFT)', sft_dir, os.path.join(out, f'{name}.json'), name,
                                    f'--best_of={best_of}', f'--out={os.path.join(out, f"{name}.jsonl")}'))
        rows = [row.result() for row in rows]
    policies = [('SFT', sft_dir)] + [(name, os.path.join(out, directory)) for name, directory, _, _ in runs]
    return policies, rows


def main():
    t0 = time.time()
    if 'implicit' in online_judges and not betas:
        sys.exit("error: online_judges=implicit ranks samples by the first DPO run's implicit reward: give betas")
    all_seeds = [int(s) for s in seeds.split(',')] if seeds else [seed]
    # the dtype every stage will run in: the README's demo table has rows for both that a CPU chooses
    run_device = resolve_device(device)
    run_dtype = resolve_dtype(dtype, run_device)
    why = ('' if run_device != 'cpu' or dtype != 'auto' else
           ' (this CPU has native bf16)' if cpu_has_native_bf16() else ' (this CPU has no native bf16)')
    print(f"demo: {run_device}, {run_dtype}{why}; compare with the README demo table's {run_dtype} rows",
          flush=True)
    rows = []
    for s in all_seeds:
        policies, seed_rows = run_seed(s, out_dir if len(all_seeds) == 1 else os.path.join(out_dir, f'seed{s}'))
        rows += seed_rows
    with open(os.path.join(out_dir, 'demo.json'), 'w') as f:
        json.dump({'seeds': all_seeds, 'seconds': time.time() - t0, 'policies': rows}, f, indent=2)
    for name, policy_dir in policies[1:]:
        if not name.startswith('KTO'):  # KTO's rows have no pairs to be accurate on
            print(f"{name}: {held_out_change(policy_dir)}")
    print(f"\n{table(rows)}\n\n{rows[0]['samples']} samples per policy "
          f"({num_prompts} held-out prompts x {samples_per_prompt}); seed{'s' if len(all_seeds) > 1 else ''} "
          f"{', '.join(map(str, all_seeds))}; {time.time() - t0:.0f} s in all")
    if quick:
        print(f"A smoke run (quick=True: {sft_iters} SFT and {dpo_iters} DPO steps): every stage works, its "
              "figures mean nothing. The real demo, with the README's table: python tools/demo.py")
    if frontier_png:
        stage('plot', 'tools/plot.py', f'--frontier={os.path.join(out_dir, "demo.json")}', f'--png={frontier_png}')
    sft_dir, dpo_dir = policies[0][1], [d for name, d in policies if name.startswith('DPO')][-1]  # the last seed's
    curves = os.path.join(dpo_dir, 'curves.png')
    plot_curves = f"python tools/plot.py --metrics={os.path.join(dpo_dir, 'metrics.jsonl')} --png={curves}"
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
  python tools/demo.py --betas=0.05,0.1,0.5 --lora_betas=0.1 --frontier_png=out-demo-frontier/frontier.png --out_dir=out-demo-frontier
  python tools/export.py --init_from={dpo_dir} --to=hf-dpo   # for transformers and the hub
(The task's prompts have the form of {prompt_file}, "\\n\\nHuman: ...\\n\\nAssistant:": a plain prompt gives
run-on or empty samples.)""")


if __name__ == '__main__':
    settings = configure(globals(), RANGES)
    if quick:  # QUICK's settings, where the command line gave none of its own
        globals().update({key: value for key, value in QUICK.items() if key not in settings.given})
    main()

"""
Evaluation by sampling: draw responses to held-out prompts from a checkpoint and score them.

    python tools/evaluate.py --init_from=out-dpo-synthetic --ref_from=out-sft-synthetic --baseline_from=out-sft-synthetic
    python tools/evaluate.py --init_from=out-dpo-hh --ref_from=out-sft-hh --prompts=prompts.jsonl --out=samples.jsonl

For every sample: log pi(y|x) under the policy, and with a reference log pi_ref(y|x) and the implicit
reward beta * (log pi - log pi_ref) (the DPO paper's "your language model is secretly a reward
model"); on the embedded task also its true reward. The summary: mean true reward, win rate against
the baseline's samples for the same prompts, KL to the reference estimated from the samples as the
mean of log pi(y|x) - log pi_ref(y|x), and the held-out preference accuracy of the implicit reward.
Samples and scores go to a JSONL file, ready for an external judge.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

import checkpoint
import parallel
from common import UserError, atomic_open, exit_with_error
from configurator import configure
from data import EOT_TOKEN, decode, encode, json_lines, load_dataset, response_text, string_fields
from data import true_reward as task_true_reward  # (evaluate()'s true_reward: None but here)
from losses import chosen_rejected_logps, dpo_batch, sequence_logps
from model import load_model
from online import sample_responses

# -----------------------------------------------------------------------------
init_from = 'out-dpo-synthetic'  # the policy: an out_dir, a GPT-2 name, hub id or hub-layout directory
ref_from = ''  # the reference for KL and the implicit reward ('' for none)
baseline_from = ''  # samples of this model are the other side of the win rate ('' for none)
beta = 0.1  # of the implicit reward beta * log(pi / pi_ref)
dataset = 'synthetic'  # held-out prompts from this source's test split, unless prompts is set
data_path = ''
eval_data_path = ''
hh_subsets = 'all'
max_length = 64  # as in training: prompts keep their last max_prompt_length tokens
max_prompt_length = 32
prompts = ''  # a JSONL file of {"prompt": ...} lines instead of the dataset's held-out prompts
num_prompts = 200
num_pairs = 1000  # held-out pairs for the implicit reward's preference accuracy
samples_per_prompt = 4
best_of = 0  # N > 1: score the best-of-N policy instead, N samples of init_from per prompt with the highest true reward kept (embedded task)
max_new_tokens = 48
temperature = 1.0
top_k = None
top_p = None
batch_size = 128  # rows per generation or scoring batch
out = ''  # the samples' JSONL; '' writes samples.jsonl in init_from when it is a directory
summary_out = ''  # also write the summary to this JSON file
device = 'auto'
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
RANGES = {  # what each setting may be: configure() checks them all before any work
    'beta': '> 0', 'dataset': ('hh', 'jsonl', 'synthetic'), 'max_length': '>= 2',
    'max_prompt_length': '>= 1', 'num_prompts': '>= 1', 'num_pairs': '>= 0',
    'samples_per_prompt': '>= 1', 'best_of': '0 (off) or >= 2', 'max_new_tokens': '>= 1',
    'temperature': '>= 0', 'top_k': 'None or >= 1', 'top_p': 'None or (0, 1]',
    'batch_size': '>= 1', 'dtype': ('auto', *parallel.DTYPES), 'seed': '>= 0',
}


def win_rate(rewards, baseline_rewards):
    """The share of paired samples where rewards beats baseline_rewards, a tie counting one half."""
    a, b = np.asarray(rewards, dtype=float), np.asarray(baseline_rewards, dtype=float)
    return float(np.mean((a > b) + 0.5 * (a == b)))


@torch.no_grad()
def preference_accuracy(model, ref, pairs, run, n=None):
    """Held-out accuracy of the implicit reward: how often beta * log(pi / pi_ref) ranks the chosen
    response above the rejected one, a tie counting one half (so a policy equal to its reference
    scores 0.5)."""
    margins, n = [], min(n or len(pairs), len(pairs))
    for i in range(0, n, batch_size // 2):
        batch = dpo_batch(pairs, range(i, min(i + batch_size // 2, n))).to(run.device)
        with run.autocast:
            chosen, rejected = chosen_rejected_logps(model, batch)
            ref_chosen, ref_rejected = chosen_rejected_logps(ref, batch)
        margins.append(((chosen - ref_chosen) - (rejected - ref_rejected)).float().cpu())
    return win_rate(torch.cat(margins).numpy(), 0.0)


def read_prompts(path):
    """The 'prompt' field of each line of a JSONL file."""
    if not os.path.exists(path):
        raise UserError(f"prompts={path!r} does not exist: give a JSONL file with a 'prompt' field a line")
    found = [string_fields(row, ('prompt',), f"{path}, line {lineno}")[0] for lineno, row in json_lines(path)]
    if not found:
        raise UserError(f"{path} holds no prompts")
    return found


def prompt_token_ids(prompt_texts):
    """Each prompt's tokens, its last max_prompt_length as in training (an empty one: <|endoftext|>)."""
    return [encode(p)[-max_prompt_length:] or [EOT_TOKEN] for p in prompt_texts]


def draw(model, prompt_ids, n, run, desc='sampling'):
    """n samples of model for each prompt, with this script's sampling settings and seed."""
    return sample_responses(model, prompt_ids, n, torch.Generator(run.device).manual_seed(seed), run.autocast,
                            batch_size, desc, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p)


def baseline_true_rewards(baseline, prompt_ids, prompt_texts, run, true_reward):
    """The true rewards of samples_per_prompt samples of the baseline for each prompt, side by side."""
    responses = draw(baseline, prompt_ids, samples_per_prompt, run, 'sampling the baseline')
    texts = (p for p in prompt_texts for _ in range(samples_per_prompt))
    return [true_reward(t, response_text(r)) for t, r in zip(texts, responses)]


def evaluate_policy(policy, prompt_texts, run, ref=None, baseline=None, pairs=None, true_reward=None):
    """Sample, score and summarise; returns (summary dict, one record per sample)."""
    prompt_ids = prompt_token_ids(prompt_texts)
    responses = draw(policy, prompt_ids, samples_per_prompt, run)
    rows = [p for p in prompt_ids for _ in range(samples_per_prompt)]
    texts = [p for p in prompt_texts for _ in range(samples_per_prompt)]
    records = [{'prompt': t, 'response': response_text(r), 'ended': r[-1:] == [EOT_TOKEN]}
               for t, r in zip(texts, responses)]
    for rec, logp in zip(records, sequence_logps(policy, rows, responses, run.autocast, batch_size)):
        rec['logp'] = float(logp)
    summary = {'samples': len(records)}
    if true_reward is not None:
        for rec in records:
            rec['true_reward'] = true_reward(rec['prompt'], rec['response'])
        summary['mean_true_reward'] = float(np.mean([rec['true_reward'] for rec in records]))
    if ref is not None:
        for rec, logp in zip(records, sequence_logps(ref, rows, responses, run.autocast, batch_size)):
            rec['ref_logp'] = float(logp)
            rec['implicit_reward'] = beta * (rec['logp'] - rec['ref_logp'])
        summary['kl'] = float(np.mean([rec['logp'] - rec['ref_logp'] for rec in records]))
        if pairs is not None:
            summary['preference_accuracy'] = preference_accuracy(policy, ref, pairs, run, num_pairs)
    if baseline is not None and true_reward is not None:
        summary['win_rate'] = win_rate([rec['true_reward'] for rec in records],
                                       baseline_true_rewards(baseline, prompt_ids, prompt_texts, run, true_reward))
    return summary, records


def best_of_n(policy, prompt_texts, run, baseline, true_reward):
    """The best-of-N baseline (the DPO paper's TL;DR figure): for each prompt, best_of samples of the
    policy, the one with the highest true reward kept. Its KL to the sampled policy is at most
    log N - (N - 1) / N (exact when no two samples tie), the value reported. Returns (summary, records)."""
    prompt_ids = prompt_token_ids(prompt_texts)
    responses = draw(policy, prompt_ids, best_of, run, f'sampling best-of-{best_of}')
    texts = [response_text(r) for r in responses]
    rewards = np.array([true_reward(p, t) for p, t in zip((p for p in prompt_texts for _ in range(best_of)), texts)])
    best = rewards.reshape(len(prompt_texts), best_of).argmax(1) + best_of * np.arange(len(prompt_texts))  # (P,) indices
    records = [{'prompt': p, 'response': texts[i], 'true_reward': float(rewards[i]), 'best_of': best_of}
               for p, i in zip(prompt_texts, best)]
    summary = {'samples': len(records), 'mean_true_reward': float(rewards[best].mean()),
               'kl': float(np.log(best_of) - (best_of - 1) / best_of)}
    if baseline is not None:  # each best sample against the baseline's samples_per_prompt samples of its prompt
        summary['win_rate'] = win_rate(np.repeat(rewards[best], samples_per_prompt),
                                       baseline_true_rewards(baseline, prompt_ids, prompt_texts, run, true_reward))
    return summary, records


def ranking_agreement(records):
    """How well the implicit reward ranks a prompt's samples by true reward: the true reward of the
    sample it ranks first against the mean over all samples (what a random pick gets). Samples tied
    at the top (a policy equal to its reference gives every sample reward 0) count by their mean, as
    a random tie-break would: a ranking that cannot tell them apart gains nothing."""
    by_prompt = {}
    for rec in records:
        by_prompt.setdefault(rec['prompt'], []).append(rec)
    top = []
    for recs in by_prompt.values():
        best = max(r['implicit_reward'] for r in recs)
        top.append(np.mean([r['true_reward'] for r in recs if r['implicit_reward'] == best]))
    return {'true_reward_of_top_ranked': float(np.mean(top)),
            'true_reward_of_random': float(np.mean([r['true_reward'] for r in records]))}


FIGURES = {'samples': 'samples', 'mean_true_reward': 'mean true reward', 'win_rate': 'win rate vs the baseline',
           'kl': 'KL to the reference', 'preference_accuracy': 'held-out reward accuracy',
           'true_reward_of_top_ranked': "true reward of the implicit reward's top sample",
           'true_reward_of_random': 'true reward of a random sample'}


def summary_table(summary):
    """The summary as a table, each figure beside its key in summary_out's JSON."""
    rows = [(FIGURES.get(key, key), f'{value:.4g}', key) for key, value in summary.items()]
    width = max(len(label) for label, _, _ in rows)
    return '\n'.join(f'{label:<{width}}  {value:>8}  ({key})' for label, value, key in rows)


def main():
    run = parallel.start(device, dtype, seed)
    policy = load_model(init_from, device=run.device).eval()
    ref = load_model(ref_from, device=run.device).eval() if ref_from else None
    baseline = load_model(baseline_from, device=run.device).eval() if baseline_from else None
    pairs, true_reward = None, None
    if prompts:
        prompt_texts = read_prompts(prompts)[:num_prompts]
    else:
        pairs = load_dataset(dataset, 'test', data_path, eval_data_path, max_length, max_prompt_length, hh_subsets)
        prompt_texts = list(dict.fromkeys(decode(pairs.get('prompt', i).tolist()) for i in range(len(pairs))))[:num_prompts]
        if dataset == 'synthetic':
            true_reward = task_true_reward
    if best_of and true_reward is None:
        raise UserError("best_of needs a true reward to pick the best sample by: dataset='synthetic', without prompts")
    if best_of:
        summary, records = best_of_n(policy, prompt_texts, run, baseline, true_reward)
    else:
        summary, records = evaluate_policy(policy, prompt_texts, run, ref, baseline, pairs, true_reward)
    if ref is not None and true_reward is not None and not best_of:
        summary.update(ranking_agreement(records))
    path = out or os.path.join(init_from if os.path.isdir(init_from) else '.', 'samples.jsonl')
    with atomic_open(path) as f:
        f.writelines(json.dumps(rec) + '\n' for rec in records)
    if summary_out:
        checkpoint.write_json(summary_out, summary)
    print(summary_table(summary))
    print(f"{len(records)} samples written to {path}" + (f", these figures to {summary_out}" if summary_out else ''))


if __name__ == '__main__':
    configure(globals(), RANGES)
    try:
        main()
    except (UserError, ValueError) as e:
        exit_with_error(e)

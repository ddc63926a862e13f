"""sft.py and dpo.py run as users run them, on the embedded task with tiny models: learning happens,
resume is exact however often, two DDP ranks equal one rank with twice the accumulation, mistakes
stop early, and no run destroys another's files."""

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT

import checkpoint
from model import GPT, GPTConfig

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses

COMMON = ['--device=cpu', '--dtype=float32', '--dataset=synthetic', '--max_length=64', '--max_prompt_length=32',
          '--batch_size=8', '--gradient_accumulation_steps=1', '--eval_iters=4', '--log_interval=1']
TIMING = ('pairs_per_sec', 'sequences_per_sec', 'tokens_per_sec', 'mfu', 'ms_per_iter', 'eta_min',
          'online/sample_seconds')


def run(script, *args, launcher=None):
    cmd = (launcher or [sys.executable]) + [script, *COMMON, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def last(rows, key):
    return [r[key] for r in rows if key in r][-1]


def assert_same_metrics(a_dir, b_dir):
    for a, b in zip(metrics(a_dir), metrics(b_dir), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith('accuracies') and abs(a[k.replace('accuracies', 'margins')]) < 1e-6:
                continue  # step 0, policy = reference: every margin a tie, and a tie broken by rounding either way
            assert a[k] == pytest.approx(b[k], abs=1e-4), k


def params(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['model']


@pytest.fixture(scope='module')
def sft_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('sft'))
    ok(run('sft.py', '--init_from=scratch', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=64',
           f'--out_dir={out}', '--max_iters=80', '--learning_rate=3e-3', '--warmup_iters=5', '--lr_decay_iters=80',
           '--min_lr=3e-4', '--eval_interval=40'))
    return out


def test_sft_lowers_held_out_nll(sft_dir):
    rows = metrics(sft_dir)
    first, final = rows[0]['eval/loss'], last(rows, 'eval/loss')
    assert first > math.log(50257) - 1 and final < 0.5 * first  # from chance level to a learnt format


def test_dpo_raises_held_out_accuracy_and_margin(sft_dir, tmp_path):
    out = str(tmp_path / 'dpo')
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=40', '--learning_rate=1e-3',
           '--warmup_iters=5', '--eval_interval=40', '--beta=0.1'))
    rows = metrics(out)
    assert rows[0]['eval/loss'] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference
    assert rows[0]['eval/rewards/accuracies'] == 0.5 and rows[0]['eval/rewards/margins'] == 0
    assert last(rows, 'eval/rewards/accuracies') > 0.65
    assert last(rows, 'eval/rewards/margins') > 0.1
    assert last(rows, 'eval/loss') < math.log(2) - 0.05


def test_kto_separates_desirable_from_undesirable_rows(sft_dir, tmp_path):
    """KTO on the embedded task's pairs, split into rows: 0.5 at step 0 (the policy is its reference,
    every log-ratio and z are 0), then desirable rows rewarded above undesirable ones."""
    out = str(tmp_path / 'kto')
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--loss_type=kto', '--batch_size=16',
           '--max_iters=40', '--learning_rate=1e-3', '--warmup_iters=5', '--eval_interval=40', '--beta=0.1'))
    rows = metrics(out)
    assert rows[0]['eval/loss'] == pytest.approx(0.5, abs=1e-6) and rows[0]['eval/kl'] == 0
    assert last(rows, 'eval/rewards/chosen') - last(rows, 'eval/rewards/rejected') > 0.04  # 0.069 measured
    assert last(rows, 'eval/loss') < 0.5 - 0.005  # 0.4916 (KTO's gradient is half DPO's at the start: it moves slower)
    assert {'kl', 'rewards/chosen', 'logps/rejected'} <= rows[1].keys() and 'rewards/accuracies' not in rows[1]


def test_online_steps_raise_the_judges_score(sft_dir, tmp_path):
    """Online DPO on the embedded task's prompts, judged by a function of the user's (module:function):
    the share of a response's words that are the task's words, a score dense enough for the tiny SFT
    model here, whose samples are not yet well-formed reviews (the true reward gives them all -1)."""
    (tmp_path / 'judges.py').write_text(
        "import data\n"
        "WORDS = {'the', 'was', 'i', 'found'} | {w for a in data.ASPECTS for w in a.split()} | set(data.SENTIMENT)\n"
        "def task_words(prompts, responses):\n"
        "    return [sum(w.strip('.').lower() in WORDS for w in r.split()) / max(1, len(r.split())) for r in responses]\n")
    out = str(tmp_path / 'online')
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--online=True', f'--judge={tmp_path / "judges.py"}:task_words',
           '--online_max_new_tokens=16', '--batch_size=16', '--max_iters=30', '--learning_rate=1e-3',
           '--warmup_iters=3', '--eval_interval=30'))
    scores = [r['online/score'] for r in metrics(out) if 'online/score' in r]
    assert len(scores) == 30 and np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.1, scores


def test_resumed_twice_equals_uninterrupted(sft_dir, tmp_path):
    """A run preempted twice goes on against the same reference: the second resume reads it from the
    checkpoint the first resume wrote (which once recorded init_from='resume' and lost it)."""
    args = [f'--init_from={sft_dir}', '--learning_rate=1e-3', '--warmup_iters=2', '--eval_interval=2', '--dropout=0.1']
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    ok(run('dpo.py', *args, f'--out_dir={whole}', '--max_iters=6'))
    ok(run('dpo.py', *args, f'--out_dir={parts}', '--max_iters=2'))
    for max_iters in (4, 6):
        ok(run('dpo.py', *args[1:], '--init_from=resume', f'--out_dir={parts}', f'--max_iters={max_iters}'))
    for (name, a), b in zip(params(whole).items(), params(parts).values()):
        assert torch.equal(a, b), name
    assert metrics(whole) == metrics(parts)
    config = torch.load(os.path.join(parts, 'ckpt.pt'), weights_only=True)['config']
    assert config['init_from'] == config['ref_from'] == sft_dir


def interrupt_at(cmd, iteration, signum):
    """Run cmd, send it signum once it has logged iteration, and return (exit status, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(f"iter {iteration}:"):
            proc.send_signal(signum)
            break
    proc.stdout.read()
    return proc.wait(timeout=300), proc.stderr.read()


@pytest.mark.parametrize('script, signum', [('dpo.py', signal.SIGTERM), ('sft.py', signal.SIGINT)])
def test_a_signal_saves_where_the_run_is_and_a_resume_equals_uninterrupted(script, signum, sft_dir, tmp_path):
    """SIGTERM (a cluster's notice) or SIGINT (^C) at a random step: the run finishes that step, saves
    ckpt.pt there, says how to go on in one line and exits 128 + the signal; resumed, it equals a run
    never stopped, metrics.jsonl and weights alike."""
    start = ([f'--init_from={sft_dir}'] if script == 'dpo.py' else
             ['--init_from=scratch', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=64'])
    args = ['--learning_rate=1e-3', '--warmup_iters=2', '--eval_interval=5', '--dropout=0.1', '--max_iters=12']
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    ok(run(script, *start, *args, f'--out_dir={whole}'))
    at = random.Random(str(signum)).randint(1, 9)  # the logged iteration the signal follows
    cmd = [sys.executable, script, *COMMON, *start, *args, f'--out_dir={parts}']
    status, stderr = interrupt_at(cmd, at, signum)
    saved = torch.load(os.path.join(parts, 'ckpt.pt'), weights_only=True)['iter_num']
    assert saved >= at  # the step under way when the signal came (or the next, if it came between)
    name = signal.Signals(signum).name
    assert status == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"stopped: {name} at iteration {saved}; {parts}/ckpt.pt holds iteration {saved}; "
        f"to go on: python {script} --init_from=resume --out_dir={parts}")
    assert 'Traceback' not in stderr
    ok(run(script, '--init_from=resume', f'--out_dir={parts}'))  # the recipe comes from ckpt.pt
    for (key, a), b in zip(params(whole).items(), params(parts).values()):
        assert torch.equal(a, b), key
    assert metrics(whole) == metrics(parts)


def test_logged_means_are_over_the_pairs_the_step_had(sft_dir, tmp_path):
    """3 pairs and batch_size 3: each step has the 3 pairs. Trained metrics at step 0 are those of the
    policy that is its reference, so the loss is ln 2 and every margin a tie; the SFT metrics of the
    first step equal the held-out ones of the same data before it."""
    pairs = tmp_path / 'pairs.jsonl'
    pairs.write_text(''.join(json.dumps({'prompt': f'Q{i}:', 'chosen': f' yes {i}', 'rejected': f' no {i} no'}) + '\n'
                             for i in range(3)))
    data = ['--dataset=jsonl', f'--data_path={pairs}', f'--eval_data_path={pairs}', '--max_iters=1', '--eval_interval=1',
            '--batch_size=3']
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={tmp_path / "dpo"}', *data))
    step = metrics(str(tmp_path / 'dpo'))[1]
    assert step['iter'] == 1 and step['loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert step['rewards/accuracies'] == 0.5 and step['rewards/margins'] == 0
    ok(run('sft.py', f'--init_from={sft_dir}', f'--out_dir={tmp_path / "sft"}', *data))
    before, step = metrics(str(tmp_path / 'sft'))[:2]
    assert step['loss'] == pytest.approx(before['eval/loss'], rel=1e-5)
    assert step['logps/chosen'] == pytest.approx(before['eval/logps/chosen'], rel=1e-5)


def test_accumulated_micro_batches_weigh_each_pair_as_one_batch(sft_dir, tmp_path):
    """12 pairs fill a step of 16 by repeating the first 4 (every micro-batch full); as micro-batches of
    8 and 8 they give the gradient of one batch of 16: each pair weighs 1 / 16 either way."""
    pairs = tmp_path / 'pairs.jsonl'
    pairs.write_text(''.join(json.dumps({'prompt': f'Q{i}:', 'chosen': f' yes {i} ok', 'rejected': f' no {i}'}) + '\n'
                             for i in range(12)))
    args = [f'--init_from={sft_dir}', '--dataset=jsonl', f'--data_path={pairs}', f'--eval_data_path={pairs}',
            '--max_iters=1', '--eval_interval=1', '--group_by_length=False', '--grad_clip=0.0']
    ok(run('dpo.py', *args, f'--out_dir={tmp_path / "split"}', '--batch_size=8', '--gradient_accumulation_steps=2'))
    ok(run('dpo.py', *args, f'--out_dir={tmp_path / "whole"}', '--batch_size=16', '--gradient_accumulation_steps=1'))
    split, whole = (last(metrics(str(tmp_path / d)), 'grad_norm') for d in ('split', 'whole'))
    assert split == pytest.approx(whole, rel=1e-4)


def test_a_run_in_out_dir_is_never_overwritten_by_accident(sft_dir, tmp_path):
    out = str(tmp_path / 'run')
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=1', '--eval_interval=1'))
    before = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    again = run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=1', '--eval_interval=1')
    assert again.returncode != 0
    assert again.stderr.strip() == (f"error: out_dir='{out}' already holds a run (ckpt.pt and metrics.jsonl): "
                                    "continue it with --init_from=resume, choose another --out_dir, or replace it "
                                    "with --overwrite=True")
    sft_files = {name: open(os.path.join(sft_dir, name), 'rb').read() for name in os.listdir(sft_dir)}
    into_sft = run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={sft_dir}', '--overwrite=True')
    assert into_sft.stderr.strip().startswith(f"error: out_dir='{sft_dir}' is also init_from, a model this run reads")
    resume_sft = run('dpo.py', '--init_from=resume', f'--out_dir={sft_dir}')
    assert resume_sft.stderr.strip() == (f"error: {sft_dir}/ckpt.pt was written by sft.py, so dpo.py cannot resume "
                                         f"it; to start DPO from it, pass --init_from={sft_dir}")
    assert {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)} == before
    assert {name: open(os.path.join(sft_dir, name), 'rb').read() for name in os.listdir(sft_dir)} == sft_files
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2',
           '--overwrite=True'))
    assert [r['iter'] for r in metrics(out)] == [0, 1, 2, 2]  # the new run's lines only


def test_killed_at_random_moments_the_checkpoint_loads_and_resumes(sft_dir, tmp_path):
    """kill -9 while a run saves every step: whatever the moment, ckpt.pt loads and the run resumes."""
    out = str(tmp_path / 'killed')
    rng = random.Random(0)
    for attempt in range(3):
        args = ['--init_from=resume'] if attempt else [f'--init_from={sft_dir}']
        cmd = [sys.executable, 'dpo.py', *COMMON, *args, f'--out_dir={out}', '--max_iters=100000', '--eval_interval=1',
               '--eval_iters=1', '--warmup_iters=0']
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ckpt, deadline = os.path.join(out, 'ckpt.pt'), time.time() + 120
        start = os.path.getmtime(ckpt) if attempt else 0
        while (not os.path.exists(ckpt) or os.path.getmtime(ckpt) == start) and time.time() < deadline:
            time.sleep(0.02)  # until this attempt has saved once
        time.sleep(rng.uniform(0, 1.5))
        proc.kill()
        assert proc.wait() == -9, proc.stderr.read()[-2000:]
        iter_num = torch.load(ckpt, weights_only=True)['iter_num']
        assert iter_num >= 1
    ok(run('dpo.py', '--init_from=resume', f'--out_dir={out}', f'--max_iters={iter_num + 1}', '--eval_interval=1'))
    assert torch.load(ckpt, weights_only=True)['iter_num'] == iter_num + 1


TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def assert_same_weights(a, b, start):
    """Runs a and b moved the weights from start alike. Adam divides by sqrt(v): where a gradient is
    nearly 0, the rounding of two summation orders moves an element by a visible part of a step, so
    compare the mean difference with the mean movement (measured: 6e-10 against 2.5e-3); a broken
    all-reduce, shard or data order makes them comparable."""
    a, b, start = (torch.cat([t.flatten() for t in params(d).values()]) for d in (a, b, start))
    assert (a - b).abs().mean() < 1e-4 * (b - start).abs().mean()


def loss(out):
    return [r['loss'] for r in metrics(out) if 'loss' in r]


def test_two_ddp_ranks_equal_one_rank_accumulating_and_resume_on_it(sft_dir, tmp_path):
    """With the default grouping by length: 2 ranks and 1 rank accumulating 2 take the same pairs each
    step and end with the same weights; the 2-rank run, resumed on 1 rank accumulating 2, goes on
    with the same pairs as the 1-rank run."""
    args = [f'--init_from={sft_dir}', '--learning_rate=1e-3', '--warmup_iters=0', '--batch_size=4']
    two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
    ok(run('dpo.py', *args, '--max_iters=3', '--eval_interval=3', f'--out_dir={two}', launcher=TORCHRUN))
    ok(run('dpo.py', *args, '--max_iters=3', '--eval_interval=3', f'--out_dir={one}', '--gradient_accumulation_steps=2'))
    assert_same_weights(two, one, sft_dir)
    assert loss(two) == pytest.approx(loss(one), abs=1e-5)
    held_out = lambda out: [r for r in metrics(out) if 'eval/loss' in r]  # eval_iters=4 batches on any layout
    for a, b in zip(held_out(two), held_out(one), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    for out in (two, one):  # the 2-rank run goes on as one process
        ok(run('dpo.py', '--init_from=resume', f'--out_dir={out}', '--max_iters=5', '--eval_interval=5',
               '--gradient_accumulation_steps=2', *args[1:]))
    assert_same_weights(two, one, sft_dir)
    assert loss(two) == pytest.approx(loss(one), abs=1e-5) and len(loss(one)) == 5
    result = run('dpo.py', '--init_from=resume', f'--out_dir={one}', '--max_iters=6', '--batch_size=4')
    assert result.returncode != 0 and "the run took 8 pairs a step in micro-batches of 4, this one would take 4" in result.stderr


@pytest.mark.parametrize('script', ['sft.py', 'dpo.py'])
def test_fsdp_ranks_equal_one_rank_and_checkpoints_cross_layouts(sft_dir, tmp_path, script):
    """FSDP on 2 ranks ends with the weights of 1 rank accumulating 2 (grouping by length on; for DPO
    in bf16, with FSDP's mixed precision against autocast). Then
    each run goes on the other's way: the FSDP checkpoint under DDP, the one-process checkpoint under
    FSDP, and they still agree. ckpt.pt has one format, written by any layout, so this covers FSDP,
    DDP and one process, each way."""
    start = sft_dir if script == 'dpo.py' else None
    args = [f'--init_from={sft_dir}' if start else '--init_from=scratch', '--learning_rate=1e-3', '--warmup_iters=0',
            '--batch_size=4', *([] if start else ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=64'])]
    if script == 'dpo.py':  # in bf16: FSDP gathers the matmul weights in bf16, where DDP's autocast casts them
        args.append('--dtype=bfloat16')
    fsdp, one = str(tmp_path / 'fsdp'), str(tmp_path / 'one')
    ok(run(script, *args, '--max_iters=3', '--eval_interval=3', f'--out_dir={fsdp}', '--fsdp=True', launcher=TORCHRUN))
    ok(run(script, *args, '--max_iters=3', '--eval_interval=3', f'--out_dir={one}', '--gradient_accumulation_steps=2'))
    if not start:  # the scratch model of seed 1337: under FSDP too rank 0's, not each rank's own seed's
        torch.manual_seed(1337)
        start = str(tmp_path / 'start')
        checkpoint.write({'model': GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).state_dict()},
                                os.path.join(start, 'ckpt.pt'))
    assert_same_weights(fsdp, one, start)
    assert loss(fsdp) == pytest.approx(loss(one), abs=1e-5)
    resume = ['--init_from=resume', '--max_iters=5', '--eval_interval=5', *args[1:]]
    ok(run(script, *resume, f'--out_dir={fsdp}', launcher=TORCHRUN))  # FSDP -> DDP
    ok(run(script, *resume, f'--out_dir={one}', '--fsdp=True', launcher=TORCHRUN))  # one process -> FSDP
    assert_same_weights(fsdp, one, start)
    assert loss(fsdp) == pytest.approx(loss(one), abs=1e-5) and len(loss(one)) == 5


def test_sigterm_to_torchrun_saves_on_every_rank_and_resumes(sft_dir, tmp_path):
    """SIGTERM to torchrun reaches both ranks, which agree on the step to stop after (a collective),
    save it and say how to go on; the resume under torchrun reaches max_iters."""
    out = str(tmp_path / 'ddp')
    cmd = TORCHRUN + ['dpo.py', *COMMON, f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=40',
                      '--eval_interval=20']
    status, stderr = interrupt_at(cmd, 3, signal.SIGTERM)
    saved = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert status != 0 and saved['iter_num'] >= 3 and len(saved['loader']['ranks']) == 2
    assert (f"stopped: SIGTERM at iteration {saved['iter_num']}; {out}/ckpt.pt holds iteration {saved['iter_num']}; "
            f"to go on: the same torchrun command with dpo.py --init_from=resume --out_dir={out}") in stderr
    ok(run('dpo.py', '--init_from=resume', f'--out_dir={out}', '--max_iters=12', launcher=TORCHRUN))
    assert [r['iter'] for r in metrics(out)][-2:] == [12, 12]  # the last step's line, then its evaluation


def test_kto_and_online_dpo_on_two_ddp_ranks(sft_dir, tmp_path):
    """KTO on 2 DDP ranks ends with the weights of 1 rank accumulating 2: each micro-batch holds the
    same rows either way, so its reference point z does too. Online DPO runs on 2 ranks, each
    sampling for its own prompts, logs the judge's score of all ranks' samples, and resumes exactly."""
    args = [f'--init_from={sft_dir}', '--loss_type=kto', '--learning_rate=1e-3', '--warmup_iters=0', '--batch_size=4',
            '--max_iters=3', '--eval_interval=3']
    two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
    ok(run('dpo.py', *args, f'--out_dir={two}', launcher=TORCHRUN))
    ok(run('dpo.py', *args, f'--out_dir={one}', '--gradient_accumulation_steps=2'))
    assert_same_weights(two, one, sft_dir)
    assert loss(two) == pytest.approx(loss(one), abs=1e-5)
    # online: a judge under which rank 1 ties every prompt of every other batch it draws, so it draws
    # twice the prompt batches of rank 0; resumed, each rank goes on where it stopped, and the run
    # equals the one not stopped
    (tmp_path / 'judges.py').write_text(
        "import itertools, os\n"
        "calls = itertools.count()\n"
        "def order(prompts, responses):\n"
        "    if os.environ['RANK'] == '1' and next(calls) % 2 == 0:\n"
        "        return [1.0] * len(responses)  # all tied\n"
        "    return [1.0 + i for i in range(len(responses))]  # each prompt's second sample the better\n")
    args = [f'--init_from={sft_dir}', '--online=True', f'--judge={tmp_path / "judges.py"}:order', '--online_max_new_tokens=8',
            '--batch_size=4', '--eval_interval=2']
    straight, stopped = str(tmp_path / 'online'), str(tmp_path / 'online-stopped')
    ok(run('dpo.py', *args, '--max_iters=4', f'--out_dir={straight}', launcher=TORCHRUN))
    rows = [r for r in metrics(straight) if 'online/score' in r]
    assert len(rows) == 4 and all(r['online/score'] > 0 and r['online/ties'] == pytest.approx(1 / 3) for r in rows)
    ok(run('dpo.py', *args, '--max_iters=2', f'--out_dir={stopped}', launcher=TORCHRUN))
    ranks = torch.load(os.path.join(stopped, 'ckpt.pt'), weights_only=True)['loader']['ranks']
    assert ranks == [[0, 2], [0, 4]]  # epoch 0: rank 0 took 2 prompt batches, rank 1 twice as many
    ok(run('dpo.py', *args[1:], '--init_from=resume', '--max_iters=4', f'--out_dir={stopped}', launcher=TORCHRUN))
    assert_same_metrics(straight, stopped)
    for name, t in params(straight).items():
        assert torch.allclose(t, params(stopped)[name], rtol=0, atol=1e-7), name


@pytest.mark.parametrize('launcher', [None, TORCHRUN], ids=['one process', 'two ranks'])
def test_a_judge_failing_mid_step_saves_the_steps_start_then_stops(launcher, sft_dir, tmp_path, monkeypatch):
    """The judge raises in the second micro-step of step 3 (on rank 1 of two): every rank stops
    there together, ckpt.pt holds iteration 2 with the weights of a run stopped at 2, the line says
    what failed and how to go on, and the resume goes on."""
    judges = tmp_path / 'judges.py'
    judges.write_text(
        "import itertools, os\n"
        "calls = itertools.count()\n"
        "def flaky(prompts, responses):\n"
        "    if os.environ.get('RANK', '0') == os.environ.get('FAIL_ON_RANK') and next(calls) == 5:\n"
        "        raise ConnectionError('the judge service is down')\n"
        "    return [1.0 + i for i in range(len(responses))]  # never a tie: one call a micro-step\n")
    args = [f'--init_from={sft_dir}', '--online=True', f'--judge={judges}:flaky', '--online_max_new_tokens=8',
            '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_interval=100']
    straight, failed = str(tmp_path / 'straight'), str(tmp_path / 'failed')
    ok(run('dpo.py', *args, '--max_iters=2', f'--out_dir={straight}', launcher=launcher))
    monkeypatch.setenv('FAIL_ON_RANK', '1' if launcher else '0')
    result = run('dpo.py', *args, '--max_iters=6', f'--out_dir={failed}', launcher=launcher)
    assert result.returncode == 1, result.stderr[-3000:]
    how = 'the same torchrun command with dpo.py' if launcher else 'python dpo.py'
    end = f"; stopped at iteration 2: {failed}/ckpt.pt holds iteration 2; to go on: {how} --init_from=resume --out_dir={failed}"
    own = (f"error: {'rank 1: ' if launcher else ''}judge='{judges}:flaky' raised ConnectionError: the judge "
           f"service is down (at {judges}, line 5){end}")
    lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert own in lines, result.stderr[-3000:]
    if launcher:  # rank 0 names the rank whose line says why
        assert f"error: online DPO's sampling failed on rank 1 (that rank's own line says why){end}" in lines
    saved = torch.load(os.path.join(failed, 'ckpt.pt'), weights_only=True)
    assert saved['iter_num'] == 2
    for name, t in params(straight).items():
        assert torch.equal(t, saved['model'][name]), name
    monkeypatch.delenv('FAIL_ON_RANK')
    ok(run('dpo.py', *args[1:], '--init_from=resume', '--max_iters=3', f'--out_dir={failed}', launcher=launcher))
    assert torch.load(os.path.join(failed, 'ckpt.pt'), weights_only=True)['iter_num'] == 3


def test_fsdp_resume_is_exact_and_a_nan_stops_before_saving(sft_dir, tmp_path):
    args = [f'--init_from={sft_dir}', '--learning_rate=1e-3', '--warmup_iters=0', '--batch_size=4', '--fsdp=True',
            '--eval_interval=2']
    straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
    ok(run('dpo.py', *args, '--max_iters=4', f'--out_dir={straight}', launcher=TORCHRUN))
    ok(run('dpo.py', *args, '--max_iters=2', f'--out_dir={stopped}', launcher=TORCHRUN))
    ok(run('dpo.py', *args[1:], '--init_from=resume', '--max_iters=4', f'--out_dir={stopped}', launcher=TORCHRUN))
    assert_same_metrics(straight, stopped)
    for name, t in params(straight).items():
        assert torch.allclose(t, params(stopped)[name], rtol=0, atol=1e-7), name
    with open(os.path.join(stopped, 'ckpt.pt'), 'rb') as f:
        good = f.read()
    # a resume keeps its recipe: a learning rate of 1e30 is refused, and ckpt.pt stays as it was
    result = run('dpo.py', *args[1:4], '--fsdp=True', '--init_from=resume', f'--out_dir={stopped}', '--max_iters=8',
                 '--eval_interval=1', '--learning_rate=1e30', '--grad_clip=0.0', launcher=TORCHRUN)
    assert result.returncode != 0
    assert "error: a resume keeps the run's recipe, and this one would change grad_clip 10.0 -> 0.0, " \
           "learning_rate 0.001 -> 1e+30" in result.stderr
    with open(os.path.join(stopped, 'ckpt.pt'), 'rb') as f:
        assert f.read() == good
    # a new run with it: the NaN stops it before the optimizer step and before any save
    nan = str(tmp_path / 'nan')
    result = run('dpo.py', *args[:4], '--fsdp=True', f'--out_dir={nan}', '--max_iters=8', '--eval_interval=1',
                 '--learning_rate=1e30', '--grad_clip=0.0', launcher=TORCHRUN)
    assert result.returncode != 0
    assert re.search(r"error: iteration \d+: the (held-out )?loss is (nan|inf); stopped", result.stderr)
    assert not os.path.exists(os.path.join(nan, 'ckpt.pt'))


def test_fast_paths_train_like_the_simple_one(sft_dir, tmp_path):
    """The precomputed reference against the live one, packed rows against padded ones: one run of
    the simple path, compared with a run of each fast path."""
    args = [f'--init_from={sft_dir}', '--learning_rate=1e-3', '--warmup_iters=2', '--max_iters=3', '--eval_interval=3']
    simple = str(tmp_path / 'simple')
    ok(run('dpo.py', *args, f'--out_dir={simple}'))
    for name, flag in (('precomputed', '--precompute_ref_logps=True'), ('packed', '--pack=True')):
        ok(run('dpo.py', *args, f'--out_dir={tmp_path / name}', flag))
        assert_same_metrics(simple, str(tmp_path / name))


def test_eval_only_writes_metrics_and_no_checkpoint(sft_dir, tmp_path):
    out = tmp_path / 'eval'
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--eval_only=True', '--eval_iters=-1'))
    with open(out / 'eval.json') as f:
        result = json.load(f)
    assert result['eval/loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert sorted(os.listdir(out)) == ['eval.json']


def test_nan_stops_before_saving(sft_dir, tmp_path):
    out = str(tmp_path / 'nan')
    ok(run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'))
    # a run whose recipe blows up: a resume takes the learning rate and clipping from ckpt.pt
    saved = checkpoint.load(os.path.join(out, 'ckpt.pt'))
    saved['config'].update(learning_rate=1e30, warmup_iters=0, grad_clip=0.0)
    checkpoint.write(dict(saved), os.path.join(out, 'ckpt.pt'))
    with open(os.path.join(out, 'ckpt.pt'), 'rb') as f:
        good = f.read()
    result = run('dpo.py', '--init_from=resume', f'--out_dir={out}', '--max_iters=8', '--eval_interval=1')
    assert result.returncode != 0
    assert re.fullmatch(r"error: iteration \d+: the (held-out )?loss is (nan|inf); stopped, .*", result.stderr.strip())
    with open(os.path.join(out, 'ckpt.pt'), 'rb') as f:
        assert f.read() == good


@pytest.mark.parametrize('args,message', [
    (['--init_from=./no/such/run'], "error: './no/such/run' is not a directory, nor a model name"),
    (['--loss_type=dpo'], "config error: loss_type='dpo' is out of range: it must be one of sigmoid, ipo, hinge, simpo"),
    (['--max_length=100'], "error: max_length=100 is longer than the model's block_size 64"),
    (['--beta=high'], "config error: argument --beta=high: beta must be a float (default 0.1), got 'high'"),
])
def test_config_mistakes_stop_with_one_line(args, message, sft_dir, tmp_path):
    out = tmp_path / 'never'
    result = run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', *args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_reference_of_another_shape_is_refused(sft_dir, tmp_path):
    other = str(tmp_path / 'other')
    ok(run('sft.py', '--init_from=scratch', '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=64',
           f'--out_dir={other}', '--max_iters=1', '--eval_interval=1'))
    result = run('dpo.py', f'--init_from={sft_dir}', f'--ref_from={other}', f'--out_dir={tmp_path / "never"}')
    assert result.returncode != 0
    assert result.stderr.strip().startswith(f"error: the reference ({other}) has the shape"), result.stderr[-2000:]


def test_a_second_run_or_a_resume_while_a_run_lives_is_refused_with_its_holder(sft_dir, tmp_path):
    """Two runs in one out_dir would interleave metrics.jsonl and leave whichever ckpt.pt saved last:
    while a run lives (here stopped with SIGSTOP, its lock held), a new run and a resume into its
    out_dir both stop with one line naming it, and leave its files byte for byte."""
    out = str(tmp_path / 'alive')
    cmd = [sys.executable, 'dpo.py', *COMMON, f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=100000',
           '--eval_interval=2', '--learning_rate=1e-4']
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until it has saved once
            if os.path.exists(os.path.join(out, 'ckpt.pt')):
                break
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGSTOP)  # alive, its lock held, its files still
        time.sleep(1)  # a save under way finishes its rename first
        before = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
        for extra in (['--overwrite=True'], ['--init_from=resume']):
            result = run('dpo.py', f'--init_from={sft_dir}', f'--out_dir={out}', '--max_iters=10', *extra)
            assert result.returncode == 1
            assert result.stderr.strip() == (f"error: out_dir='{out}' is in use by another run (pid {first.pid} on "
                                             f"{socket.gethostname()}, which holds {out}/.lock): wait for it to end, "
                                             "or choose another --out_dir")
        assert {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)} == before
    finally:
        first.kill()
        first.wait()

"""KTO (dpo.py with loss_type='kto'): the loss and its KL reference point by hand, the rows that
unpaired and paired data give, the mismatched rows of a batch, and TRL's KTOTrainer as the oracle
of the held-out loss and rewards on the same weights and rows."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import UserError
import losses
from losses import eval_batches, kto_batch
from conftest import ROOT
from data import EOT_TOKEN, encode, load_dataset, tokenize_pairs, unpair
from model import GPT, GPTConfig, save_pretrained

sigmoid = lambda x: 1 / (1 + math.exp(-x))


def write_jsonl(path, rows):
    with open(path, 'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows)
    return str(path)


def test_kto_loss_by_hand():
    policy, ref = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -3.5])  # log-ratios 1, -1, 0.5
    policy_kl, ref_kl = torch.tensor([-4.0, -5.0, -6.0]), torch.tensor([-4.5, -5.0, -6.4])  # z = (0.5 + 0 + 0.4) / 3 = 0.3
    desirable = torch.tensor([True, False, False])
    loss, rewards, z = losses.kto_loss(policy, ref, policy_kl, ref_kl, desirable, beta=0.5, desirable_weight=2.0,
                                       undesirable_weight=0.5)
    assert z.item() == pytest.approx(0.3)
    expected = [2.0 * (1 - sigmoid(0.5 * (1 - 0.3))),      # desirable: rises above z
                0.5 * (1 - sigmoid(0.5 * (0.3 - -1))),     # undesirable: falls below z
                0.5 * (1 - sigmoid(0.5 * (0.3 - 0.5)))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.25]) and not rewards.requires_grad
    # rpo_alpha adds a desirable row's NLL per token (here -(-1.0) / 4 tokens, times 0.8); undesirable rows keep theirs
    with_nll, _, _ = losses.kto_loss(policy, ref, policy_kl, ref_kl, desirable, beta=0.5, desirable_weight=2.0,
                                     undesirable_weight=0.5, rpo_alpha=0.8, lengths=torch.tensor([4.0, 2.0, 5.0]))
    assert with_nll.tolist() == pytest.approx([expected[0] + 0.8 * 1.0 / 4, expected[1], expected[2]], abs=1e-6)


def test_kto_reference_point_is_clamped_and_detached():
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    policy_kl = torch.tensor([-5.0, -5.0], requires_grad=True)  # below the reference: a negative estimate
    loss, _, z = losses.kto_loss(policy, torch.tensor([-1.0, -1.0]), policy_kl, torch.tensor([-4.0, -4.0]),
                                 torch.tensor([True, False]), beta=0.1)
    assert z.item() == 0.0  # clamped at 0
    assert loss.tolist() == pytest.approx([0.5, 0.5])
    loss.sum().backward()
    assert policy_kl.grad is None or torch.all(policy_kl.grad == 0)  # z carries no gradient
    # d/dr of 1 - sigmoid(beta r) at 0 is -beta / 4, and of 1 - sigmoid(-beta r) is +beta / 4
    assert policy.grad.tolist() == pytest.approx([-0.025, 0.025])


def test_rows_from_pairs_and_from_unpaired_jsonl(tmp_path):
    pairs = tokenize_pairs([dict(prompt='Q: a?', chosen=' yes', rejected=' no', where='1'),
                            dict(prompt='Q: b?', chosen=' up', rejected=' down', where='2')], 64, 32)
    rows = unpair(pairs)
    assert rows.unpaired and len(rows) == 4 and rows.arrays['label'].tolist() == [True, False, True, False]
    for n, (i, field) in enumerate([(0, 'chosen'), (0, 'rejected'), (1, 'chosen'), (1, 'rejected')]):
        assert rows.get('prompt', n).tolist() == pairs.get('prompt', i).tolist()
        assert rows.get('completion', n).tolist() == pairs.get(field, i).tolist()
    path = write_jsonl(tmp_path / 'rows.jsonl', [dict(prompt='Q: a?', completion=' yes', label=True),
                                                 dict(prompt='Q: b?', completion=' down', label=False)])
    data = load_dataset('jsonl', 'train', data_path=path, cache_dir=str(tmp_path / 'cache'), unpaired_ok=True)
    assert data.arrays['label'].tolist() == [True, False]
    assert data.get('completion', 1).tolist() == encode(' down') + [EOT_TOKEN]  # <|endoftext|> ends it, as a pair's responses
    again = load_dataset('jsonl', 'train', data_path=path, cache_dir=str(tmp_path / 'cache'), unpaired_ok=True)
    assert again.stats['cache'].startswith('loaded') and again.arrays['label'].tolist() == [True, False]
    with pytest.raises(UserError, match=r"rows\.jsonl holds unpaired rows .*only loss_type='kto' trains on them"):
        load_dataset('jsonl', 'train', data_path=path, cache_dir=str(tmp_path / 'cache'))


def test_kto_batch_pairs_each_prompt_with_the_previous_rows_completion():
    # rows 0 (a, yes), 1 (a, no), 2 (b, up x 9), 3 (b, down)
    rows = unpair(tokenize_pairs([dict(prompt='Q: a?', chosen=' yes', rejected=' no', where='1'),
                                  dict(prompt='Q: b?' * 3, chosen=' up' * 9, rejected=' down', where='2')], 64, 32))
    # each row's mismatched completion, by hand: the previous row's (the first row: the last one's), or,
    # where that has the same prompt, the nearest before it with another; a batch of one prompt: the previous
    for indices, sources in (([2, 0, 1], [1, 2, 2]),  # row 1 follows row 0, the same prompt: row 2's
                             ([3, 0, 2], [0, 3, 0]),  # row 3 would take row 2's (cyclically before it): row 0's
                             ([0, 1], [1, 0])):       # one prompt in the batch: no mismatch to be had
        for pack in (False, True):
            batch, kl_batch = kto_batch(rows, np.array(indices), max_length=20, pack=pack)
            mine = lambda b, n: b.targets[b.segments == n].tolist()  # sequence n's targets, prompt cells (-1) included
            for n, (i, source) in enumerate(zip(indices, sources)):
                completion = rows.get('completion', source)[:20 - len(rows.get('prompt', i))]  # cut to fit max_length
                assert [t for t in mine(kl_batch, n) if t != -1] == completion.tolist()
                assert [t for t in mine(batch, n) if t != -1] == rows.get('completion', i).tolist()
            assert int(kl_batch.lengths.max()) <= 20 - 1  # a unit is its sequence less the last token


def test_held_out_batches_of_rows_from_pairs_mismatch_every_prompt():
    """Evaluation reads the rows in order, a pair's two rows side by side: the completion each
    mismatched row takes must come from another pair, for every batch size from 3 to the number of
    pairs (a batch of 2 rows in order is one pair: no other prompt to take from)."""
    n_pairs = 5
    pairs = tokenize_pairs([dict(prompt=f'Q: {k}?', chosen=f' yes {k}', rejected=f' no {k}', where=str(k))
                            for k in range(n_pairs)], 64, 32)
    rows = unpair(pairs)
    responses_of = {tuple(pairs.get('prompt', k).tolist()): {tuple(pairs.get(f, k).tolist()) for f in ('chosen', 'rejected')}
                    for k in range(n_pairs)}
    for batch_size in range(3, n_pairs + 1):
        for indices, _ in eval_batches(len(rows), batch_size):
            if len(set(indices // 2)) < 2:
                continue  # a last batch of one pair's rows has no other prompt
            _, kl_batch = kto_batch(rows, indices, max_length=64)
            for n, i in enumerate(indices):
                taken = tuple(t for t in kl_batch.targets[n].tolist() if t != -1)  # padded: row n is sequence n
                assert taken not in responses_of[tuple(rows.get('prompt', i).tolist())], (batch_size, indices)


@pytest.mark.slow
def test_held_out_loss_and_rewards_equal_trl_kto_trainer(tmp_path):
    """Our dpo.py --loss_type=kto --eval_only=True and TRL 1.16's KTOTrainer.evaluate, on the same two
    models (policy and reference) in the hub layout and the same 8 rows in one batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer
    import export
    for name, seed in (('policy', 1), ('ref', 2)):
        torch.manual_seed(seed)
        save_pretrained(GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)), str(tmp_path / name))
        export.save_tokenizer(str(tmp_path / name), 64)
    rows = [dict(prompt=f"\n\nHuman: what is {a} plus {b}?\n\nAssistant:", completion=f" It is {a + b + wrong}.",
                 label=not wrong) for a, b, wrong in ((1, 2, 0), (3, 4, 1), (5, 1, 0), (2, 2, 3), (7, 1, 0),
                                                      (4, 4, 0), (6, 3, 2), (9, 9, 1))]
    path = write_jsonl(tmp_path / 'rows.jsonl', rows)
    settings = dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    result = subprocess.run([sys.executable, 'dpo.py', f'--init_from={tmp_path / "policy"}', f'--ref_from={tmp_path / "ref"}',
                             '--dataset=jsonl', f'--data_path={path}', f'--eval_data_path={path}', '--loss_type=kto',
                             *(f'--{k}={v}' for k, v in settings.items()), '--batch_size=8', '--eval_iters=-1',
                             '--eval_only=True', f'--out_dir={tmp_path / "ours"}', '--device=cpu', '--dtype=float32',
                             '--max_length=64', '--max_prompt_length=32'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(tmp_path / 'ours' / 'eval.json') as f:
        ours = json.load(f)

    from datasets import Dataset
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / 'policy'))
    tokenizer.pad_token = tokenizer.eos_token
    args = KTOConfig(output_dir=str(tmp_path / 'trl'), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                     max_length=64, report_to='none', use_cpu=True, disable_dropout=True,
                     bf16=False, **settings)  # TRL's default is bf16 autocast; float32 as ours
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(str(tmp_path / 'policy')),
                         ref_model=AutoModelForCausalLM.from_pretrained(str(tmp_path / 'ref')),
                         args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    theirs = trainer.evaluate()
    assert ours["eval/kl"] > 0  # the reference point is exercised, not clamped away
    for key in ('loss', 'rewards/chosen', 'rewards/rejected', 'kl', 'logps/chosen', 'logps/rejected'):
        assert ours[f'eval/{key}'] == pytest.approx(theirs[f'eval_{key}'], rel=1e-4, abs=1e-5), key

"""data.py: HH splitting, truncation and masks by hand, DDP shards, exact resume, the cache, bad
input, and the hub code path on a local copy of the dataset repo's layout."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import batches
import data
from batches import PairLoader
from data import EOT_TOKEN, DataError, encode, load_dataset, split_transcripts, truncate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, 'w') as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
    return str(path)


# ---------------------------------------------------------------- HH splitting

def test_split_single_and_multi_turn():
    assert split_transcripts("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away") == \
        ("\n\nHuman: hi\n\nAssistant:", " hello", " go away")
    chosen = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: d, gladly."
    rejected = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: no."
    assert split_transcripts(chosen, rejected) == \
        ("\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:", " d, gladly.", " no.")


def test_split_response_that_says_assistant():
    chosen = "\n\nHuman: who are you?\n\nAssistant: Assistant: that is my name. Human: is not yours."
    rejected = "\n\nHuman: who are you?\n\nAssistant: nobody"
    assert split_transcripts(chosen, rejected) == \
        ("\n\nHuman: who are you?\n\nAssistant:", " Assistant: that is my name. Human: is not yours.", " nobody")


@pytest.mark.parametrize('chosen,rejected,reason', [
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
     "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e", "differ before the last Assistant turn"),
    ("\n\nHuman: only a question", "\n\nHuman: only a question", "no '\\n\\nAssistant:' turn"),
    ("\n\nHuman: a\n\nAssistant: same", "\n\nHuman: a\n\nAssistant: same", "identical"),
    ("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: e", "chosen response is empty"),
])
def test_split_refusals_give_reasons(chosen, rejected, reason):
    assert reason in split_transcripts(chosen, rejected)


# ---------------------------------------------------------------- truncation and masks by hand

def test_truncation_by_hand():
    prompt, chosen, rejected = list(range(1, 11)), [21, 22, EOT_TOKEN], [31, EOT_TOKEN]
    assert truncate(prompt, chosen, rejected, 20, 4) == (prompt, chosen, rejected, False)  # fits
    assert truncate(prompt, chosen, rejected, 8, 4) == ([7, 8, 9, 10], chosen, rejected, True)  # prompt's start goes
    assert truncate(prompt, chosen, rejected, 6, 4) == ([7, 8, 9, 10], [21, 22], [31, EOT_TOKEN], True)  # then responses' ends
    assert truncate([1, 2], list(range(10)), [5], 6, 4) == ([1, 2], [0, 1, 2, 3], [5], True)  # a short prompt stays
    assert truncate(prompt, chosen, rejected, 5, 5) is None  # no room for any response token


def test_rows_and_targets_by_hand():
    p = np.array([5, 6, 7])
    batch = batches.pad_rows([(p, np.array([8, 9, EOT_TOKEN])), (p[:1], np.array([4, EOT_TOKEN]))])
    assert batch.idx.tolist() == [[5, 6, 7, 8, 9], [5, 4, EOT_TOKEN, EOT_TOKEN, EOT_TOKEN]]
    assert batch.targets.tolist() == [[-1, -1, 8, 9, EOT_TOKEN], [4, EOT_TOKEN, -1, -1, -1]]
    assert batch.segments.tolist() == [[0, 0, 0, 0, 0], [1, 1, -1, -1, -1]]
    assert batch.position_ids is None and batch.attn_mask is None and batch.lengths.tolist() == [5, 2]
    assert batch.flops_shape() == (7, 5, (25 + 4) / 7)  # tokens, targets, sum(length^2) / tokens


def test_packed_rows_by_hand():
    """Sequences of 4, 2, 3 and 1 tokens in rows of 4 (the longest), first-fit decreasing: [0], [2, 3], [1]."""
    rows = [(np.array([1, 2]), np.array([3, 4, 5])), (np.array([6]), np.array([7, 8])),
            (np.array([9, 10]), np.array([11, 12])), (np.array([13]), np.array([14]))]
    assert batches.pack_bins([4, 2, 3, 1]) == [[0], [2, 3], [1]]
    batch = batches.pad_rows(rows, pack=True)
    assert batch.idx.tolist() == [[1, 2, 3, 4], [9, 10, 11, 13], [6, 7, EOT_TOKEN, EOT_TOKEN]]
    assert batch.targets.tolist() == [[-1, 3, 4, 5], [-1, 11, 12, 14], [7, 8, -1, -1]]
    assert batch.segments.tolist() == [[0, 0, 0, 0], [2, 2, 2, 3], [1, 1, -1, -1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]]
    assert batch.attn_mask.shape == (3, 1, 4, 4)
    assert batch.attn_mask[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    assert batch.attn_mask[2, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert batch.sequence_sums(torch.ones(3, 4)).tolist() == [4 + 2, 2, 3, 1]  # padding cells counted to sequence 0


def test_packed_pair_shares_its_prompt_by_hand():
    """prompt [1, 2, 3], chosen [4, 5], rejected [6, 7, 8]: the prompt once, then each response after
    the prompt's last token, at the positions it has after the prompt, seeing the prompt, not the other."""
    pairs = data.PairData({'prompt_tokens': np.array([1, 2, 3]), 'prompt_offsets': np.array([0, 3]),
                           'chosen_tokens': np.array([4, 5]), 'chosen_offsets': np.array([0, 2]),
                           'rejected_tokens': np.array([6, 7, 8]), 'rejected_offsets': np.array([0, 3])}, {})
    batch = batches.dpo_batch(pairs, [0], pack=True)
    assert batch.idx.tolist() == [[1, 2, 3, 4, 3, 6, 7]]
    assert batch.targets.tolist() == [[-1, -1, 4, 5, 6, 7, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert batch.segments.tolist() == [[0, 0, 0, 0, 1, 1, 1]] and batch.n == 2 and batch.lengths.tolist() == [7]
    assert batch.attn_mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0],
                                                    [1, 1, 0, 0, 0, 0, 0],
                                                    [1, 1, 1, 0, 0, 0, 0],
                                                    [1, 1, 1, 1, 0, 0, 0],
                                                    [1, 1, 0, 0, 1, 0, 0],
                                                    [1, 1, 0, 0, 1, 1, 0],
                                                    [1, 1, 0, 0, 1, 1, 1]]
    padded = batches.dpo_batch(pairs, [0])  # the same pair as two padded rows: 2 + 3 = 5 prompt tokens more
    assert padded.idx.shape == (2, 5) and padded.flops_shape()[0] == 4 + 5


def test_padding_fraction_of_packed_batches():
    pairs = data.tokenize_pairs([{'prompt': 'a b c d e f g h', 'chosen': ' x', 'rejected': ' y z w v u t s r q p'},
                                 {'prompt': 'a', 'chosen': ' b', 'rejected': ' c'}], 64, 32)
    batch = [np.array([0, 1])]
    for pack in (False, True):
        b = batches.dpo_batch(pairs, batch[0], pack)
        assert batches.dpo_padding(pairs, batch, pack) == pytest.approx(1 - b.lengths.sum() / b.idx.numel())
    assert batches.dpo_padding(pairs, batch, True) < batches.dpo_padding(pairs, batch, False)


def test_dpo_batch_layout_and_logprob_sums(tmp_path):
    """(2B, T): chosen rows then rejected; a row's masked log-prob sum is log p(response | prompt)
    as a token-by-token loop over the unpadded sequence computes it."""
    from model import GPT, GPTConfig
    path = write_jsonl(tmp_path / 'd.jsonl', [
        {'prompt': 'Q: 2+2?', 'chosen': ' 4', 'rejected': ' five, I think'},
        {'prompt': 'Name a colour of the sky on a clear day.', 'chosen': ' Blue.', 'rejected': ' Green'}])
    pairs = load_dataset('jsonl', 'train', data_path=path, cache_dir=str(tmp_path / 'cache'))
    assert pairs.get('chosen', 1).tolist() == encode(' Blue.') + [EOT_TOKEN]
    assert pairs.get('prompt', 1).tolist() == encode('Name a colour of the sky on a clear day.')
    idx, targets = batches.dpo_batch(pairs, [0, 1])[:2]
    rows = [(0, 'chosen'), (1, 'chosen'), (0, 'rejected'), (1, 'rejected')]
    assert idx.shape == targets.shape == (4, max(len(pairs.get('prompt', i)) + len(pairs.get(f, i)) for i, f in rows) - 1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        sums = model(idx, targets).sum(dim=1)
        for n, (i, field) in enumerate(rows):
            prompt, response = pairs.get('prompt', i).tolist(), pairs.get(field, i).tolist()
            seq = torch.tensor([prompt + response])
            logp = torch.log_softmax(model(seq)[0].double(), dim=-1)
            expected = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(response))
            assert (targets[n] != -1).sum() == len(response)
            assert abs(sums[n].item() - expected.item()) < 1e-4


def test_worker_processes_tokenize_exactly_as_one_process():
    texts = [f"text {i} " * (i % 7) for i in range(9000)]  # 3 chunks, one of them empty-ish
    serial, parallel = data.encode_all(texts, 'x', workers=1), data.encode_all(texts, 'x', workers=2)
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])
    tokens, offsets = parallel
    assert tokens[offsets[5000]:offsets[5001]].tolist() == encode(texts[5000])


def test_sft_batch_is_prompt_plus_chosen():
    pairs = data.tokenize_pairs([{'prompt': 'a', 'chosen': ' b c', 'rejected': ' d', 'where': 'x'}], 64, 32)
    idx, targets = batches.sft_batch(pairs, [0])[:2]
    assert idx[0].tolist() == encode('a') + encode(' b c')
    assert targets[0].tolist() == [-1] * (len(encode('a')) - 1) + encode(' b c') + [EOT_TOKEN]


# ---------------------------------------------------------------- order, shards, resume

@pytest.mark.parametrize('world_size', [1, 2, 3])
@pytest.mark.parametrize('n,group', [(12, False), (13, False), (13, True)])
def test_shards_are_disjoint_and_complete(world_size, n, group):
    lengths = np.random.default_rng(0).integers(5, 50, n)
    per_rank = [PairLoader(lengths, 2, seed=3, rank=r, world_size=world_size, group_by_length=group).epoch_batches(0)
                for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    for step in zip(*per_rank):
        assert len({len(b) for b in step}) == 1  # of the same size
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert set(seen.tolist()) == set(range(n))  # complete
    assert len(seen) == n + (-n) % world_size  # disjoint, but for the repeats that even out the ranks


def test_order_depends_on_seed_and_epoch_only():
    lengths = np.arange(40)
    first = lambda seed, epoch: np.concatenate(PairLoader(lengths, 4, seed=seed).epoch_batches(epoch)).tolist()
    assert first(1, 0) == first(1, 0)
    assert first(1, 0) != first(1, 1) and first(1, 0) != first(2, 0)
    assert sorted(first(1, 1)) == list(range(40))


def test_restored_loader_continues_exactly():
    lengths = np.arange(10)
    uninterrupted = PairLoader(lengths, 3, seed=7, group_by_length=True)
    expected = [next(uninterrupted).tolist() for _ in range(9)]  # crosses two epoch boundaries (4 batches each)
    first = PairLoader(lengths, 3, seed=7, group_by_length=True)
    got = [next(first).tolist() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # as small and plain as a checkpoint needs
    resumed = PairLoader(lengths, 3, seed=7, group_by_length=True)
    resumed.load_state_dict(state)
    got += [next(resumed).tolist() for _ in range(4)]
    assert got == expected


def test_grouping_by_length_cuts_padding():
    pairs = data.tokenize_pairs([{'prompt': 'p ' * (i % 37), 'chosen': ' c' * (i % 11 + 1), 'rejected': ' r',
                                  'where': str(i)} for i in range(400)], 512, 256)
    plain, grouped = (batches.dpo_padding(pairs, PairLoader(pairs.pair_lengths(), 16, group_by_length=g).epoch_batches(0))
                      for g in (False, True))
    assert grouped < plain
    one_batch = batches.dpo_padding(pairs, [np.array([0, 1])])  # by hand from the rows' lengths
    rows = [len(pairs.get('prompt', i)) + len(pairs.get(f, i)) - 1 for f in ('chosen', 'rejected') for i in (0, 1)]
    assert one_batch == pytest.approx(1 - sum(rows) / (4 * max(rows)))


# ---------------------------------------------------------------- the cache

def test_cache_is_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / 'd.jsonl', [{'prompt': 'a', 'chosen': ' b', 'rejected': ' c'}])
    cache = str(tmp_path / 'cache')
    first = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    assert first.stats['cache'].startswith('wrote')

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")
    monkeypatch.setattr(data, 'tokenize_pairs', no_tokenizing)
    again = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    assert again.stats['cache'] == 'loaded' + first.stats['cache'][len('wrote'):]
    for k in first.arrays:
        assert np.array_equal(first.arrays[k], again.arrays[k])
    monkeypatch.undo()
    assert load_dataset('jsonl', 'train', data_path=path, max_length=100, cache_dir=cache).stats['cache'].startswith('wrote')
    write_jsonl(path, [{'prompt': 'a', 'chosen': ' b', 'rejected': ' changed'}])
    changed = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    assert changed.stats['cache'].startswith('wrote') and changed.get('rejected', 0).tolist() == encode(' changed') + [EOT_TOKEN]
    assert len(os.listdir(cache)) == 3


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('lines,message', [
    (['{"prompt": "a", "chosen": " b", "rejected": " c"}', '{"prompt": "a", "chosen": " b",'],
     r"d\.jsonl, line 2: not valid JSON"),
    (['{"prompt": "a", "chosen": " b"}'], r"d\.jsonl, line 1: missing field 'rejected'"),
    (['', '{"prompt": "a", "chosen": 3, "rejected": " c"}'], r"d\.jsonl, line 2: field 'chosen' must be a string, got int"),
    (['[1, 2]'], r"d\.jsonl, line 1: expected a JSON object, got list"),
    ([], r"d\.jsonl holds no usable pairs"),
    (['{"prompt": "a", "chosen": " b", "rejected": "  "}'], r"d\.jsonl, line 1: the rejected response is empty"),
    (['{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: X\\n\\nAssistant: c"}'],
     r"d\.jsonl, line 1: chosen and rejected differ before the last Assistant turn"),
    (['{"prompt": "' + 'word ' * 300 + '", "chosen": " b", "rejected": " c"}'],
     r"d\.jsonl, line 1: the prompt keeps 64 tokens after truncation to max_prompt_length=64, .*max_length=64"),
])
def test_bad_input_is_named_and_nothing_is_written(lines, message, tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', lines)
    cache = tmp_path / 'cache'
    with pytest.raises(DataError, match=message):
        load_dataset('jsonl', 'train', data_path=path, max_length=64, max_prompt_length=64, cache_dir=str(cache))
    assert not cache.exists() or not os.listdir(cache)


def test_cli_prints_one_line_and_writes_nothing(tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', ['{"prompt": "a", "chosen": " b"}'])
    run = subprocess.run([sys.executable, 'data.py', '--dataset=jsonl', f'--data_path={path}',
                          f'--cache_dir={tmp_path / "cache"}'], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip() == f"error: {path}, line 1: missing field 'rejected'"
    assert not (tmp_path / 'cache').exists()


# ---------------------------------------------------------------- HH through the hub code path

def test_hh_reads_the_dataset_repo_layout(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    repo = tmp_path / 'hub' / 'datasets--Anthropic--hh-rlhf'
    snapshot = repo / 'snapshots' / ('a' * 40)
    (snapshot / 'helpful-base').mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('a' * 40)
    rows = [{'chosen': "\n\nHuman: hi\n\nAssistant: hello", 'rejected': "\n\nHuman: hi\n\nAssistant: go away"},
            {'chosen': "\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant: good",
             'rejected': "\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant: bad"},
            {'chosen': "\n\nHuman: x\n\nAssistant: same", 'rejected': "\n\nHuman: x\n\nAssistant: same"}]
    with gzip.open(snapshot / 'helpful-base' / 'train.jsonl.gz', 'wt') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))
    pairs = load_dataset('hh', 'train', hh_subsets='helpful-base', cache_dir=str(tmp_path / 'cache'),
                         hub_cache_dir=str(tmp_path / 'hub'))
    assert len(pairs) == 2
    assert pairs.stats['dropped'] == {'chosen and rejected are identical': 1}
    assert pairs.get('prompt', 1).tolist() == encode("\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant:")
    with pytest.raises(DataError, match="unknown hh_subsets \\['helpful'\\]"):
        load_dataset('hh', 'train', hh_subsets='helpful', cache_dir=str(tmp_path / 'cache'))
    with pytest.raises(DataError, match="could not get harmless-base/train.jsonl.gz of the dataset Anthropic/hh-rlhf"):
        load_dataset('hh', 'train', hh_subsets='harmless-base', cache_dir=str(tmp_path / 'cache'),
                     hub_cache_dir=str(tmp_path / 'hub'))

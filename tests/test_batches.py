"""The rows of a batch (losses.py) and the order of the pairs (data.py): rows by hand (padded, packed, a pair sharing its prompt), log-prob sums against a
token-by-token loop, padding fractions, and the loader's order, shards and exact resume."""

import json

import numpy as np
import pytest
import torch

from common import UserError
import losses
import bench
from data import PairLoader
from losses import eval_batches
from data import EOT_TOKEN, PairData, encode, load_dataset, tokenize_pairs
from test_data import write_jsonl


def test_rows_and_targets_by_hand():
    p = np.array([5, 6, 7])
    batch = losses.pad_rows([(p, np.array([8, 9, EOT_TOKEN])), (p[:1], np.array([4, EOT_TOKEN]))])
    assert batch.idx.tolist() == [[5, 6, 7, 8, 9], [5, 4, EOT_TOKEN, EOT_TOKEN, EOT_TOKEN]]
    assert batch.targets.tolist() == [[-1, -1, 8, 9, EOT_TOKEN], [4, EOT_TOKEN, -1, -1, -1]]
    assert batch.segments.tolist() == [[0, 0, 0, 0, 0], [1, 1, -1, -1, -1]]
    assert batch.position_ids is None and batch.attn_mask is None and batch.lengths.tolist() == [5, 2]
    assert batch.flops_shape() == (7, 5, (25 + 4) / 7)  # tokens, targets, sum(length^2) / tokens


def test_packed_rows_by_hand():
    """Sequences of 4, 2, 3 and 1 tokens in rows of 4 (the longest), first-fit decreasing: [0], [2, 3], [1]."""
    rows = [(np.array([1, 2]), np.array([3, 4, 5])), (np.array([6]), np.array([7, 8])),
            (np.array([9, 10]), np.array([11, 12])), (np.array([13]), np.array([14]))]
    assert losses.pack_bins([4, 2, 3, 1]) == [[0], [2, 3], [1]]
    batch = losses.pack_sequences(rows)
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
    pairs = PairData({'prompt_tokens': np.array([1, 2, 3]), 'prompt_offsets': np.array([0, 3]),
                           'chosen_tokens': np.array([4, 5]), 'chosen_offsets': np.array([0, 2]),
                           'rejected_tokens': np.array([6, 7, 8]), 'rejected_offsets': np.array([0, 3])}, {})
    batch = losses.dpo_batch(pairs, [0], pack=True)
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
    padded = losses.dpo_batch(pairs, [0])  # the same pair as two padded rows: 2 + 3 = 5 prompt tokens more
    assert padded.idx.shape == (2, 5) and padded.flops_shape()[0] == 4 + 5


def test_padding_fraction_of_packed_batches():
    pairs = tokenize_pairs([{'prompt': 'a b c d e f g h', 'chosen': ' x', 'rejected': ' y z w v u t s r q p'},
                                 {'prompt': 'a', 'chosen': ' b', 'rejected': ' c'}], 64, 32)
    batch = [np.array([0, 1])]
    for pack in (False, True):
        b = losses.dpo_batch(pairs, batch[0], pack)
        assert bench.dpo_padding(pairs, batch, pack) == pytest.approx(1 - b.lengths.sum() / b.idx.numel())
    assert bench.dpo_padding(pairs, batch, True) < bench.dpo_padding(pairs, batch, False)


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
    idx, targets = losses.dpo_batch(pairs, [0, 1])[:2]
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


def test_sft_batch_is_prompt_plus_chosen():
    pairs = tokenize_pairs([{'prompt': 'a', 'chosen': ' b c', 'rejected': ' d', 'where': 'x'}], 64, 32)
    idx, targets = losses.sft_batch(pairs, [0])[:2]
    assert idx[0].tolist() == encode('a') + encode(' b c')
    assert targets[0].tolist() == [-1] * (len(encode('a')) - 1) + encode(' b c') + [EOT_TOKEN]


# ---------------------------------------------------------------- order, shards, resume

@pytest.mark.parametrize('world_size,accumulation', [(1, 1), (2, 1), (3, 1), (2, 3)])
@pytest.mark.parametrize('n,group', [(12, False), (13, False), (13, True)])
def test_shards_are_disjoint_and_complete(world_size, accumulation, n, group):
    lengths = np.random.default_rng(0).integers(5, 50, n)
    per_rank = [PairLoader(lengths, 2, seed=3, rank=r, world_size=world_size, accumulation=accumulation,
                           group_by_length=group).epoch_batches(0) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of micro-steps
    assert all(len(b) == 2 for batches in per_rank for b in batches)  # every micro-batch full
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert set(seen.tolist()) == set(range(n))  # complete
    assert len(seen) == n + (-n) % (2 * world_size * accumulation)  # disjoint, but for the repeats that fill the last step


def layout(lengths, world_size, accumulation, epochs=1, **kwargs):
    """Each optimizer step's micro-batches as (rank, micro-step) -> sorted pair indices, over epochs."""
    per_rank = [PairLoader(lengths, 2, seed=5, rank=r, world_size=world_size, accumulation=accumulation,
                           **kwargs) for r in range(world_size)]
    steps = []
    for _ in range(epochs * len(per_rank[0].epoch_batches(0)) // accumulation):
        micro = [[next(loader) for _ in range(accumulation)] for loader in per_rank]
        steps.append([sorted(micro[r][m].tolist()) for m in range(accumulation) for r in range(world_size)])
    return steps


@pytest.mark.parametrize('group', [False, True])
def test_a_steps_pairs_do_not_depend_on_the_layout(group):
    """4 ranks, 2 ranks accumulating 2, 1 rank accumulating 4: the same pairs each step, over two
    epochs, even in the same micro-batches (slot m * ranks + r), with grouping by length or without."""
    lengths = np.random.default_rng(1).integers(5, 50, 70)  # not a whole number of 8-pair steps
    four, two, one = (layout(lengths, w, k, epochs=2, group_by_length=group) for w, k in ((4, 1), (2, 2), (1, 4)))
    assert four == two == one and len(one) == 2 * 9


def test_grouping_makes_a_micro_batch_alike_and_leaves_a_step_mixed():
    """Grouped by length, a micro-batch's pairs have nearly one length (less padding), but a step of
    16 micro-batches spans most of the lengths there are, as without grouping (measured: 0.4 and
    410 tokens of 463): a step is not all short or all long pairs."""
    lengths = np.random.default_rng(0).integers(50, 513, 4000)
    batches = PairLoader(lengths, 4, seed=0, accumulation=16, group_by_length=True).epoch_batches(0)
    steps = [np.concatenate(batches[i:i + 16]) for i in range(0, len(batches), 16)]
    assert np.mean([np.ptp(lengths[b]) for b in batches]) < 5
    assert np.mean([np.ptp(lengths[step]) for step in steps]) > 300


def test_a_run_resumes_on_another_layout_where_it_stopped():
    """Stopped after 3 steps on 4 ranks, resumed on 2 ranks with twice the accumulation (state from
    rank 0, as a checkpoint holds it): the same pairs follow, none skipped, none repeated."""
    lengths = np.random.default_rng(2).integers(5, 50, 40)
    expected = layout(lengths, 1, 4, epochs=2, group_by_length=True)  # 5 steps an epoch
    first = [PairLoader(lengths, 2, seed=5, rank=r, world_size=4, group_by_length=True) for r in range(4)]
    got = [[sorted(next(loader).tolist()) for loader in first] for _ in range(7)]  # into the second epoch
    state = json.loads(json.dumps(first[0].state_dict()))
    resumed = [PairLoader(lengths, 2, seed=5, rank=r, world_size=2, accumulation=2, group_by_length=True) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    for _ in range(3):
        micro = [[next(loader) for _ in range(2)] for loader in resumed]
        got.append([sorted(micro[r][m].tolist()) for m in range(2) for r in range(2)])
    assert got == expected
    with pytest.raises(UserError, match=r"the run took 8 pairs a step in micro-batches of 2, this one would take 4 "
                                          r"in micro-batches of 2 \(batch_size x gradient_accumulation_steps 1 x 2 "
                                          r"rank\(s\)\).*\(here: --batch_size=2 --gradient_accumulation_steps=2\)"):
        PairLoader(lengths, 2, world_size=2).load_state_dict(state)
    with pytest.raises(UserError, match=r"in micro-batches of 2, this one would take 8 in micro-batches of 4"):
        PairLoader(lengths, 4, world_size=2).load_state_dict(state)  # the same pairs a step, other micro-batches
    with pytest.raises(UserError, match=r"^the run trained on 40 examples and this data has 30: the data changed"):
        PairLoader(lengths[:30], 2, seed=5, world_size=4).load_state_dict(state)  # a smaller file at the same path


@pytest.mark.parametrize('world_size,n', [(1, 7), (2, 13), (3, 13), (4, 9), (5, 3)])
def test_uneven_shards_hold_every_pair_once(world_size, n):
    """Evaluation's loader (even=False): each pair exactly once over all ranks, no empty batch."""
    per_rank = [PairLoader(np.arange(n), 2, rank=r, world_size=world_size, shuffle=False, even=False).epoch_batches(0)
                for r in range(world_size)]
    assert all(len(b) for batches in per_rank for b in batches)
    seen = [i for batches in per_rank for b in batches for i in b.tolist()]
    assert sorted(seen) == list(range(n))


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
    pairs = tokenize_pairs([{'prompt': 'p ' * (i % 37), 'chosen': ' c' * (i % 11 + 1), 'rejected': ' r',
                                  'where': str(i)} for i in range(400)], 512, 256)
    plain, grouped = (bench.dpo_padding(pairs, PairLoader(pairs.pair_lengths(), 16, group_by_length=g).epoch_batches(0))
                      for g in (False, True))
    assert grouped < plain
    one_batch = bench.dpo_padding(pairs, [np.array([0, 1])])  # by hand from the rows' lengths
    rows = [len(pairs.get('prompt', i)) + len(pairs.get(f, i)) - 1 for f in ('chosen', 'rejected') for i in (0, 1)]
    assert one_batch == pytest.approx(1 - sum(rows) / (4 * max(rows)))


@pytest.mark.parametrize('limit', [-1, 3, 5])
def test_held_out_batches_are_the_same_on_any_layout(limit):
    """eval_iters counts batches over all ranks: 1, 2 or 3 ranks evaluate exactly the batches one
    process does (here 23 examples, batches of 4: the last holds 3), each once; FSDP's same_count
    tops a short rank up with uncounted batches to rank 0's number."""
    one = [b.tolist() for b, _ in eval_batches(23, 4, limit=limit)]
    assert len(one) == (6 if limit == -1 else limit) and one[0] == [0, 1, 2, 3]
    for world_size in (2, 3):
        shares = [eval_batches(23, 4, r, world_size, limit, same_count=True) for r in range(world_size)]
        counted = sorted(b.tolist() for share in shares for b, c in share if c)
        assert counted == sorted(one)
        assert len({len(share) for share in shares}) == 1  # every rank runs as many forwards

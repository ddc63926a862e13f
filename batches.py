"""
Batches: which pairs each step takes (PairLoader: seeded order, DDP shards, length grouping, exact
resume), and the rows of token ids a forward pass runs over (Batch: one padded sequence a row, or
packed units with a block-diagonal causal mask).

Conventions: a target of -1 means "no loss here" (prompt, padding); a sequence's log-prob is the
sum over its targets, which is exactly log p(response | prompt), its <|endoftext|> included (unless
truncation cut the response's end, and with it the <|endoftext|>).
"""

from typing import NamedTuple

import numpy as np
import torch

from common import UserError
from model import EOT_TOKEN


class Batch(NamedTuple):
    """Rows for one forward pass over n response sequences, padded or packed.

    idx, targets: (R, T) int64; targets are the next tokens, -1 on prompts and padding, so summing a
    sequence's log-probs over its targets gives exactly log p(response | prompt).
    position_ids, attn_mask: None for padded rows (one sequence a row from position 0: plain
    causal attention); for packed rows (R, T) positions and a (R, 1, T, T) causal mask that lets a
    token see only its own unit (below).
    segments: (R, T) which of the n sequences each cell belongs to (prompt cells included), -1 on
    padding.
    lengths: numpy, the tokens of each unit: a unit is a sequence without its last token, or, packed
    for DPO, a pair: its prompt once, then both responses, each seeing the prompt but not the other.
    """
    idx: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor | None
    attn_mask: torch.Tensor | None
    segments: torch.Tensor
    lengths: np.ndarray
    n: int

    def to(self, device):
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(*(move(t) for t in self[:5]), self.lengths, self.n)

    def sequence_sums(self, values):
        """(n,) sums of (R, T) per-cell values over each sequence's cells. Padding cells go to
        sequence 0: the values summed here (log-probs, target counts) are exactly 0 there."""
        out = values.new_zeros(self.n)
        return out.index_add_(0, self.segments.clamp(min=0).flatten(), values.flatten())  # (n,)

    def response_lengths(self):
        """(n,) float: each sequence's tokens with a target: its response's, <|endoftext|> included."""
        return self.sequence_sums((self.targets != -1).float())

    def flops_shape(self):
        """(tokens, tokens with a target, attended length) for GPT.flops, padding not counted:
        attention is counted as sum(unit lengths^2) = tokens * attended length (for a pair's unit a
        little more than it needs: a response does not look at the other one)."""
        tokens = int(self.lengths.sum())
        return tokens, int((self.targets != -1).sum()), float((self.lengths ** 2).sum() / tokens)


def pad_rows(rows):
    """A Batch of the (prompt, response) token arrays rows, one a row, padded at the end to the
    longest (the DPO paper's padded batch): row n holds prompt + response without its last token, and as
    targets the next tokens, -1 on the prompt (but for its last token, which predicts the response's
    first) and on the padding."""
    lengths = np.array([len(p) + len(r) - 1 for p, r in rows], dtype=np.int64)  # each row's cells
    R, T = len(rows), lengths.max()
    idx = np.full((R, T), EOT_TOKEN, dtype=np.int64)  # padding ids: any valid token
    targets, segments = np.full((R, T), -1, dtype=np.int64), np.full((R, T), -1, dtype=np.int64)
    for n, (prompt, response) in enumerate(rows):
        L = lengths[n]
        idx[n, :L] = np.concatenate([prompt, response])[:-1]
        targets[n, len(prompt) - 1:L] = response  # position t predicts token t + 1
        segments[n, :L] = n
    return Batch(torch.from_numpy(idx), torch.from_numpy(targets), None, None,
                 torch.from_numpy(segments), lengths, R)


def dpo_batch(data, indices, pack=False):
    """A Batch of 2B sequences for B pairs: the B chosen sequences (0..B-1), then the B rejected
    (B..2B-1), so that one forward pass serves both. Padded: one sequence a row. Packed (pack_pairs,
    below): each pair a unit with its prompt once, several units a row."""
    if pack:
        return pack_pairs([(data.get('prompt', i), data.get('chosen', i), data.get('rejected', i))
                           for i in indices])
    return pad_rows([(data.get('prompt', i), data.get(field, i))
                     for field in ('chosen', 'rejected') for i in indices])


def sft_batch(data, indices, pack=False):
    """A Batch of B sequences: prompt + chosen response, loss on the response only."""
    rows = [(data.get('prompt', i), data.get('chosen', i)) for i in indices]
    return pack_sequences(rows) if pack else pad_rows(rows)


def kto_batch(data, indices, max_length, pack=False):
    """Two Batches of B unpaired rows each: the rows (prompt i, completion i), and the mismatched
    rows that KTO's KL reference point is estimated from: prompt i with the completion of the
    batch's row i - 1 (row 0 with the last one's), as TRL's KTOTrainer pairs them, cut to fit
    max_length. Where that row has the same prompt (a pair's two rows side by side, as unpair()
    lays them out and evaluation reads them), the nearest row before it with another prompt: a
    completion of its own prompt would measure no KL at all."""
    prompts = [data.get('prompt', i) for i in indices]
    completions = [data.get('completion', i) for i in indices]
    B = len(indices)

    def other_prompt(n):  # the nearest row before n, cyclically, whose prompt is not n's (else n - 1)
        return next((m for m in ((n - s) % B for s in range(1, B))
                     if not np.array_equal(prompts[m], prompts[n])), (n - 1) % B)
    mismatched = [(prompts[n], completions[other_prompt(n)][:max_length - len(prompts[n])])
                  for n in range(B)]
    make = pack_sequences if pack else pad_rows
    return make(list(zip(prompts, completions))), make(mismatched)


class PairLoader:
    """The pairs of this rank's next micro-batch, micro-batch after micro-batch, epoch after epoch.

    An epoch's order depends only on (seed, epoch), batch_size and the pairs a step takes, never on
    how a step is split between ranks and micro-steps, so a run resumes on another layout. The order
    is padded (its first pairs repeated) to whole steps, so that every micro-batch is full; even=False
    leaves the repeats out (evaluation). group_by_length: micro-batches of pairs of similar length
    (less padding), shuffled, so a step holds any. state_dict() continues at the next micro-batch.
    """

    def __init__(self, lengths, batch_size, seed=0, rank=0, world_size=1, accumulation=1,
                 shuffle=True, group_by_length=False, even=True):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.accumulation, self.shuffle, self.even = accumulation, shuffle, even
        self.group_by_length = group_by_length
        self.pairs_per_step = batch_size * world_size * accumulation
        self.epoch, self.taken, self._batches = 0, 0, None  # taken: this rank's, this epoch

    def epoch_batches(self, epoch):
        """This rank's micro-batches of one epoch: a list of arrays of pair indices."""
        n, S = len(self.lengths), self.pairs_per_step
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.even:
            order = np.resize(order, n + (-n) % S)  # the first pairs repeated up to whole steps
        if self.group_by_length:
            window = S * 64
            order = np.concatenate([w[np.argsort(-self.lengths[w], kind='stable')]
                                    for w in np.split(order, range(window, len(order), window))])
        slots = np.split(order, range(self.batch_size, len(order), self.batch_size))
        if self.group_by_length and self.shuffle:
            slots = [slots[i] for i in rng.permutation(len(slots))]
        return slots[self.rank::self.world_size]  # slot t * world_size + rank: its micro-step t

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = self.epoch_batches(self.epoch)
        if self.taken == len(self._batches):
            self.epoch, self.taken = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        self.taken += 1
        return self._batches[self.taken - 1]

    def state_dict(self):
        return {'epoch': self.epoch, 'pairs': self.taken * self.batch_size * self.world_size,
                'pairs_per_step': self.pairs_per_step, 'batch_size': self.batch_size}

    def load_state_dict(self, state):
        if 'pairs' not in state:
            raise UserError("the checkpoint's data order is an older version's, which this one cannot "
                            "continue exactly: start a new run from its weights instead")
        if (state['pairs_per_step'], state['batch_size']) != (self.pairs_per_step, self.batch_size):
            accumulation, rest = divmod(state['pairs_per_step'], state['batch_size'] * self.world_size)
            here = ('' if rest or not accumulation else
                    f" (here: --batch_size={state['batch_size']} "
                    f"--gradient_accumulation_steps={accumulation})")
            raise UserError(
                f"the run took {state['pairs_per_step']} pairs a step in micro-batches of "
                f"{state['batch_size']}, this one would take {self.pairs_per_step} in micro-batches "
                f"of {self.batch_size} (batch_size x gradient_accumulation_steps {self.accumulation} "
                f"x {self.world_size} rank(s)): the order of the pairs depends on both, so keep them "
                f"when you resume{here}")
        self.epoch, self._batches = state['epoch'], None
        self.taken = state['pairs'] // (self.batch_size * self.world_size)
        # on the same layout each rank goes on where it stopped (checkpoint.loader_state): online
        # DPO's ranks draw as many batches as their samples need
        if len(state.get('ranks', [])) == self.world_size:
            self.epoch, self.taken = state['ranks'][self.rank]


def eval_batches(n, batch_size, rank=0, world_size=1, limit=-1, same_count=False):
    """Evaluation's batches on this rank, as (indices, counted): each of n held-out examples once
    over all ranks, in order (PairLoader's even=False), the first limit batches of each rank (-1:
    all). same_count, for FSDP, where each forward gathers the weights with every rank: as many
    batches as rank 0 has (it has the most), the missing ones rank 0's first, run but not counted."""
    def batches(r):
        loader = PairLoader(np.zeros(n), batch_size, rank=r, world_size=world_size, shuffle=False,
                            even=False)
        return loader.epoch_batches(0)[:limit if limit > 0 else None]
    mine = [(indices, True) for indices in batches(rank)]
    if not same_count:
        return mine
    most = batches(0)
    return mine + [(most[0], False)] * (len(most) - len(mine))


# -------------------------------------------------------------------- packing (pack=True)
# Several sequences share a row, each seeing only itself under a block-diagonal causal mask, with
# positions counted from its own start: the same log-probs and gradients as padded rows (tested),
# with less padding, and for DPO each prompt once instead of twice.

def sequence_unit(prompt, response, n):
    """A (prompt, response) sequence as one unit: the sequence without its last token, the
    response as targets of sequence n. Returns (idx, targets, positions, segments, branches), each (L,)."""
    L = len(prompt) + len(response) - 1
    targets = np.full(L, -1, dtype=np.int64)
    targets[len(prompt) - 1:] = response  # position t predicts token t + 1
    return (np.concatenate([prompt, response])[:-1], targets, np.arange(L), np.full(L, n),
            np.zeros(L, dtype=np.int64))


def pair_unit(prompt, chosen, rejected, n_chosen, n_rejected):
    """A pair as one unit with its prompt once: prompt[:-1], then the prompt's last token followed
    by each response (its targets those of sequence n_chosen, n_rejected), both at the positions they
    have after the prompt. Branch 0 (the prompt) is seen by all; branches 1 and 2 only by
    themselves."""
    P = len(prompt)
    parts = [(prompt[:-1], np.full(P - 1, -1), np.arange(P - 1), np.full(P - 1, n_chosen),
              np.zeros(P - 1, dtype=np.int64))]
    for response, n, branch in ((chosen, n_chosen, 1), (rejected, n_rejected, 2)):
        L = len(response)
        parts.append((np.concatenate([prompt[-1:], response[:-1]]), response,
                      np.arange(P - 1, P - 1 + L),
                      np.full(L, n), np.full(L, branch)))
    # (idx, targets, positions, segments, branches)
    return tuple(np.concatenate(column) for column in zip(*parts))


def pack_bins(lengths):
    """Units of these lengths in rows as long as the longest, first-fit decreasing: a list of rows,
    each a list of unit numbers. Rows no longer than the padded ones keep attention's T^2 cost."""
    capacity, rows, room = max(lengths), [], []
    for n in sorted(range(len(lengths)), key=lambda n: -lengths[n]):
        fit = next((r for r in range(len(rows)) if room[r] >= lengths[n]), None)
        if fit is None:
            rows.append([]), room.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(n)
        room[fit] -= lengths[n]
    return rows


def pack_units(units, n):
    """A Batch of n sequences from units (sequence_unit, pair_unit): as many units a row as fit in
    the longest's length (pack_bins), the rest of a row padding."""
    lengths = np.array([len(u[0]) for u in units], dtype=np.int64)
    bins = pack_bins(lengths)
    T = max(lengths)
    idx = np.full((len(bins), T), EOT_TOKEN, dtype=np.int64)  # padding ids: any valid token
    targets, segments, owner = (np.full((len(bins), T), -1, dtype=np.int64) for _ in range(3))
    positions, branches = (np.zeros((len(bins), T), dtype=np.int64) for _ in range(2))
    for row, members in enumerate(bins):
        start = 0
        for u in members:
            end = start + lengths[u]
            idx[row, start:end], targets[row, start:end], positions[row, start:end], segments[row, start:end], \
                branches[row, start:end] = units[u]
            owner[row, start:end] = u
            start = end
    position_ids, owner, branches = (torch.from_numpy(a) for a in (positions, owner, branches))
    same_unit = owner[:, :, None] == owner[:, None, :]  # (R, T, T): query, key
    # a key in the shared branch (the prompt), or in the query's own
    visible = (branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn_mask = (same_unit & visible & causal)[:, None]  # (R, 1, T, T)
    return Batch(torch.from_numpy(idx), torch.from_numpy(targets), position_ids, attn_mask,
                 torch.from_numpy(segments),
                 lengths, n)


def pack_sequences(rows):
    """pad_rows' Batch, packed: each (prompt, response) row a unit, several units a row."""
    return pack_units([sequence_unit(p, r, n) for n, (p, r) in enumerate(rows)], len(rows))


def pack_pairs(pairs):
    """dpo_batch's Batch, packed: each (prompt, chosen, rejected) pair a unit with its prompt once
    (about a third fewer tokens at HH's lengths), chosen as sequence n, rejected as sequence B + n."""
    B = len(pairs)
    return pack_units([pair_unit(p, c, r, n, B + n) for n, (p, c, r) in enumerate(pairs)], 2 * B)


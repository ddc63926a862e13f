"""
From a batch of pairs to its loss: the rows of token ids a forward pass runs over (Batch: one
padded sequence a row, or packed units under a block-diagonal causal mask), their log-probs, and
the losses built on them: SFT's negative log-likelihood, the DPO family's preference_loss and KTO's
kto_loss, with the step functions that sft.py and dpo.py train with and tools/bench.py times.
Settings come in as arguments, never from a script's globals. DPO's path comes first (the batch,
its log-probs and losses, the held-out means); SFT, KTO and the scoring of samples after it, then
the reference's log-probs computed once (precompute_ref_logps), then packing.

Each step returns its metrics as totals, (M, 2): per metric, the sum of its values and how many
there were, so that micro-batches and ranks add up before one division (means) gives exact means.

Conventions: a target of -1 means "no loss here" (prompt, padding), so summing a sequence's
per-token log-probs gives exactly log p(response | prompt), <|endoftext|> included (unless
truncation cut the response's end, and with it the <|endoftext|>); a response's log-prob is the sum
over its tokens (as in the DPO paper); SimPO and RPO divide by its length where their papers do.
"""

import os
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import atomic_open, write_failure
from data import CACHE_ELSEWHERE, PairLoader
from model import EOT_TOKEN

LOSS_TYPES = ('sigmoid', 'ipo', 'hinge', 'simpo')
DPO_METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/margins',
               'rewards/accuracies', 'logps/chosen', 'logps/rejected')
# TRL's names; 'loss' is the one trained on (with rpo_alpha, the NLL term included)
KTO_METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'kl', 'logps/chosen', 'logps/rejected')
SFT_METRICS = ('loss', 'logps/chosen')  # NLL per response token; log-prob per chosen response
ONLINE_METRICS = ('online/score', 'online/ties')  # the judge's mean score; tied prompts' share
METRICS = {'sft': SFT_METRICS, 'dpo': DPO_METRICS, 'kto': KTO_METRICS, 'online': ONLINE_METRICS}


# -------------------------------------------------------------------- the rows of a batch

class Batch(NamedTuple):
    """Rows for one forward pass over n response sequences: padded, sequence i in row i, or packed,
    several a row (the last section, packing).

    idx, targets: (R, T) int64; targets are the next tokens, -1 on prompts and padding, so summing a
    sequence's log-probs over its targets gives exactly log p(response | prompt).
    segments: (R, T) the sequence each cell belongs to, prompt included; -1 on padding.
    lengths: numpy, the tokens the forward runs for each unit, padding not counted. Padded, a unit
    is a row: prompt + response less its last token (which predicts nothing). Packed for DPO, a
    unit is a pair: its prompt once, then both responses.
    position_ids, attn_mask: None for padded rows (causal attention from position 0); packed, the
    positions and the block-diagonal mask (R, 1, T, T) of the units.
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


# -------------------------------------------------------------------- log-probs and losses

def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta, loss_type='sigmoid', label_smoothing=0.0,
                    rpo_alpha=0.0, simpo_gamma=0.5, chosen_lengths=None, rejected_lengths=None):
    """The DPO loss and its variants for B pairs.

    *_logps: (B,) log-probabilities of each response, summed over its tokens, under the policy and
    the reference (simpo ignores the reference). *_lengths: (B,) tokens of each response, for simpo
    and rpo_alpha. Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are
    detached from the graph: they are for logging.
    """
    if loss_type == 'simpo':  # reference-free: the reward is the length-normalised log-prob
        chosen_rewards = beta * policy_chosen_logps / chosen_lengths
        rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    else:  # the paper's implicit reward, beta * log(pi(y|x) / pi_ref(y|x))
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards  # (B,)
    if loss_type == 'sigmoid':  # DPO; label smoothing makes it conservative DPO
        losses = (-(1 - label_smoothing) * F.logsigmoid(margins)
                  - label_smoothing * F.logsigmoid(-margins))
    elif loss_type == 'ipo':  # IPO (Azar et al.): the log-ratio margin regressed onto 1 / (2 beta)
        losses = (margins / beta - 1 / (2 * beta)) ** 2
    elif loss_type == 'hinge':  # SLiC (Zhao et al.)
        losses = torch.relu(1 - margins)
    elif loss_type == 'simpo':  # SimPO (Meng et al.): a target margin gamma
        losses = -F.logsigmoid(margins - simpo_gamma)
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if rpo_alpha:  # RPO (Pang et al.): plus the chosen response's negative log-likelihood per token
        losses = losses + rpo_alpha * -policy_chosen_logps / chosen_lengths
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def batch_logps(model, batch):
    """One forward over a batch's sequences (padded or packed): (n,) summed response log-probs."""
    # (R, T) log-probs of the targets, 0 off the responses
    logps = model(batch.idx, batch.targets, batch.position_ids, batch.attn_mask)
    return batch.sequence_sums(logps)


def chosen_rejected_logps(model, batch):
    """One forward over a batch of 2B sequences: summed response log-probs, (B,) chosen, (B,) rejected."""
    return batch_logps(model, batch).chunk(2)


def metric_totals(*parts):
    """(M, 2) float32 from M (values, mask) parts: the sum of the values where mask holds (all of
    them when mask is None), and how many those are."""
    rows = []
    for values, mask in parts:
        values = values.detach().float()
        mask = torch.ones_like(values) if mask is None else mask.float()
        rows.append(torch.stack([(values * mask).sum(), mask.sum()]))
    return torch.stack(rows)


def means(names, totals, prefix=''):
    """{prefix + name: mean} from totals (M, 2) added up over micro-batches and ranks; a metric with
    nothing counted (no undesirable row in a KTO step, say) is left out, not logged as NaN."""
    return {prefix + name: s / n for name, (s, n) in zip(names, totals.tolist()) if n > 0}


def dpo_totals(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """totals of DPO_METRICS over B pairs. Accuracy counts a tie as one half, so it starts at 0.5
    when the policy is the reference."""
    accuracies = ((chosen_rewards > rejected_rewards).float()
                  + 0.5 * (chosen_rewards == rejected_rewards).float())
    parts = (losses, chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
             accuracies, chosen_logps, rejected_logps)  # in DPO_METRICS' order
    return metric_totals(*((p, None) for p in parts))  # (len(DPO_METRICS), 2)


def dpo_step(policy, ref, batch, ref_logps=None, autocast=nullcontext(), **loss_settings):
    """Losses (B,) and the totals of DPO_METRICS over a batch of B pairs: the policy's forward over
    chosen and rejected together, the reference's under no_grad, or its precomputed log-probs
    ref_logps (B, 2), or neither (ref and ref_logps None) for simpo, which has no reference.
    loss_settings: preference_loss's beta, loss_type, label_smoothing, ..."""
    with autocast:
        chosen_logps, rejected_logps = chosen_rejected_logps(policy, batch)
        ref_chosen = ref_rejected = None  # reference-free (simpo)
        if ref_logps is not None:
            ref_chosen, ref_rejected = ref_logps.unbind(1)
        elif ref is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected = chosen_rejected_logps(ref, batch)
        elif loss_settings.get('loss_type') != 'simpo':
            raise ValueError(f"loss_type={loss_settings.get('loss_type', 'sigmoid')!r} needs the "
                             "reference or its log-probs")
        chosen_lengths, rejected_lengths = batch.response_lengths().chunk(2)  # (B,) each
        losses, chosen_rewards, rejected_rewards = preference_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, **loss_settings)
    return losses, dpo_totals(losses, chosen_rewards, rejected_rewards, chosen_logps,
                              rejected_logps)


# -------------------------------------------------------------------- the held-out means

@torch.no_grad()
def held_out_means(model, totals_of, names, n, batch_size, eval_iters, run, same_count=False):
    """{'eval/' + name: mean} over the first eval_iters batches (-1: all) of the n held-out
    examples, shared out over the ranks (the same on any layout), summed over them;
    totals_of(indices) gives a batch's (M, 2) totals.
    same_count (FSDP, whose every forward all ranks join): a rank short of batches runs more,
    not counted."""
    model.eval()
    totals = torch.zeros(len(names), 2, device=run.device)  # (sum, count) of each metric
    batches = eval_batches(n, batch_size, run.rank, run.world_size, eval_iters, same_count)
    for indices, counted in batches:
        batch_totals = totals_of(indices)
        totals += batch_totals if counted else 0
    model.train()
    return means(names, run.sum(totals), prefix='eval/')


def eval_batches(n, batch_size, rank=0, world_size=1, limit=-1, same_count=False):
    """Evaluation's batches on this rank, as (indices, counted): the n held-out examples in order,
    in batches of batch_size (PairLoader's even=False), the first limit of them (-1: all) shared
    out over the ranks, batch t to rank t % world_size. So every layout evaluates the same examples
    in the same batches. same_count, for FSDP, where each forward gathers the weights with every
    rank: as many batches as rank 0 has (it has the most), the missing ones filled with the first
    batch, run but not counted."""
    in_order = PairLoader(np.zeros(n), batch_size, shuffle=False, even=False).epoch_batches(0)
    evaluated = in_order[:limit if limit > 0 else None]
    mine = [(indices, True) for indices in evaluated[rank::world_size]]
    if not same_count:
        return mine
    return mine + [(evaluated[0], False)] * (len(evaluated[0::world_size]) - len(mine))


# -------------------------------------------------------------------- SFT, KTO, and scoring samples

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


def kto_loss(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, desirable, beta,
             desirable_weight=1.0, undesirable_weight=1.0, rpo_alpha=0.0, lengths=None):
    """KTO's loss (Ethayarajh et al., 2024, eq. 7) for B unpaired rows.

    *_logps: (B,) summed log-probs of each row's completion; *_kl_logps: (B,) of the mismatched rows
    (a prompt with another row's completion); desirable: (B,) bool, the labels. The reference point
    z is the batch's KL estimate, mean(policy_kl_logps - ref_kl_logps), detached and clamped at 0: a
    desirable completion gains by rising above it, an undesirable one by falling below it.
    rpo_alpha > 0 adds, as RPO does to DPO, rpo_alpha times a desirable completion's NLL per token
    (lengths: (B,) its tokens). Returns (losses (B,), rewards (B,) beta * log-ratio, detached, z).
    """
    log_ratios = policy_logps - ref_logps  # (B,) r = log pi(y|x) - log pi_ref(y|x)
    z = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (log_ratios - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - log_ratios))))
    if rpo_alpha:
        losses = losses + torch.where(desirable, rpo_alpha * -policy_logps / lengths, 0.0)
    return losses, beta * log_ratios.detach(), z


def kto_step(policy, ref, batch, kl_batch, desirable, autocast=nullcontext(), beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0, rpo_alpha=0.0):
    """Losses (B,) and the totals of KTO_METRICS over B unpaired rows: batch and kl_batch are
    kto_batch's (the rows, and the mismatched rows), desirable (B,) bool their labels. Only
    the rows' forward keeps a graph: z, from the mismatched rows, is detached anyway."""
    with autocast:
        logps = batch_logps(policy, batch)  # (B,)
        with torch.no_grad():  # each (B,)
            kl_logps = batch_logps(policy, kl_batch)  # the policy's, of the mismatched rows: for z
            ref_logps = batch_logps(ref, batch)  # the reference's, of the rows: for the rewards
            ref_kl_logps = batch_logps(ref, kl_batch)  # and of the mismatched rows: for z
        lengths = batch.response_lengths()  # (B,)
        losses, rewards, z = kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, desirable, beta,
                                      desirable_weight, undesirable_weight, rpo_alpha, lengths)
    # in KTO_METRICS' order: the rewards and log-probs of desirable rows are "chosen", the others'
    # "rejected"
    return losses, metric_totals((losses, None), (rewards, desirable), (rewards, ~desirable), (z, None),
                          (logps, desirable), (logps, ~desirable))


def sft_step(model, batch, autocast=nullcontext()):
    """The loss (mean NLL over the batch's response tokens) and the totals of SFT_METRICS: the NLL
    over response tokens, the log-prob over sequences."""
    has_target = batch.targets != -1
    with autocast:
        # (R, T) log-probs of the targets, 0 off the responses
        logps = model(batch.idx, batch.targets, batch.position_ids, batch.attn_mask)
        loss = -logps.sum() / has_target.sum()
    return loss, metric_totals((-logps, has_target), (batch.sequence_sums(logps.detach().float()), None))


@torch.no_grad()
def sequence_logps(model, prompt_ids, responses, ctx=nullcontext(), rows_per_batch=128):
    """log p(response | prompt) summed over each response's tokens, as a numpy array: for scoring
    sampled responses (token lists) to prompts (token lists)."""
    device, out = model.lm_head.weight.device, []
    for i in range(0, len(responses), rows_per_batch):
        part = slice(i, i + rows_per_batch)
        rows = [(np.array(p), np.array(r)) for p, r in zip(prompt_ids[part], responses[part])]
        batch = pad_rows(rows).to(device)
        with ctx:
            out.append(batch.sequence_sums(model(batch.idx, batch.targets)).float().cpu())
    return torch.cat(out).numpy()


# -------------------------------------------------------------------- the reference once
# (precompute_ref_logps=True)

@torch.no_grad()
def reference_logps(ref, ref_sha256, data, batch_size, pack, run):
    """(N, 2) float32: the reference's summed log-probs of each pair's chosen and rejected response,
    computed once (each rank its share) and cached next to the token cache on every node, keyed by
    the reference's weights (ref_sha256) and the dtype; a rank without the file joins the others."""
    path = f"{data.path[:-len('.npz')]}-ref-{ref_sha256[:12]}-{run.dtype}.npy"
    out = cached_logps(path, len(data))
    cached = torch.tensor([float(out is not None)], device=run.device)
    if run.sum(cached, 'whether the reference log-probs are cached').item() == run.world_size:
        return out
    shares = PairLoader(np.zeros(len(data)), batch_size, rank=run.rank, world_size=run.world_size,
                        shuffle=False).epoch_batches(0)
    indices = torch.from_numpy(np.concatenate(shares)).to(run.device)
    values = []
    progress = tqdm(shares, desc="the reference's log-probs", unit=' batches', disable=not run.master)
    for share in progress:
        batch = dpo_batch(data, share, pack).to(run.device)
        with run.autocast:
            values.append(torch.stack(chosen_rejected_logps(ref, batch), dim=1).float())  # (b, 2)
    values = torch.cat(values)
    if run.ddp:  # every rank holds an equal share: gather them all
        gathered = [(torch.empty_like(indices), torch.empty_like(values))
                    for _ in range(run.world_size)]
        with run.collective("the all-gather of the reference's log-probs"):
            dist.all_gather([g[0] for g in gathered], indices)
            dist.all_gather([g[1] for g in gathered], values)
        indices, values = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    out = np.zeros((len(data), 2), dtype=np.float32)
    out[indices.cpu().numpy()] = values.cpu().numpy()
    if run.local_rank == 0:  # one copy a node
        try:
            with atomic_open(path, 'wb') as f:
                np.save(f, out)
        except OSError as e:
            raise write_failure(path, e, CACHE_ELSEWHERE) from None
    return out


def cached_logps(path, n):
    """The (n, 2) float32 log-probs cached at path; None where there is no such file, or one cut
    short or of another shape (then rebuilt, as the token cache is)."""
    try:
        values = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    return values if values.shape == (n, 2) and values.dtype == np.float32 else None


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


"""
The log-probabilities of a batch and the losses built on them: SFT's negative log-likelihood, the
DPO family's preference_loss, and KTO's kto_loss, with the step functions that sft.py and dpo.py
train with and tools/bench.py times. Settings come in as arguments, never from a script's globals.

Each step returns its metrics as totals, (M, 2): per metric, the sum of its values and how many
there were, so that micro-batches and ranks add up before one division (means) gives exact means.

Conventions: a target of -1 means "no loss here" (prompt, padding), so summing a sequence's
per-token log-probs gives exactly log p(response | prompt), <|endoftext|> included; log-probs of a
response are sums over its tokens (as in the DPO paper), never means.
"""

import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from batches import PairLoader, dpo_batch, eval_batches, pad_rows
from common import atomic_open

LOSS_TYPES = ('sigmoid', 'ipo', 'hinge', 'simpo')
DPO_METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/margins',
               'rewards/accuracies', 'logps/chosen', 'logps/rejected')
# TRL's names
KTO_METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'kl', 'logps/chosen', 'logps/rejected')
SFT_METRICS = ('loss', 'logps/chosen')  # NLL per response token; log-prob per chosen response
ONLINE_METRICS = ('online/score', 'online/ties')  # the judge's mean score; tied prompts' share
METRICS = {'sft': SFT_METRICS, 'dpo': DPO_METRICS, 'kto': KTO_METRICS, 'online': ONLINE_METRICS}


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


def batch_logps(model, batch):
    """One forward over a batch's sequences (padded or packed): (n,) summed response log-probs."""
    # (R, T) log-probs of the targets, 0 off the responses
    logps = model(batch.idx, batch.targets, batch.position_ids, batch.attn_mask)
    return batch.sequence_sums(logps)


def chosen_rejected_logps(model, batch):
    """One forward over a batch of 2B sequences: summed response log-probs, (B,) chosen, (B,) rejected."""
    return batch_logps(model, batch).chunk(2)


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


def totals(*parts):
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
    return totals(*((p, None) for p in parts))  # (len(DPO_METRICS), 2)


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


def kto_step(policy, ref, batch, kl_batch, desirable, autocast=nullcontext(), beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0, rpo_alpha=0.0):
    """Losses (B,) and the totals of KTO_METRICS over B unpaired rows: batch and kl_batch are
    batches.kto_batch's (the rows, and the mismatched rows), desirable (B,) bool their labels. Only
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
    return losses, totals((losses, None), (rewards, desirable), (rewards, ~desirable), (z, None),
                          (logps, desirable), (logps, ~desirable))


def sft_step(model, batch, autocast=nullcontext()):
    """The loss (mean NLL over the batch's response tokens) and the totals of SFT_METRICS: the NLL
    over response tokens, the log-prob over sequences."""
    has_target = batch.targets != -1
    with autocast:
        # (R, T) log-probs of the targets, 0 off the responses
        logps = model(batch.idx, batch.targets, batch.position_ids, batch.attn_mask)
        loss = -logps.sum() / has_target.sum()
    return loss, totals((-logps, has_target), (batch.sequence_sums(logps.detach().float()), None))


# ------------------------------------------------------------ held out, and the reference once

@torch.no_grad()
def held_out_means(model, totals_of, names, n, batch_size, eval_iters, run, same_count=False):
    """{'eval/' + name: mean} over the first eval_iters batches (-1: all) of the n held-out
    examples on each rank, summed over the ranks; totals_of(indices) gives a batch's (M, 2) totals.
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


@torch.no_grad()
def reference_logps(ref, ref_sha256, data, batch_size, pack, run):
    """(N, 2) float32: the reference's summed log-probs of each pair's chosen and rejected response,
    computed once (each rank its share) and cached next to the token cache on every node, keyed by
    the reference's weights (ref_sha256) and the dtype; a rank without the file joins the others."""
    path = f"{data.path[:-len('.npz')]}-ref-{ref_sha256[:12]}-{run.dtype}.npy"
    cached = torch.tensor([float(os.path.exists(path))], device=run.device)
    if run.sum(cached, 'whether the reference log-probs are cached').item() == run.world_size:
        return np.load(path)
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
        with atomic_open(path, 'wb') as f:
            np.save(f, out)
    return out

"""
Direct Preference Optimization (Rafailov et al., 2023), the second stage: a policy trained on
preference pairs against a frozen reference, usually both the SFT model.

    python dpo.py config/dpo_synthetic.py
    torchrun --standalone --nproc_per_node=8 dpo.py config/hh.py
    python dpo.py config/kto_synthetic.py     # KTO: unpaired rows, each a thumbs up or down
    python dpo.py config/online_synthetic.py  # online DPO: pairs sampled from the policy, judged

Read it top to bottom: the settings, the losses of a batch, then main(): the models, the data,
and the loop. What it calls in model.py, data.py and losses.py is the story too; what each
setting may be (RANGES and CHECKS, at the end, which configure reads) is not, and a first read
can skip it. The guard rails it calls do what their names and these lines say, so a first read
can leave their files (parallel.py, checkpoint.py, common.py, configurator.py) closed. On one
process each is the plain thing:
    configure(globals(), ...)     each config file named on the command line exec'd (its lines
                                  set these settings), then each --key=value; all checked
    parallel.start() -> run       device, dtype (run.autocast: the autocast context), torch seeded
                                  with seed + rank; run.ddp, run.rank, run.world_size, run.master
                                  (rank 0), run.device_type ('cpu', 'cuda'), run.peak_flops (MFU)
    run.sum(t, what)              t summed over the ranks (t itself on one process); what: named
                                  in the error if a rank never joins
    run.node_first()              the block on one rank of each node first (it writes the cache)
    run.stop_unless_finite(x)     UserError on every rank if x is NaN or infinite
    run.full_state(model, opt)    (model.state_dict(), opt.state_dict()) on rank 0, else None, None;
                                  tensors on the CPU (LoRA: the adapters); FSDP: gathered whole
    run.full_tensor(t)            t (under FSDP a whole tensor gathered from the shards)
    run.gather(values), rng_states  every rank's list of ints, and [torch.get_rng_state() (and
                                  CUDA's)]: rank 0's first
    run.save_on_signals, stop_signal, exit_stopped: SIGTERM/SIGINT noted, then saved, and the end
    run.raise_stopped(error, ...) error, the iteration it stopped at and how to resume, as UserError
    run.exit_together()           all ranks end together (nothing on one process)
    parallel.distribute(model)    DDP or FSDP around it under torchrun; compiled if asked
    checkpoint.claim_out_dir      make out_dir, lock it while the run lives; never write over
                                  another run (overwrite: remove it) or over a model the run reads
    checkpoint.load, restore      a resume: ckpt.pt read (its recipe checked), and put back
    checkpoint.write(ckpt, path)  torch.save to a temporary file, fsync, rename over path: a failed
                                  write (a full disk) keeps the old file and says so
    checkpoint.MetricLog          log(): a line on stdout, one in out_dir/metrics.jsonl (and wandb);
                                  describe(): the run's summary; speed(): a step's pace, MFU, ETA
"""

import os
import time
from dataclasses import asdict

import numpy as np
import torch

import checkpoint
import parallel
from common import one_line_errors
from configurator import configure
from data import PairLoader, load_dataset
from losses import (METRICS, dpo_batch, dpo_step, held_out_means, kto_batch, kto_step, means,
                    reference_logps)
from model import get_lr, load_model, load_reference
from online import load_judge, step_pairs  # (not `import online`: a setting has that name)

# -----------------------------------------------------------------------------
# the models
init_from = 'out-sft'  # the policy: an SFT out_dir, a GPT-2 name, hub id or directory, or 'resume'
ref_from = ''  # the frozen reference, as init_from; '' is the same as init_from (the usual choice)
dropout = 0.0  # the policy's while training (never the reference's); the paper's code has it off
# LoRA: low-rank adapters trained on the frozen policy; the reference is the policy, adapters off
lora_rank = 0  # the adapters' rank; 0: no LoRA, every weight trains
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc'  # the layers adapted (model.LORA_TARGETS): all, as here
# the data
dataset = 'synthetic'  # 'hh', 'jsonl' or 'synthetic'
data_path = ''  # dataset='jsonl': the training pairs
eval_data_path = ''  # dataset='jsonl': the held-out pairs
hh_subsets = 'all'  # dataset='hh': 'all' or a comma-separated list of subsets
max_length = 512  # prompt + response tokens
max_prompt_length = 256
group_by_length = True  # batches of pairs of similar length: less padding
pack = False  # several sequences a row (block-diagonal causal attention): less padding still
# the loss
beta = 0.1  # the KL penalty's strength: the reward is beta * log(pi / pi_ref)
loss_type = 'sigmoid'  # 'sigmoid' (DPO), 'ipo', 'hinge', 'simpo', or 'kto' (unpaired rows)
label_smoothing = 0.0  # sigmoid only: conservative DPO, the assumed chance that a label is flipped
rpo_alpha = 0.0  # > 0 adds rpo_alpha x the chosen's NLL per token (RPO; kto: a desirable row's)
simpo_gamma = 0.5  # simpo only: the target reward margin
desirable_weight = 1.0  # kto only: a desirable row's weight (the paper: weight x count about even)
undesirable_weight = 1.0  # kto only: an undesirable row's weight
precompute_ref_logps = False  # the reference's log-probs computed once, then trained without it
# online DPO: each micro-step's pairs sampled from the policy as it trains, ranked by a judge
online = False  # True: two samples a prompt, the judge's better one chosen, ties dropped
judge = 'true_reward'  # 'true_reward', 'module:function', 'implicit:DIR', 'implicit_per_token:DIR'
online_temperature = 1.0  # of the policy's samples
online_max_new_tokens = 48  # a sample's tokens at most (prompt + sample also within max_length)
# training
out_dir = 'out-dpo'
overwrite = False  # a new run may replace the run in out_dir (its ckpt.pt and metrics.jsonl)
batch_size = 8  # pairs (kto: rows) per micro-batch per rank
gradient_accumulation_steps = 8  # pairs a step: batch_size * this * ranks
max_iters = 1000
learning_rate = 1e-6
warmup_iters = 150
decay_lr = False  # False: constant after warmup, as in the paper; True: cosine decay to min_lr
lr_decay_iters = 1000
min_lr = 1e-7
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 10.0  # clip the gradient norm to this; 0 turns clipping off
# evaluation, logging, saving
eval_interval = 100  # evaluate on the held-out pairs this often and at the end, then save ckpt.pt
eval_iters = 20  # held-out batches per evaluation, all ranks together; -1: all of them
eval_only = False  # evaluate once, write the metrics, and stop: no training, no checkpoint
log_interval = 10
wandb_log = False
wandb_project = 'nanodpo'
wandb_run_name = 'dpo'
# the system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bf16 where the hardware has it, else float16 on a GPU, float32 on a CPU)
compile = False  # torch.compile the policy and the reference
fsdp = False  # under torchrun: each rank holds 1/N of the models, gradients and AdamW state (FSDP2)
seed = 1337
# -----------------------------------------------------------------------------


def batch_losses(model, ref, data, indices, ref_logps, run):
    """The losses (B,) of the examples indices (pairs; kto: rows), the totals of their metrics, the
    batch trained on, and the batches that run forward only (for the FLOPs). ref_logps: the split's
    precomputed reference log-probs (N, 2), or None."""
    if loss_type != 'kto':  # B pairs' chosen and rejected rows in one batch: one forward per model
        batch = dpo_batch(data, indices, pack).to(run.device)
        ref_rows = None  # the reference's log-probs of these pairs, where precomputed: (B, 2)
        if ref_logps is not None:
            ref_rows = torch.from_numpy(ref_logps[indices]).to(run.device)
        losses, totals = dpo_step(model, ref, batch, ref_rows, run.autocast, beta=beta,
                                  loss_type=loss_type, label_smoothing=label_smoothing,
                                  rpo_alpha=rpo_alpha, simpo_gamma=simpo_gamma)
        forward_only = [batch] if ref is not None else []
    else:  # kto: each row against mismatched rows (a prompt, another row's completion)
        batch, kl_batch = (b.to(run.device) for b in kto_batch(data, indices, max_length, pack))
        desirable = torch.from_numpy(data.arrays['label'][indices]).to(run.device)  # (B,) bool
        losses, totals = kto_step(model, ref, batch, kl_batch, desirable, run.autocast, beta=beta,
                                  desirable_weight=desirable_weight,
                                  undesirable_weight=undesirable_weight, rpo_alpha=rpo_alpha)
        forward_only = [kl_batch, batch, kl_batch]  # the policy's mismatched rows; the ref's both
    return losses, totals, batch, forward_only


def main(config):
    run = parallel.start(device, dtype, seed)  # this process's device, dtype and rank
    # the models: the policy, and the frozen reference it is held close to. A resume goes on with
    # its own recipe, ckpt.pt's settings, but for those given now (init_from, out_dir and how it
    # runs are never taken from it: checkpoint.FRESH_ON_RESUME), from the models it started from
    resuming, resumed = init_from == 'resume', None
    if resuming:
        resumed = checkpoint.load(os.path.join(out_dir, 'ckpt.pt'), 'dpo', config)
        globals().update(resumed['recipe'])
        config = {**config, **resumed['recipe']}
    policy_from = resumed['config']['init_from'] if resumed else init_from
    reference_from = ref_from or (resumed['config']['ref_from'] if resumed else init_from)
    # saved in ckpt.pt: the models the run started from, which a resume loads again (init_from
    # itself stays 'resume' there: the policy is out_dir's ckpt.pt, read above as resumed)
    config = {**config, 'init_from': policy_from, 'ref_from': reference_from}
    if not eval_only:  # one run at a time in out_dir, never over another run or a model it reads
        checkpoint.claim_out_dir(out_dir, run, resuming, overwrite,
                                 {'init_from': policy_from, 'ref_from': reference_from})
    # with lora_rank > 0 the policy is the model, frozen, with new adapters (LoRA), and the
    # reference that same model with its adapters off: one copy of the weights in memory
    lora = (lora_rank, lora_alpha, lora_dropout, lora_targets)
    # init_from, not policy_from: on a resume the policy is ckpt.pt's weights (resumed)
    policy = load_model(init_from, out_dir, run.device, dropout, checkpoint=resumed,
                        max_length=max_length, lora=lora)
    ref, ref_sha256 = load_reference(reference_from, policy, run.device, resumed)
    # the data: tokenized once into the token cache, by one process a node; the loader gives this
    # rank's pairs (kto: rows) of each micro-step, in an order set by the seed and the step's size
    kto = loss_type == 'kto'
    with run.node_first():
        train_data = load_dataset(dataset, 'train', data_path, eval_data_path, max_length,
                                  max_prompt_length, hh_subsets, rows=kto)
        eval_data = load_dataset(dataset, 'test', data_path, eval_data_path, max_length,
                                 max_prompt_length, hh_subsets, rows=kto)
    loader = PairLoader(train_data.pair_lengths(), batch_size, seed, run.rank, run.world_size,
                        gradient_accumulation_steps, group_by_length=group_by_length)
    judge_scores = load_judge(judge, run.device, run.autocast) if online else None
    # under torchrun: DDP or FSDP (sharded in place); compiled if asked. raw_policy: stepped, saved
    raw_policy, policy = policy, parallel.distribute(policy, run, fsdp, compile)
    if loss_type == 'simpo':  # SimPO's reward is the policy's own log-prob per token: no reference
        ref = None
    else:
        ref = parallel.distribute(ref, run, fsdp, compile, forward_only=True)
    train_ref_logps = eval_ref_logps = None
    if precompute_ref_logps and ref is not None:  # then trained without the reference in memory
        train_ref_logps, eval_ref_logps = (
            reference_logps(ref, ref_sha256, data, batch_size * 4, pack, run)  # no graph: 4x batch
            for data in (train_data, eval_data))
        ref = None
    # after distribute: under FSDP the optimizer holds this rank's shards of the weights and moments
    optimizer = raw_policy.configure_optimizers(weight_decay, learning_rate, (beta1, beta2),
                                                run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == 'float16')  # float16 only
    iter_num = checkpoint.restore(resumed, optimizer, scaler, loader, run) if resumed else 0
    start_iter = iter_num
    del resumed  # its tensors live in the model and the optimizer now
    names = METRICS['kto' if kto else 'dpo']
    log = checkpoint.MetricLog(out_dir, run.master, start_iter, eval_only, wandb_log,
                               wandb_project, wandb_run_name, config)
    examples = 'rows' if kto else 'pairs'
    log.describe('dpo', raw_policy, run, len(train_data), len(eval_data), examples,
                 batch_size * gradient_accumulation_steps * run.world_size, f"per step; loss "
                 f"{loss_type}, beta {beta}" + (f"; online, judge {judge}" if online else ""))

    def held_out_totals(indices):  # the totals of a held-out batch's metrics
        return batch_losses(policy, ref, eval_data, indices, eval_ref_logps, run)[1]

    if not eval_only:  # SIGTERM, SIGINT: finish the step, save, stop (run.stop_signal)
        run.save_on_signals()
    judge_error = None  # online: the judge failed mid-step; the step's start saved, the run stops
    while True:
        stop = run.stop_signal()  # a signal any rank was sent, else 0
        # evaluate on the held-out pairs every eval_interval iterations and at the end, then
        # save ckpt.pt; a resumed run does neither where it starts (the stopped run saved there),
        # and a new run evaluates at iteration 0 but saves nothing there (nothing is trained yet)
        evaluate = not judge_error and (eval_only or (
            (iter_num % eval_interval == 0 or iter_num == max_iters)
            and (iter_num > start_iter or start_iter == 0)))
        if evaluate:  # (held_out_means: eval mode, no dropout, then back to train mode)
            metrics = held_out_means(policy, held_out_totals, names, len(eval_data), batch_size,
                                     eval_iters, run, same_count=fsdp)
            if eval_only:
                log.write_eval(iter_num, metrics)
                break
            log.log(iter_num, metrics)
            run.stop_unless_finite(metrics['eval/loss'], iter_num, 'held-out loss')  # never save it
        if (evaluate or stop or judge_error) and iter_num > start_iter:
            # ckpt.pt, all a resume needs to go on exactly: whole tensors on the CPU (under FSDP
            # gathered from the shards; under LoRA the adapters only), and every rank's place in the
            # data and its torch RNG state (for dropout): collectives, so every rank builds it
            model_state, optimizer_state = run.full_state(raw_policy, optimizer)
            ckpt = {'script': 'dpo', 'model': model_state,
                    'model_args': asdict(raw_policy.config), 'optimizer': optimizer_state,
                    'scaler': scaler.state_dict(), 'iter_num': iter_num, 'config': config,
                    'ref_sha256': ref_sha256,  # a resume must find the same reference
                    'loader': {**loader.state_dict(), 'ranks': run.gather(loader.position())},
                    'rng': run.rng_states()}
            if run.master:  # written whole or not at all: a failed write keeps the old file
                checkpoint.write(ckpt, os.path.join(out_dir, 'ckpt.pt'))
        if judge_error:  # the step under way is dropped: a resume goes on with the prompts after it
            run.raise_stopped(judge_error, iter_num, out_dir, 'dpo.py')
        if stop:  # after SIGTERM or SIGINT: ckpt.pt holds this iteration; say how to go on
            log.close()
            run.exit_stopped(stop, iter_num, out_dir, 'dpo.py')
        if iter_num >= max_iters:
            break
        lr = get_lr(iter_num, learning_rate, warmup_iters, decay_lr, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # forward and backward over gradient_accumulation_steps micro-batches, the gradients summed
        t0 = time.perf_counter()
        totals, online_totals, flops, tokens = 0, 0, 0, 0  # totals: (sum, count) of each metric
        for micro_step in range(gradient_accumulation_steps):
            if run.ddp:  # DDP all-reduces the gradients in the last micro-step's backward only: the
                # others add to them locally, for free (FSDP reduce-scatters every micro-step)
                policy.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
            if online:  # batch_size new pairs: two samples of the policy a prompt, judged
                data, sampled_totals, judge_error = step_pairs(
                    raw_policy, train_data, lambda: next(loader), batch_size, judge_scores, run,
                    max_length, max_new_tokens=online_max_new_tokens,
                    temperature=online_temperature)
                if judge_error:  # (on every rank at once) back to the top: save, then stop
                    break
                indices, online_totals = np.arange(len(data)), online_totals + sampled_totals
            else:
                data, indices = train_data, next(loader)
            losses, batch_totals, batch, forward_only = batch_losses(policy, ref, data, indices,
                                                                     train_ref_logps, run)
            # the mean over the step's pairs (kto: rows; online: a tied prompt, dropped, counts 0)
            scaler.scale(losses.sum() / (batch_size * gradient_accumulation_steps)).backward()
            totals = totals + batch_totals
            shape = batch.flops_shape()  # (tokens, with a target, attended length): no padding
            tokens += shape[0]
            flops += raw_policy.flops(*shape) + sum(  # and the forwards without a graph
                raw_policy.flops(*b.flops_shape(), backward=False) for b in forward_only)
        if judge_error:
            continue
        run.stop_unless_finite(totals[0, 0], iter_num)  # the loss's sum: no NaN reaches the weights
        # clip the gradient norm (float16: unscaled first), step (skipped on an overflow), zero
        scaler.unscale_(optimizer)
        max_norm = grad_clip if grad_clip > 0 else float('inf')
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_policy.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        grad_norm = run.full_tensor(grad_norm).item()  # (under FSDP a DTensor over the shards)
        iter_num += 1
        if iter_num % log_interval == 0:  # the step's means over all ranks, and its speed
            totals = run.sum(totals)
            seconds = time.perf_counter() - t0  # (the .item() above waited for the GPU)
            # totals[0, 1]: the loss's count, the pairs (kto: rows) of the step
            speed = log.speed(iter_num, max_iters, seconds, examples, totals[0, 1].item(),
                              tokens * run.world_size, flops, run.peak_flops)
            if online:
                speed = {**means(METRICS['online'], run.sum(online_totals.to(run.device))), **speed}
            log.log(iter_num, {**means(names, totals), **speed, 'grad_norm': grad_norm, 'lr': lr})
    log.close()
    run.exit_together()


RANGES = {  # what each setting may be: configure() checks them all before any work
    'dropout': '[0, 1)', 'lora_rank': '>= 0', 'lora_alpha': '> 0', 'lora_dropout': '[0, 1)',
    'dataset': ('hh', 'jsonl', 'synthetic'), 'max_length': '>= 2',
    'max_prompt_length': '>= 1', 'beta': '> 0',
    'loss_type': ('sigmoid', 'ipo', 'hinge', 'simpo', 'kto'),
    'label_smoothing': '[0, 0.5)', 'rpo_alpha': '>= 0', 'simpo_gamma': '>= 0',
    'desirable_weight': '> 0', 'undesirable_weight': '> 0', 'online_temperature': '> 0',
    'online_max_new_tokens': '>= 1', 'batch_size': '>= 1', 'gradient_accumulation_steps': '>= 1',
    'max_iters': '>= 0', 'learning_rate': '> 0', 'warmup_iters': '>= 0', 'lr_decay_iters': '>= 1',
    'min_lr': '>= 0', 'weight_decay': '>= 0', 'beta1': '[0, 1)', 'beta2': '[0, 1)',
    'grad_clip': '>= 0', 'eval_interval': '>= 1', 'eval_iters': '-1 (all) or >= 1',
    'log_interval': '>= 1', 'dtype': ('auto', 'float32', 'bfloat16', 'float16'), 'seed': '>= 0',
}
CHECKS = [  # settings that do not go together, and why: configure() stops on the first that holds
    (lambda c: c['lora_rank'] and c['ref_from'] not in ('', c['init_from']),
     "lora_rank={lora_rank} does not go with ref_from={ref_from!r}: under LoRA the reference is "
     "the policy's own base with the adapters off; leave ref_from='' (the policy's init_from)"),
    (lambda c: c['loss_type'] == 'kto' and c['precompute_ref_logps'],
     "precompute_ref_logps=True does not go with loss_type='kto': its KL reference point pairs "
     "each row with another row of its batch, which changes every epoch; keep the live reference"),
    (lambda c: c['online'] and (c['loss_type'] == 'kto' or c['precompute_ref_logps']),
     "online=True samples new pairs every step: it trains with a pairwise loss_type (not 'kto') "
     "and a live reference (not precompute_ref_logps=True)"),
    (lambda c: c['fsdp'] and c['online'],
     "fsdp=True does not go with online=True: each rank samples its own prompts, as many tokens as "
     "its samples take, while under FSDP every rank must take part in every forward"),
    (lambda c: c['fsdp'] and c['dtype'] == 'float16',
     "fsdp=True does not go with dtype=float16, whose loss scaler does not take sharded gradients: "
     "use bfloat16 (or float32)"),
    (lambda c: c['loss_type'] == 'kto' and c['batch_size'] < 2,
     "loss_type='kto' needs batch_size >= 2: its KL reference point pairs each row with another "
     "row of the same batch"),
]


if __name__ == '__main__':
    settings = configure(globals(), RANGES, checks=CHECKS)  # the command line's overrides, checked
    with one_line_errors():  # a user's mistake ends the run with one line, not a traceback
        main(settings)

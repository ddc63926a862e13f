"""
Direct Preference Optimization (Rafailov et al., 2023), the second stage: a policy trained on
preference pairs against a frozen reference, usually both the SFT model.

    python dpo.py config/dpo_synthetic.py
    torchrun --standalone --nproc_per_node=8 dpo.py config/hh.py
    python dpo.py config/kto_synthetic.py   # KTO: unpaired rows, each a thumbs up or down
    python dpo.py config/online_synthetic.py   # online DPO: pairs sampled from the policy, ranked by a judge

The pairwise loss family is one pure function, losses.preference_loss; KTO (loss_type='kto') is
losses.kto_loss, on unpaired rows (a JSONL file of prompt/completion/label, or pairs split into a
desirable and an undesirable row). Online DPO (online=True) changes where the pairs come from:
each micro-step samples two responses per prompt from the policy as it is, and a judge picks the
better one (online.py). The run is the flat loop in main().
"""

import os
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import parallel
import runtime
from configurator import ConfigError, Range, above, at_least, config_keys, configure, one_of, within
from batches import PairLoader, dpo_batch, eval_batches, kto_batch
from data import DataError, load_dataset, unpair
from losses import DPO_METRICS, KTO_METRICS, LOSS_TYPES, chosen_rejected_logps, dpo_step, kto_step, means
from model import LoadError
from online import ONLINE_METRICS, JudgeError, load_judge, online_pairs

# -----------------------------------------------------------------------------
# the models
init_from = 'out-sft'  # the policy: an SFT out_dir (its ckpt.pt), a GPT-2 name, hub id or hub-layout directory, or 'resume'
ref_from = ''  # the frozen reference, as init_from; '' is the same as init_from (the usual choice)
dropout = 0.0  # the policy's, while training (the reference never uses dropout); the DPO paper's code has it off
# the data
dataset = 'synthetic'  # 'hh', 'jsonl' or 'synthetic'
data_path = ''  # dataset='jsonl': the training pairs
eval_data_path = ''  # dataset='jsonl': the held-out pairs
hh_subsets = 'all'  # dataset='hh': 'all' or a comma-separated list of subsets
max_length = 512  # prompt + response tokens
max_prompt_length = 256
group_by_length = True  # batches of pairs of similar length: less padding
pack = False  # several sequences a row (block-diagonal causal attention) instead of one padded row each: less padding still
# the loss
beta = 0.1  # the KL penalty's strength: the reward is beta * log(pi / pi_ref)
loss_type = 'sigmoid'  # 'sigmoid' (DPO), 'ipo', 'hinge', 'simpo', or 'kto' (unpaired rows)
label_smoothing = 0.0  # sigmoid only: conservative DPO, the assumed probability that a label is flipped
rpo_alpha = 0.0  # > 0 adds rpo_alpha times the chosen response's NLL per token (RPO; kto: a desirable row's)
simpo_gamma = 0.5  # simpo only: the target reward margin
desirable_weight = 1.0  # kto only: the weight of a desirable row's loss (the paper: weight x count about even)
undesirable_weight = 1.0  # kto only: the weight of an undesirable row's loss
precompute_ref_logps = False  # compute the reference's log-probs once (cached with the tokens), then train without it in memory
# online DPO: each micro-step's pairs sampled from the policy as it trains, ranked by a judge (online.py)
online = False  # True: two samples of the current policy per prompt of the data, the judge's better one chosen, ties dropped
judge = 'true_reward'  # 'true_reward' (the embedded task), 'module:function' (yours), 'implicit:DIR' (a DPO run's implicit reward) or 'implicit_per_token:DIR'
online_temperature = 1.0  # of the policy's samples
online_max_new_tokens = 48  # a sample's tokens at most (prompt + sample also within max_length)
# training
out_dir = 'out-dpo'
overwrite = False  # a new run may replace the run already in out_dir (its ckpt.pt and metrics.jsonl)
batch_size = 8  # pairs (kto: rows) per micro-batch per rank
gradient_accumulation_steps = 8  # pairs per optimizer step: batch_size * gradient_accumulation_steps * ranks
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
eval_interval = 100  # evaluate on the held-out pairs and save ckpt.pt every this many iterations
eval_iters = 20  # batches per evaluation; -1 for the whole held-out set
eval_only = False  # evaluate once, write the metrics, and stop: no training, no checkpoint
log_interval = 10
wandb_log = False
wandb_project = 'nanodpo'
wandb_run_name = 'dpo'
# the system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bf16 where the hardware has it, float16 on older GPUs, else float32), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the policy and the reference
fsdp = False  # under torchrun: each rank holds 1/N of the policy, the reference, the gradients and AdamW's state (FSDP2), not all of them (DDP)
seed = 1337
# -----------------------------------------------------------------------------

RANGES = {  # what each setting may be: configure() checks them all before any work
    'dropout': within(0, 1), 'dataset': one_of('hh', 'jsonl', 'synthetic'), 'max_length': at_least(2),
    'max_prompt_length': at_least(1), 'beta': above(0), 'loss_type': one_of(*LOSS_TYPES, 'kto'),
    'label_smoothing': within(0, 0.5), 'rpo_alpha': at_least(0), 'simpo_gamma': at_least(0),
    'desirable_weight': above(0), 'undesirable_weight': above(0), 'online_temperature': above(0),
    'online_max_new_tokens': at_least(1),
    'batch_size': at_least(1), 'gradient_accumulation_steps': at_least(1), 'max_iters': at_least(0),
    'learning_rate': above(0), 'warmup_iters': at_least(0), 'lr_decay_iters': at_least(1), 'min_lr': at_least(0),
    'weight_decay': at_least(0), 'beta1': within(0, 1), 'beta2': within(0, 1), 'grad_clip': at_least(0),
    'eval_interval': at_least(1), 'eval_iters': Range(lambda v: v == -1 or v >= 1, '-1 (all) or >= 1'), 'log_interval': at_least(1),
    'dtype': one_of('auto', *runtime.DTYPES), 'seed': at_least(0),
}


def step(model, ref, data, indices, ref_logps, run):
    """The forward of the examples indices (pairs; kto: rows): losses (B,) and the totals of the
    metrics (losses.dpo_step or losses.kto_step), the batch trained on, and the batches that only
    run forward (for the FLOPs). ref_logps: the split's precomputed reference log-probs (N, 2), or None."""
    if loss_type == 'kto':
        batch, kl_batch = (b.to(run.device) for b in kto_batch(data, indices, max_length, pack))
        desirable = torch.from_numpy(data.arrays['label'][indices]).to(run.device)  # (B,) bool
        losses, totals = kto_step(model, ref, batch, kl_batch, desirable, run.autocast, beta=beta,
                                  desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, rpo_alpha=rpo_alpha)
        return losses, totals, batch, [kl_batch, batch, kl_batch]  # the policy's mismatched rows, the reference's both
    batch = dpo_batch(data, indices, pack).to(run.device)
    batch_ref_logps = None if ref_logps is None else torch.from_numpy(ref_logps[indices]).to(run.device)  # (B, 2)
    losses, totals = dpo_step(model, ref, batch, batch_ref_logps, run.autocast, beta=beta, loss_type=loss_type,
                              label_smoothing=label_smoothing, rpo_alpha=rpo_alpha, simpo_gamma=simpo_gamma)
    return losses, totals, batch, [batch] if ref is not None else []


@torch.no_grad()
def evaluate(model, ref, ref_logps, data, metric_names, run):
    """Held-out means of the metrics over eval_iters batches (all with -1), over all ranks."""
    model.eval()
    totals = torch.zeros(len(metric_names), 2, device=run.device)  # (sum, count) of each metric
    for indices, counted in eval_batches(len(data), batch_size, run.rank, run.world_size, eval_iters, fsdp):
        batch_totals = step(model, ref, data, indices, ref_logps, run)[1]
        totals += batch_totals if counted else 0  # (FSDP: a rank short of batches runs one more, not counted)
    model.train()
    return means(metric_names, runtime.all_reduce_sum(totals, run), prefix='eval/')


@torch.no_grad()
def reference_logps(ref, ref_sha256, data, run):
    """(N, 2) float32: the reference's summed log-probs of every pair's chosen and rejected response,
    computed once (each rank its share) and cached next to the token cache on every node, keyed by
    the reference's weights (ref_sha256, runtime.weights_sha256 of ref) and the dtype."""
    path = f"{data.path[:-len('.npz')]}-ref-{ref_sha256[:12]}-{run.dtype}.npy"
    cached = torch.tensor([float(os.path.exists(path))], device=run.device)
    if runtime.all_reduce_sum(cached, run, 'whether the reference log-probs are cached').item() == run.world_size:
        return np.load(path)  # on every node's disk (a rank without it joins the others in computing them)
    shares = PairLoader(np.zeros(len(data)), batch_size * 4, rank=run.rank, world_size=run.world_size,
                        shuffle=False).epoch_batches(0)
    indices = torch.from_numpy(np.concatenate(shares)).to(run.device)
    values = []
    for share in tqdm(shares, desc="the reference's log-probs", unit=' batches', disable=not run.master):
        batch = dpo_batch(data, share, pack).to(run.device)
        with run.autocast:
            values.append(torch.stack(chosen_rejected_logps(ref, batch), dim=1).float())  # (b, 2)
    values = torch.cat(values)
    if run.ddp:  # every rank holds an equal share: gather them all
        gathered = [(torch.empty_like(indices), torch.empty_like(values)) for _ in range(run.world_size)]
        with runtime.collective("the all-gather of the reference's log-probs", run):
            runtime.dist.all_gather([g[0] for g in gathered], indices)
            runtime.dist.all_gather([g[1] for g in gathered], values)
        indices, values = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    out = np.zeros((len(data), 2), dtype=np.float32)
    out[indices.cpu().numpy()] = values.cpu().numpy()
    if run.local_rank == 0:  # one copy a node
        with runtime.atomic_open(path, 'wb') as f:
            np.save(f, out)
    return out


def main(config):
    run = runtime.setup(device, dtype, seed)
    checkpoint, policy_from, reference_from = None, init_from, ref_from or init_from
    if init_from == 'resume':  # the run in out_dir goes on, against the reference it started with
        checkpoint = runtime.load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), 'cpu', script='dpo')
        policy_from, reference_from = checkpoint['config']['init_from'], ref_from or checkpoint['config']['ref_from']
        if not reference_from or reference_from == 'resume':
            raise LoadError(f"{out_dir}/ckpt.pt does not record its reference (it predates that): "
                            "pass --ref_from= the model the run started against")
    if not eval_only:  # stop before anything is written over a run or a model this run reads
        runtime.prepare_out_dir(out_dir, run, checkpoint is not None, overwrite,
                                {'init_from': policy_from, 'ref_from': reference_from})
    config = {**config, 'init_from': policy_from, 'ref_from': reference_from}  # what every later resume reads
    # the models first: a wrong init_from or ref_from stops before any data is read
    policy = runtime.load_model(init_from, out_dir, run.device, dropout, checkpoint)
    ref = runtime.load_model(reference_from, out_dir, run.device).eval().requires_grad_(False)
    if {**asdict(ref.config), 'dropout': 0} != {**asdict(policy.config), 'dropout': 0}:
        raise LoadError(f"the reference ({reference_from}) has the shape {asdict(ref.config)}, "
                        f"but the policy ({policy_from}) has {asdict(policy.config)}")
    ref_sha256 = runtime.weights_sha256(ref)
    if checkpoint and checkpoint.get('ref_sha256', ref_sha256) != ref_sha256:
        raise LoadError(f"the reference {reference_from} is not the model this run trained against: its weights "
                        "changed since the run started (sha256 differs); resume with the same reference")
    if max_length > policy.config.block_size:
        raise ConfigError(f"max_length={max_length} is longer than the model's block_size {policy.config.block_size}")
    kto = loss_type == 'kto'
    if kto and precompute_ref_logps:
        raise ConfigError("precompute_ref_logps=True does not go with loss_type='kto': its KL reference point pairs "
                          "each row with another row of its batch, which changes every epoch; keep the live reference")
    if online and (kto or precompute_ref_logps):
        raise ConfigError("online=True samples new pairs every step: it trains with a pairwise loss_type (not 'kto') "
                          "and a live reference (not precompute_ref_logps=True)")
    parallel.check(fsdp, run)
    if fsdp and online:
        raise ConfigError("fsdp=True does not go with online=True: each rank samples its own prompts, as many tokens as "
                          "its samples take, while under FSDP every rank must take part in every forward")
    if kto and batch_size < 2:
        raise ConfigError("loss_type='kto' needs batch_size >= 2: its KL reference point pairs each row with "
                          "another row of the same batch")
    with runtime.node_first(run):  # one process a node writes the token cache, the others read it
        train_data, eval_data = (load_dataset(dataset, split, data_path, eval_data_path, max_length, max_prompt_length,
                                              hh_subsets, unpaired_ok=kto) for split in ('train', 'test'))
    if kto:  # pairs become two rows each, one desirable and one not; unpaired rows stay as they are
        train_data, eval_data = unpair(train_data), unpair(eval_data)
    metric_names = KTO_METRICS if kto else DPO_METRICS
    judge_scores = load_judge(judge, run.device, run.autocast) if online else None  # a bad judge stops before training
    raw_policy = policy  # the model that is stepped and saved (under FSDP, sharded in place by wrap)
    policy = parallel.wrap(raw_policy, run, fsdp, compile)  # the one the forward goes through: compiled, DDP or FSDP
    if loss_type == 'simpo':  # SimPO's reward is the policy's own log-prob per token: no reference runs
        ref = None
    else:
        ref = parallel.wrap(ref, run, fsdp, compile, forward_only=True)
    train_ref_logps = eval_ref_logps = None
    if precompute_ref_logps and ref is not None:
        train_ref_logps, eval_ref_logps = (reference_logps(ref, ref_sha256, split, run) for split in (train_data, eval_data))
        ref = None  # trained without the reference in memory from here on
    loader = PairLoader(train_data.pair_lengths(), batch_size, seed, run.rank, run.world_size,
                        gradient_accumulation_steps, group_by_length=group_by_length)
    # after wrap: under FSDP the optimizer holds this rank's shards of the parameters and moments
    optimizer = raw_policy.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == 'float16')  # only float16 needs one
    iter_num = runtime.restore_training_state(checkpoint, optimizer, scaler, loader, run) if checkpoint else 0
    start_iter = iter_num
    del checkpoint  # its tensors live in the model and the optimizer now
    log = runtime.MetricLog(out_dir, run.master and not eval_only, start_iter, wandb_log, wandb_project, wandb_run_name, config)
    peak_flops = runtime.peak_flops(run.device, run.dtype)  # a GPU's published figure, or what bench.py measured
    if run.master:
        print(f"dpo: {raw_policy.num_params() / 1e6:.1f}M parameters, {run.device}, {run.dtype}, {run.world_size} rank(s); "
              f"{len(train_data)} train / {len(eval_data)} held-out {'rows' if kto else 'pairs'}; "
              f"{batch_size * gradient_accumulation_steps * run.world_size} per step; loss {loss_type}, beta {beta}"
              + (f"; online, judge {judge}" if online else ""))

    while True:
        # evaluate on the held-out pairs and save ckpt.pt every eval_interval iterations, and at the end
        due = iter_num % eval_interval == 0 or iter_num == max_iters
        just_resumed = start_iter > 0 and iter_num == start_iter  # the run resumed from evaluated and saved at this iteration
        if eval_only or (due and not just_resumed):
            metrics = evaluate(policy, ref, eval_ref_logps, eval_data, metric_names, run)
            if eval_only:
                runtime.write_eval(metrics, iter_num, out_dir, run)
                break
            log.log(iter_num, metrics)
            runtime.stop_unless_finite(metrics['eval/loss'], iter_num, run, 'held-out loss')  # never save broken weights
            if iter_num > start_iter:
                rng = runtime.rng_states(run)  # every rank's (a collective), so each resumes its own stream
                loader_state = runtime.loader_state(loader, run)  # and its own place in the data (a collective)
                model_state, optimizer_state = parallel.full_state(raw_policy, optimizer, run.master)  # (FSDP: gathers)
                if run.master:
                    runtime.save_checkpoint(dict(  # all that a resume needs
                        script='dpo', model=model_state, model_args=asdict(raw_policy.config),
                        optimizer=optimizer_state, scaler=scaler.state_dict(), iter_num=iter_num,
                        loader=loader_state, rng=rng, config=config, ref_sha256=ref_sha256),
                        os.path.join(out_dir, 'ckpt.pt'))
        if iter_num >= max_iters:
            break
        # this iteration's learning rate
        lr = runtime.get_lr(iter_num, learning_rate, warmup_iters, decay_lr, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # forward and backward over gradient_accumulation_steps micro-batches, the gradients summed
        t0 = time.perf_counter()
        totals, flops, tokens = torch.zeros(len(metric_names), 2, device=run.device), 0, 0  # (sum, count) of each metric
        online_totals, sample_seconds = torch.zeros(len(ONLINE_METRICS), 2), 0.0
        for micro_step in range(gradient_accumulation_steps):
            parallel.sync_gradients(policy, micro_step == gradient_accumulation_steps - 1)  # the last micro-step's only
            if online:  # batch_size pairs sampled from the policy now, ranked by the judge
                t_sample = time.perf_counter()
                data, sampled_totals = online_pairs(raw_policy, train_data, lambda: next(loader), batch_size, judge_scores,
                                                    run, max_length, max_new_tokens=online_max_new_tokens,
                                                    temperature=online_temperature)
                online_totals += sampled_totals
                sample_seconds += time.perf_counter() - t_sample
                indices = np.arange(len(data))
            else:  # data: what indices point into, the training pairs or the pairs just sampled
                data, indices = train_data, next(loader)
            losses, batch_totals, batch, forward_only = step(policy, ref, data, indices, train_ref_logps, run)
            scaler.scale(losses.sum() / (batch_size * gradient_accumulation_steps)).backward()
            totals += batch_totals
            shape = batch.flops_shape()  # (tokens, tokens with a target, attended length), padding not counted
            tokens += shape[0]
            flops += raw_policy.flops(*shape) + sum(raw_policy.flops(*b.flops_shape(), backward=False) for b in forward_only)
        runtime.stop_unless_finite(totals[0, 0], iter_num, run)  # the loss's sum: a NaN never reaches the weights
        grad_norm = runtime.optimizer_step(raw_policy, optimizer, scaler, grad_clip)  # clip, step, zero the gradients
        iter_num += 1
        if iter_num % log_interval == 0:
            totals = runtime.all_reduce_sum(totals, run)  # means over the pairs the step really had, on all ranks
            pairs = totals[0, 1].item()  # the loss's count: one a pair (kto: a row)
            if online:  # the judge's scores of all the samples drawn, on all ranks; this rank's seconds sampling
                online_metrics = {**means(ONLINE_METRICS, runtime.all_reduce_sum(online_totals.to(run.device), run)),
                                  'online/sample_seconds': sample_seconds}
            log.log(iter_num, {**means(metric_names, totals), **(online_metrics if online else {}),
                               **runtime.speed(t0, pairs, tokens, flops, peak_flops, run, 'rows' if kto else 'pairs'),
                               'grad_norm': grad_norm, 'lr': lr})
    runtime.finish(run, log)


if __name__ == '__main__':
    configure(globals(), RANGES)
    try:
        main(config_keys(globals()))
    except (ConfigError, LoadError, DataError, JudgeError, runtime.TrainingError) as e:
        runtime.exit_with_error(e)

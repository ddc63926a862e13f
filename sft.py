"""
Supervised fine-tuning, the DPO paper's first stage ("Preferred-FT"): maximise the likelihood of the
chosen responses, loss on response tokens only. Its out_dir is the start and the reference of DPO.

    python sft.py config/sft_synthetic.py
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_hh.py
"""

import os
import time
from dataclasses import asdict

import torch

import parallel
import runtime
from configurator import ConfigError, Range, above, at_least, config_keys, configure, one_of, within
from batches import PairLoader, eval_batches, sft_batch
from data import DataError, load_dataset
from losses import SFT_METRICS, means, sft_step
from model import GPT, GPTConfig, LoadError

# -----------------------------------------------------------------------------
# the model
init_from = 'gpt2'  # a GPT-2 name, hub id or hub-layout directory, 'scratch' (a new model of the shape below), or 'resume'
n_layer = 4  # init_from='scratch' only: the shape of the new model
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0
# the data
dataset = 'synthetic'  # 'hh', 'jsonl' or 'synthetic'
data_path = ''  # dataset='jsonl': the training pairs (their chosen responses)
eval_data_path = ''  # dataset='jsonl': the held-out pairs
hh_subsets = 'all'  # dataset='hh': 'all' or a comma-separated list of subsets
max_length = 512  # prompt + response tokens
max_prompt_length = 256
group_by_length = True  # batches of sequences of similar length: less padding
pack = False  # several sequences a row (block-diagonal causal attention) instead of one padded row each: less padding still
# training
out_dir = 'out-sft'
overwrite = False  # a new run may replace the run already in out_dir (its ckpt.pt and metrics.jsonl)
batch_size = 16  # sequences (prompt + chosen) per micro-batch per rank
gradient_accumulation_steps = 4  # sequences per optimizer step: batch_size * gradient_accumulation_steps * ranks
max_iters = 1000
learning_rate = 1e-5
warmup_iters = 100
decay_lr = True  # cosine decay to min_lr at lr_decay_iters after the warmup
lr_decay_iters = 1000
min_lr = 1e-6
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the gradient norm to this; 0 turns clipping off
# evaluation, logging, saving
eval_interval = 100  # evaluate on the held-out chosen responses and save ckpt.pt every this many iterations
eval_iters = 20  # batches per evaluation; -1 for the whole held-out set
eval_only = False  # evaluate once, write the metrics, and stop: no training, no checkpoint
log_interval = 10
wandb_log = False
wandb_project = 'nanodpo'
wandb_run_name = 'sft'
# the system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bf16 where the hardware has it, float16 on older GPUs, else float32), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model
fsdp = False  # under torchrun: each rank holds 1/N of the model, the gradients and AdamW's state (FSDP2), not all of them (DDP)
seed = 1337
# -----------------------------------------------------------------------------

RANGES = {  # what each setting may be: configure() checks them all before any work
    'n_layer': at_least(1), 'n_head': at_least(1), 'n_embd': at_least(1), 'block_size': at_least(2),
    'dropout': within(0, 1), 'dataset': one_of('hh', 'jsonl', 'synthetic'), 'max_length': at_least(2),
    'max_prompt_length': at_least(1), 'batch_size': at_least(1), 'gradient_accumulation_steps': at_least(1),
    'max_iters': at_least(0), 'learning_rate': above(0), 'warmup_iters': at_least(0), 'lr_decay_iters': at_least(1),
    'min_lr': at_least(0), 'weight_decay': at_least(0), 'beta1': within(0, 1), 'beta2': within(0, 1),
    'grad_clip': at_least(0), 'eval_interval': at_least(1), 'eval_iters': Range(lambda v: v == -1 or v >= 1, '-1 (all) or >= 1'),
    'log_interval': at_least(1), 'dtype': one_of('auto', *runtime.DTYPES), 'seed': at_least(0),
}


@torch.no_grad()
def evaluate(model, data, run):
    """Held-out NLL per token of the chosen responses, over eval_iters batches (all with -1), all ranks."""
    model.eval()
    totals = torch.zeros(len(SFT_METRICS), 2, device=run.device)  # (sum, count) of each metric
    for indices, counted in eval_batches(len(data), batch_size, run.rank, run.world_size, eval_iters, fsdp):
        batch_totals = sft_step(model, sft_batch(data, indices, pack).to(run.device), run.autocast)[1]
        totals += batch_totals if counted else 0  # (FSDP: a rank short of batches runs one more, not counted)
    model.train()
    return means(SFT_METRICS, runtime.all_reduce_sum(totals, run), prefix='eval/')


def main(config):
    run = runtime.setup(device, dtype, seed)
    checkpoint, model_from = None, init_from
    if init_from == 'resume':  # the run in out_dir goes on
        checkpoint = runtime.load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), 'cpu', script='sft')
        model_from = checkpoint['config']['init_from']
    if not eval_only:  # stop before anything is written over a run or a model this run reads
        runtime.prepare_out_dir(out_dir, run, checkpoint is not None, overwrite, {'init_from': model_from})
    config = {**config, 'init_from': model_from}  # what the run started from, for every later resume
    if init_from == 'scratch':
        try:
            shape = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model = GPT(shape).to(run.device)
    else:  # a wrong init_from stops here, before any data is read
        model = runtime.load_model(init_from, out_dir, run.device, dropout, checkpoint)
    if max_length > model.config.block_size:
        raise ConfigError(f"max_length={max_length} is longer than the model's block_size {model.config.block_size}")
    parallel.check(fsdp, run)
    with runtime.node_first(run):  # one process a node writes the token cache, the others read it
        train_data = load_dataset(dataset, 'train', data_path, eval_data_path, max_length, max_prompt_length, hh_subsets)
        eval_data = load_dataset(dataset, 'test', data_path, eval_data_path, max_length, max_prompt_length, hh_subsets)
    lengths = train_data.lengths('prompt') + train_data.lengths('chosen')
    loader = PairLoader(lengths, batch_size, seed, run.rank, run.world_size, gradient_accumulation_steps,
                        group_by_length=group_by_length)
    raw_model = model  # the model that is stepped and saved (under FSDP, sharded in place by wrap)
    model = parallel.wrap(raw_model, run, fsdp, compile)  # the one the forward goes through: compiled, DDP or FSDP
    # after wrap: under FSDP the optimizer holds this rank's shards of the parameters and moments
    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == 'float16')  # only float16 needs one
    iter_num = runtime.restore_training_state(checkpoint, optimizer, scaler, loader, run) if checkpoint else 0
    start_iter = iter_num
    del checkpoint  # its tensors live in the model and the optimizer now
    log = runtime.MetricLog(out_dir, run.master and not eval_only, start_iter, wandb_log, wandb_project, wandb_run_name, config)
    peak_flops = runtime.peak_flops(run.device, run.dtype)  # a GPU's published figure, or what bench.py measured
    if run.master:
        print(f"sft: {raw_model.num_params() / 1e6:.1f}M parameters, {run.device}, {run.dtype}, {run.world_size} rank(s); "
              f"{len(train_data)} train / {len(eval_data)} held-out sequences; "
              f"{batch_size * gradient_accumulation_steps * run.world_size} sequences per step")

    while True:
        # evaluate on the held-out chosen responses and save ckpt.pt every eval_interval iterations, and at the end
        due = iter_num % eval_interval == 0 or iter_num == max_iters
        just_resumed = start_iter > 0 and iter_num == start_iter  # the run resumed from evaluated and saved at this iteration
        if eval_only or (due and not just_resumed):
            metrics = evaluate(model, eval_data, run)
            if eval_only:
                runtime.write_eval(metrics, iter_num, out_dir, run)
                break
            log.log(iter_num, metrics)
            runtime.stop_unless_finite(metrics['eval/loss'], iter_num, run, 'held-out loss')  # never save broken weights
            if iter_num > start_iter:
                rng = runtime.rng_states(run)  # every rank's (a collective), so each resumes its own stream
                loader_state = runtime.loader_state(loader, run)  # and its own place in the data (a collective)
                model_state, optimizer_state = parallel.full_state(raw_model, optimizer, run.master)  # (FSDP: gathers)
                if run.master:
                    runtime.save_checkpoint(dict(  # all that a resume needs
                        script='sft', model=model_state, model_args=asdict(raw_model.config),
                        optimizer=optimizer_state, scaler=scaler.state_dict(), iter_num=iter_num,
                        loader=loader_state, rng=rng, config=config),
                        os.path.join(out_dir, 'ckpt.pt'))
        if iter_num >= max_iters:
            break
        # this iteration's learning rate
        lr = runtime.get_lr(iter_num, learning_rate, warmup_iters, decay_lr, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # forward and backward over gradient_accumulation_steps micro-batches, the gradients summed
        t0 = time.perf_counter()
        totals, flops, tokens = torch.zeros(len(SFT_METRICS), 2, device=run.device), 0, 0  # (sum, count) of each metric
        for micro_step in range(gradient_accumulation_steps):
            parallel.sync_gradients(model, micro_step == gradient_accumulation_steps - 1)  # the last micro-step's only
            indices = next(loader)
            batch = sft_batch(train_data, indices, pack).to(run.device)
            loss, batch_totals = sft_step(model, batch, run.autocast)
            scaler.scale(loss / gradient_accumulation_steps).backward()
            totals += batch_totals
            shape = batch.flops_shape()  # (tokens, tokens with a target, attended length), padding not counted
            tokens += shape[0]
            flops += raw_model.flops(*shape)
        runtime.stop_unless_finite(totals[0, 0], iter_num, run)  # the loss's sum: a NaN never reaches the weights
        grad_norm = runtime.optimizer_step(raw_model, optimizer, scaler, grad_clip)  # clip, step, zero the gradients
        iter_num += 1
        if iter_num % log_interval == 0:
            totals = runtime.all_reduce_sum(totals, run)  # means over what the step really had, on all ranks
            sequences = totals[1, 1].item()  # the count of logps/chosen: one a sequence
            log.log(iter_num, {**means(SFT_METRICS, totals), **runtime.speed(t0, sequences, tokens, flops, peak_flops, run, unit='sequences'),
                               'grad_norm': grad_norm, 'lr': lr})
    runtime.finish(run, log)


if __name__ == '__main__':
    configure(globals(), RANGES)
    try:
        main(config_keys(globals()))
    except (ConfigError, LoadError, DataError, runtime.TrainingError) as e:
        runtime.exit_with_error(e)

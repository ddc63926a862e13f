"""
Supervised fine-tuning, the DPO paper's first stage ("Preferred-FT"): maximise the likelihood of the
chosen responses, loss on response tokens only. Its out_dir is the start and the reference of DPO.

    python sft.py config/sft_synthetic.py
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_hh.py

Read it as dpo.py: the settings, then main(): the model, the data, the loop. checkpoint.py and
parallel.py are the guard rails beside it.
"""

import os
import time
from dataclasses import asdict

import torch

import checkpoint
import parallel
from common import one_line_errors
from configurator import configure
from data import PairLoader, load_dataset
from losses import METRICS, held_out_means, means, sft_batch, sft_step
from model import GPT, GPTConfig, get_lr, load_model

# -----------------------------------------------------------------------------
# the model
init_from = 'gpt2'  # a GPT-2 name, hub id or directory, 'scratch' (the shape below), or 'resume'
n_layer = 4  # init_from='scratch' only: the shape of the new model
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0
# LoRA: low-rank adapters trained on the frozen model, which a DPO run's reference then is
lora_rank = 0  # the adapters' rank; 0: no LoRA, every weight trains
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc'  # the layers adapted (model.LORA_TARGETS): all, as here
# the data
dataset = 'synthetic'  # 'hh', 'jsonl' or 'synthetic'
data_path = ''  # dataset='jsonl': the training pairs (their chosen responses)
eval_data_path = ''  # dataset='jsonl': the held-out pairs
hh_subsets = 'all'  # dataset='hh': 'all' or a comma-separated list of subsets
max_length = 512  # prompt + response tokens
max_prompt_length = 256
group_by_length = True  # batches of sequences of similar length: less padding
pack = False  # several sequences a row (block-diagonal causal attention): less padding still
# training
out_dir = 'out-sft'
overwrite = False  # a new run may replace the run in out_dir (its ckpt.pt and metrics.jsonl)
batch_size = 16  # sequences (prompt + chosen) per micro-batch per rank
gradient_accumulation_steps = 4  # sequences a step: batch_size * this * ranks
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
eval_interval = 100  # evaluate on the held-out chosen responses and save ckpt.pt this often
eval_iters = 20  # held-out batches per evaluation, all ranks together; -1: all of them
eval_only = False  # evaluate once, write the metrics, and stop: no training, no checkpoint
log_interval = 10
wandb_log = False
wandb_project = 'nanodpo'
wandb_run_name = 'sft'
# the system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bf16 where the hardware has it, else float16 on a GPU, float32 on a CPU)
compile = False  # torch.compile the model
fsdp = False  # under torchrun: each rank holds 1/N of the model, gradients and AdamW state (FSDP2)
seed = 1337
# -----------------------------------------------------------------------------


def main(config):
    run = parallel.start(device, dtype, seed)  # this process's device, dtype and rank
    # the model
    resuming, resumed = init_from == 'resume', None
    if resuming:  # the run goes on with its own recipe: ckpt.pt's settings, but those given now
        resumed = checkpoint.load(os.path.join(out_dir, 'ckpt.pt'), 'sft', config)
        globals().update(resumed['recipe'])
        config = {**config, **resumed['recipe']}
    model_from = resumed['config']['init_from'] if resumed else init_from
    if not eval_only:  # one run at a time in out_dir, never over another run or a model it reads
        checkpoint.claim_out_dir(out_dir, run, resuming, overwrite, {'init_from': model_from})
    config = {**config, 'init_from': model_from}  # what the run started from, for a resume
    if init_from == 'scratch':
        model = GPT(GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                              dropout=dropout)).to(run.device)
    else:  # a wrong init_from stops here, before any data is read
        lora = (lora_rank, lora_alpha, lora_dropout, lora_targets)  # rank 0: no adapters
        model = load_model(init_from, out_dir, run.device, dropout, checkpoint=resumed,
                       max_length=max_length, lora=lora)
    # the data: tokenized once into the token cache, by one process a node
    with run.node_first():
        train_data = load_dataset(dataset, 'train', data_path, eval_data_path, max_length,
                                  max_prompt_length, hh_subsets)
        eval_data = load_dataset(dataset, 'test', data_path, eval_data_path, max_length,
                                 max_prompt_length, hh_subsets)
    lengths = train_data.lengths('prompt') + train_data.lengths('chosen')
    loader = PairLoader(lengths, batch_size, seed, run.rank, run.world_size,
                        gradient_accumulation_steps, group_by_length=group_by_length)
    # under torchrun: DDP or FSDP (sharded in place); compiled if asked. raw_model: stepped, saved
    raw_model, model = model, parallel.distribute(model, run, fsdp, compile)
    # after distribute: under FSDP the optimizer holds this rank's shards of the weights and moments
    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2),
                                               run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == 'float16')  # float16 only
    iter_num = checkpoint.restore(resumed, optimizer, scaler, loader, run) if resumed else 0
    start_iter = iter_num
    del resumed  # its tensors live in the model and the optimizer now
    log = checkpoint.MetricLog(out_dir, run.master, start_iter, eval_only, wandb_log,
                               wandb_project, wandb_run_name, config)
    log.describe('sft', raw_model, run, len(train_data), len(eval_data), 'sequences',
                 batch_size * gradient_accumulation_steps * run.world_size, 'a step')

    def held_out_totals(indices):  # the totals of a held-out batch of sequences
        return sft_step(model, sft_batch(eval_data, indices, pack).to(run.device), run.autocast)[1]

    if not eval_only:  # SIGTERM, SIGINT: finish the step, save, stop (run.stop_signal)
        run.save_on_signals()
    while True:
        stop = run.stop_signal()  # a signal any rank was sent, else 0
        # evaluate on the held-out chosen responses every eval_interval iterations and at the end,
        # then save ckpt.pt; a resumed run does neither where it starts (the stopped run saved
        # there), a new run only evaluates at iteration 0 (nothing is trained yet)
        evaluate = eval_only or ((iter_num % eval_interval == 0 or iter_num == max_iters)
                                 and (iter_num > start_iter or start_iter == 0))
        if evaluate:  # (held_out_means: eval mode, no dropout, then back to train mode)
            metrics = held_out_means(model, held_out_totals, METRICS['sft'], len(eval_data),
                                     batch_size, eval_iters, run, same_count=fsdp)
            if eval_only:
                log.write_eval(iter_num, metrics)
                break
            log.log(iter_num, metrics)
            run.stop_unless_finite(metrics['eval/loss'], iter_num, 'held-out loss')  # never save it
        if (evaluate or stop) and iter_num > start_iter:  # ckpt.pt: all a resume needs to go on
            # exactly: whole tensors on the CPU (under FSDP gathered from the shards; under LoRA
            # the adapters only), and every rank's place in the data and its torch RNG state (for
            # dropout): collectives, so every rank builds it
            model_state, optimizer_state = run.full_state(raw_model, optimizer)
            ckpt = {'script': 'sft', 'model': model_state,
                    'model_args': asdict(raw_model.config), 'optimizer': optimizer_state,
                    'scaler': scaler.state_dict(), 'iter_num': iter_num, 'config': config,
                    'loader': {**loader.state_dict(), 'ranks': run.gather(loader.position())},
                    'rng': run.rng_states()}
            if run.master:  # written whole or not at all: a failed write keeps the old file
                checkpoint.write(ckpt, os.path.join(out_dir, 'ckpt.pt'))
        if stop:  # after SIGTERM or SIGINT: ckpt.pt holds this iteration; say how to go on
            log.close()
            run.exit_stopped(stop, iter_num, out_dir, 'sft.py')
        if iter_num >= max_iters:
            break
        lr = get_lr(iter_num, learning_rate, warmup_iters, decay_lr, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # forward and backward over gradient_accumulation_steps micro-batches, the gradients summed
        t0 = time.perf_counter()
        totals, flops, tokens = 0, 0, 0  # totals: (sum, count) of each metric
        for micro_step in range(gradient_accumulation_steps):
            if run.ddp:  # DDP all-reduces the gradients in the last micro-step's backward only: the
                # others add to them locally, for free (FSDP reduce-scatters every micro-step)
                model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
            batch = sft_batch(train_data, next(loader), pack).to(run.device)
            loss, batch_totals = sft_step(model, batch, run.autocast)  # NLL per response token
            scaler.scale(loss / gradient_accumulation_steps).backward()
            totals = totals + batch_totals
            shape = batch.flops_shape()  # (tokens, with a target, attended length): no padding
            tokens += shape[0]
            flops += raw_model.flops(*shape)
        run.stop_unless_finite(totals[0, 0], iter_num)  # the loss's sum: no NaN reaches the weights
        # clip the gradient norm (float16: unscaled first), step (skipped on an overflow), zero
        scaler.unscale_(optimizer)
        max_norm = grad_clip if grad_clip > 0 else float('inf')
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        grad_norm = run.full_tensor(grad_norm).item()  # (under FSDP a DTensor over the shards)
        iter_num += 1
        if iter_num % log_interval == 0:  # the step's means over all ranks, and its speed
            totals = run.sum(totals)
            seconds = time.perf_counter() - t0  # (the .item() above waited for the GPU)
            # the sequences: logps/chosen's count
            speed = log.speed(iter_num, max_iters, seconds, 'sequences', totals[1, 1].item(),
                              tokens * run.world_size, flops, run.peak_flops)
            log.log(iter_num, {**means(METRICS['sft'], totals), **speed, 'grad_norm': grad_norm,
                               'lr': lr})
    log.close()
    run.exit_together()


RANGES = {  # what each setting may be: configure() checks them all before any work
    'n_layer': '>= 1', 'n_head': '>= 1', 'n_embd': '>= 1', 'block_size': '>= 2',
    'dropout': '[0, 1)', 'lora_rank': '>= 0', 'lora_alpha': '> 0', 'lora_dropout': '[0, 1)',
    'dataset': ('hh', 'jsonl', 'synthetic'), 'max_length': '>= 2',
    'max_prompt_length': '>= 1', 'batch_size': '>= 1', 'gradient_accumulation_steps': '>= 1',
    'max_iters': '>= 0', 'learning_rate': '> 0', 'warmup_iters': '>= 0', 'lr_decay_iters': '>= 1',
    'min_lr': '>= 0', 'weight_decay': '>= 0', 'beta1': '[0, 1)', 'beta2': '[0, 1)',
    'grad_clip': '>= 0', 'eval_interval': '>= 1', 'eval_iters': '-1 (all) or >= 1',
    'log_interval': '>= 1', 'dtype': ('auto', 'float32', 'bfloat16', 'float16'), 'seed': '>= 0',
}
CHECKS = [  # settings that do not go together, and why: configure() stops on the first that holds
    (lambda c: c['init_from'] == 'scratch' and c['lora_rank'],
     "lora_rank={lora_rank} does not go with init_from='scratch': LoRA adapts a trained model, and "
     "a model made from scratch has nothing to adapt; train it whole (lora_rank=0)"),
    (lambda c: c['init_from'] == 'scratch' and c['n_embd'] % c['n_head'],
     "n_embd={n_embd} is not a multiple of n_head={n_head} (each head takes n_embd / n_head of the "
     "channels)"),
    (lambda c: c['init_from'] == 'scratch' and c['max_length'] > c['block_size'],
     "max_length={max_length} is longer than the model's block_size {block_size}"),
    (lambda c: c['fsdp'] and c['dtype'] == 'float16',
     "fsdp=True does not go with dtype=float16, whose loss scaler does not take sharded gradients: "
     "use bfloat16 (or float32)"),
]


if __name__ == '__main__':
    settings = configure(globals(), RANGES, checks=CHECKS)  # the command line's overrides, checked
    with one_line_errors():  # a user's mistake ends the run with one line, not a traceback
        main(settings)

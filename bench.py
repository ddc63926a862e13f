"""
Benchmark the training and sampling steps, in the nanoGPT tradition: a GPT-2 of a chosen size with
random weights (no download), pairs of random tokens with fixed or HH-like lengths, and the same
code the training scripts run (dpo.pair_step, sft.sft_step, runtime.optimizer_step, GPT.generate).

    python bench.py                                   # gpt2, HH-like lengths, every step
    python bench.py --model=gpt2-medium --dtype=bfloat16 --device=cuda --compile=True --batch_size=16

Prints a table and one JSON line: pairs/s, tokens/s, MFU against the device's peak (on a CPU a
large matmul measured here, in the same dtype), peak memory and the padding fraction.
"""

import json
import resource
import time

import numpy as np
import torch

import dpo
import runtime
import sft
from configurator import configure
from data import PairData, PairLoader, dpo_padding, ragged
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
model = 'gpt2'  # the shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or tiny
batch_size = 4  # pairs per step (SFT: sequences)
lengths = 'hh'  # 'hh': prompts ~160 tokens with a long tail, responses ~70; or 'P,R' fixed, e.g. '160,70'
max_length = 512
max_prompt_length = 256
group_by_length = True
steps = 5  # timed steps of each kind, after warmup_steps
warmup_steps = 2
sample_tokens = 256  # new tokens for the sampling benchmark (batch of 1)
what = 'dpo,dpo_precomputed,sft,sample'
device = 'auto'
dtype = 'auto'
compile = False
seed = 1337
# -----------------------------------------------------------------------------

SHAPES = {'tiny': (2, 2, 64), 'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024),
          'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600)}  # n_layer, n_head, n_embd


def random_pairs(n, rng):
    """PairData of n pairs of random tokens, with HH-like or fixed lengths, truncated as data.py does."""
    if lengths == 'hh':  # medians and spreads of HH-RLHF's token lengths
        prompt = np.minimum(rng.lognormal(np.log(160), 0.7, n), 2000).astype(int) + 1
        chosen, rejected = (np.minimum(rng.lognormal(np.log(70), 0.6, n), 600).astype(int) + 1 for _ in range(2))
    else:
        p, r = (int(x) for x in lengths.split(','))
        prompt, chosen, rejected = np.full(n, p), np.full(n, r), np.full(n, r)
    prompt = np.minimum(prompt, np.where(prompt + np.maximum(chosen, rejected) > max_length, max_prompt_length, prompt))
    chosen, rejected = np.minimum(chosen, max_length - prompt), np.minimum(rejected, max_length - prompt)
    arrays = {}
    for field, lens in (('prompt', prompt), ('chosen', chosen), ('rejected', rejected)):
        arrays[f'{field}_tokens'], arrays[f'{field}_offsets'] = ragged([rng.integers(0, 50256, k) for k in lens])
    return PairData(arrays, {})


def timed(step, run):
    """Seconds per call of step() after warmup_steps calls, and what step returned (FLOPs, pairs, tokens)."""
    for _ in range(warmup_steps):
        step()
    if run.device_type == 'cuda':
        torch.cuda.synchronize()
    t0, totals = time.perf_counter(), np.zeros(3)
    for _ in range(steps):
        totals += step()
    if run.device_type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, totals / steps


def main():
    run = runtime.setup(device, dtype, seed)
    n_layer, n_head, n_embd = SHAPES[model]
    policy = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024)).to(run.device)
    ref = GPT(policy.config).to(run.device).eval().requires_grad_(False)
    optimizer = policy.configure_optimizers(0.0, 1e-6, (0.9, 0.999), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == 'float16')
    step_model, step_ref = (torch.compile(policy), torch.compile(ref)) if compile else (policy, ref)
    data = random_pairs(max(64 * batch_size, 256), np.random.default_rng(seed))
    loader = PairLoader(data.pair_lengths(), batch_size, seed, group_by_length=group_by_length)
    ref_logps = np.random.default_rng(seed).normal(-100, 10, (len(data), 2)).astype(np.float32)
    peak_flops = runtime.device_peak_flops(run.device, run.dtype, n=2048 if run.device_type == 'cpu' else 1024)
    results = {'model': model, 'params_M': policy.num_params() / 1e6, 'device': run.device, 'dtype': run.dtype,
               'batch_size': batch_size, 'lengths': lengths, 'compile': compile, 'peak_tflops': (peak_flops or 0) / 1e12,
               'padding': dpo_padding(data, loader.epoch_batches(0)),
               'padding_plain': dpo_padding(data, PairLoader(data.pair_lengths(), batch_size).epoch_batches(0))}
    rows = []

    def dpo_step(precomputed):
        def step():
            indices = next(loader)
            losses, _, (n_tokens, n_targets, T) = dpo.pair_step(step_model, step_ref, ref_logps if precomputed else None,
                                                                data, indices, run)
            scaler.scale(losses.mean()).backward()
            runtime.optimizer_step(step_model, optimizer, scaler, 1.0)
            flops = policy.flops(n_tokens, n_targets, T) + (0 if precomputed else policy.flops(n_tokens, n_targets, T, False))
            return flops, len(indices), n_tokens
        return step

    def sft_train_step():
        indices = next(loader)
        loss, _, (n_tokens, n_targets, T) = sft.sft_step(step_model, data, indices, run)
        scaler.scale(loss).backward()
        runtime.optimizer_step(step_model, optimizer, scaler, 1.0)
        return policy.flops(n_tokens, n_targets, T), len(indices), n_tokens

    steps_to_run = {'dpo': dpo_step(False), 'dpo_precomputed': dpo_step(True), 'sft': sft_train_step}
    for name in [w for w in what.split(',') if w in steps_to_run]:
        if run.device_type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        seconds, (flops, pairs, tokens) = timed(steps_to_run[name], run)
        memory = (torch.cuda.max_memory_allocated() if run.device_type == 'cuda'
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: the process's peak RSS
        rows.append(dict(step=name, seconds=seconds, pairs_per_sec=pairs / seconds, tokens_per_sec=tokens / seconds,
                         mfu=flops / seconds / peak_flops if peak_flops else float('nan'), peak_memory_GB=memory / 1e9))
    if 'sample' in what:
        policy.eval()
        prompt = [list(range(1000, 1010))]
        for use_cache in (True, False):
            t0 = time.perf_counter()
            with run.autocast:
                out = policy.generate(prompt, sample_tokens, temperature=1.0, eos_token_id=None, use_cache=use_cache,
                                      generator=torch.Generator(run.device).manual_seed(seed))
            seconds = time.perf_counter() - t0
            rows.append(dict(step=f"sample {'with' if use_cache else 'without'} KV cache", seconds=seconds,
                             tokens_per_sec=len(out[0]) / seconds))
    results['steps'] = rows
    print(f"{model} ({results['params_M']:.0f}M), {run.device}, {run.dtype}, batch {batch_size} pairs, lengths {lengths}; "
          f"peak {results['peak_tflops']:.2f} TFLOP/s; padding {results['padding']:.1%} "
          f"({results['padding_plain']:.1%} without grouping by length)")
    print(f"{'step':<28}{'s/step':>9}{'pairs/s':>10}{'tokens/s':>11}{'MFU':>8}{'peak mem GB':>13}")
    for r in rows:
        print(f"{r['step']:<28}{r['seconds']:>9.3f}{r.get('pairs_per_sec', float('nan')):>10.2f}"
              f"{r['tokens_per_sec']:>11.1f}{r.get('mfu', float('nan')):>8.1%}{r.get('peak_memory_GB', float('nan')):>13.2f}")
    print(json.dumps(results))


if __name__ == '__main__':
    configure(globals())
    main()

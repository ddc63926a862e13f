"""
Benchmark the training and sampling steps, in the nanoGPT tradition: a GPT-2 of a chosen size with
random weights (no download), pairs of random tokens with fixed or HH-like lengths, and the same
code the training scripts run (losses.dpo_step, losses.sft_step, their optimizer step, GPT.generate).

    python tools/bench.py                                   # gpt2, HH-like lengths, every step
    python tools/bench.py --padding=True --batch_size=64 --dataset=hh  # only the padding of ways to batch HH
    python tools/bench.py --model=gpt2-medium --dtype=bfloat16 --device=cuda --compile=True --batch_size=16

Prints a table and one JSON line: pairs/s, tokens/s, MFU against the device's peak, peak memory and
the padding fraction. On a CPU the peak is a large matmul measured here, in the same dtype; it is
cached (parallel.PEAK_CACHE), so that training logs an MFU on this CPU too without measuring anything.
"""

import json
import os
import re
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

import parallel
from common import atomic_open, one_line_errors
from configurator import configure
from data import DATA_CACHE_DIR, PairData, PairLoader, load_dataset
from losses import dpo_batch, dpo_step, pack_bins, sft_batch, sft_step
from model import GPT, GPTConfig, BaseOf, add_lora

# -----------------------------------------------------------------------------
model = 'gpt2'  # the shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or tiny
batch_size = 4  # pairs per step (SFT: sequences)
lengths = 'hh'  # 'hh': prompts ~160 tokens with a long tail, responses ~70; or 'P,R' fixed, e.g. '160,70'
max_length = 512
max_prompt_length = 256
group_by_length = True
pack = False  # several sequences a row with block-diagonal attention (dpo.py's and sft.py's pack)
steps = 2  # timed steps of each kind, after warmup_steps (5 and 2: steadier; docs/PERFORMANCE.md times the default run)
warmup_steps = 1
sample_tokens = 128  # new tokens for the sampling benchmark (docs/PERFORMANCE.md's table: 256)
sample_batch = 1  # prompts sampled together
sample_prompt = 10  # tokens in each prompt (HH's prompts: about 160)
what = 'dpo,sft,sample'  # of 'dpo', 'dpo_precomputed' (the reference's log-probs precomputed), 'sft', 'sample'
device = 'auto'
dtype = 'auto'
compile = False
profile = False  # also profile three steps of the first of what, and print where the time goes
fsdp = False  # under torchrun: the policy and the reference sharded as dpo.py's fsdp=True does; the memory columns are this rank's
padding = False  # only the padding of each way of batching a dataset (dataset=...), no model
dataset = 'synthetic'  # padding=True: 'hh', 'jsonl' (data_path) or 'synthetic'
data_path = ''
cache_dir = ''  # padding=True: where the token cache goes ('' is the project's data_cache/)
lora_rank = 0  # > 0: the policy is the model frozen with rank-lora_rank adapters on every projection, the reference it with them off (dpo.py's LoRA)
memory_plan = False  # also the GB per GPU of a DPO step for every GPT-2 size, DDP and FSDP, from this run's measured bytes
seed = 1337
# -----------------------------------------------------------------------------
RANGES = {'batch_size': '>= 1', 'max_length': '>= 2', 'max_prompt_length': '>= 1', 'steps': '>= 1',
          'warmup_steps': '>= 0', 'sample_tokens': '>= 1', 'sample_batch': '>= 1',
          'sample_prompt': '>= 1', 'seed': '>= 0', 'lora_rank': '>= 0'}

GPT2_SHAPES = {  # n_layer, n_head, n_embd of each official size
    'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600),
}
SHAPES = {'tiny': (2, 2, 64), **GPT2_SHAPES}


def optimizer_step(model, optimizer, scaler, grad_clip):
    """As sft.py's and dpo.py's loops step: unscale (fp16), clip, step, zero the gradients."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return (grad_norm.full_tensor() if parallel.is_sharded(grad_norm) else grad_norm).item()


def dpo_cells(data, batches, pack=False):
    """(real tokens, cells) over the DPO batches, cells being what the forward passes compute:
    padded, 2B rows as long as the batch's longest sequence; packed, pairs (prompt once, both
    responses) laid out by pack_bins."""
    prompt, chosen, rejected = data.lengths('prompt'), data.lengths('chosen'), data.lengths('rejected')
    real = cells = 0
    for b in batches:
        if pack:
            lengths = prompt[b] - 1 + chosen[b] + rejected[b]  # a pair's unit
            n_rows = len(pack_bins(lengths))
        else:
            lengths = np.concatenate([prompt[b] + chosen[b] - 1, prompt[b] + rejected[b] - 1])
            n_rows = len(lengths)
        real, cells = real + lengths.sum(), cells + n_rows * lengths.max()
    return int(real), int(cells)


def dpo_padding(data, batches, pack=False):
    """The share of padding among all cells of the DPO batches (see dpo_cells)."""
    real, cells = dpo_cells(data, batches, pack)
    return 1.0 - real / cells


def print_padding():
    """padding=True: the padding of each way of batching a dataset's training pairs."""
    data = load_dataset(dataset, 'train', data_path, '', max_length, max_prompt_length,
                        cache_dir=cache_dir or DATA_CACHE_DIR)
    n = min(batch_size, len(data))
    for grouped in (False, True):
        batches = PairLoader(data.pair_lengths(), n, group_by_length=grouped).epoch_batches(0)
        print(f"DPO batches of {n} pairs{', grouped by length' if grouped else ''}:")
        for pack in (False, True):  # packing saves cells twice: less padding, and each prompt once
            real, cells = dpo_cells(data, batches, pack)
            print(f"  {'packed' if pack else 'padded rows'}: {1 - real / cells:.1%} padding, "
                  f"{cells / len(data):.0f} token cells a pair")



def measure_cpu_peak(dtype, n=2048, reps=8):
    """The best rate of a large matmul in dtype on this CPU, FLOP/s, written to parallel.PEAK_CACHE
    under the CPU's name, core count and dtype (a CPU has no one published peak)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, dtype=parallel.DTYPES[dtype], generator=generator) for _ in range(2))
    a @ b  # warm up
    best = float('inf')
    for _ in range(3):  # the best of three: a peak, not a mean over whatever else the machine was doing
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    peak = 2 * n ** 3 * reps / best
    try:
        with open(parallel.PEAK_CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    cache[f"{parallel.cpu_name()} {os.cpu_count()} cores {dtype}"] = peak
    with atomic_open(parallel.PEAK_CACHE) as f:
        json.dump(cache, f, indent=2)
    return peak


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
    lengths_by_field = (('prompt', prompt), ('chosen', chosen), ('rejected', rejected))
    return PairData.from_sequences({field: [rng.integers(0, 50256, k) for k in lens] for field, lens in lengths_by_field}, {})


def timed(step, run):
    """Seconds per call of step() after warmup_steps calls, and the mean of what step returned (FLOPs, pairs, tokens, targets)."""
    for _ in range(warmup_steps):
        step()
    if run.device_type == 'cuda':
        torch.cuda.synchronize()
    t0, totals = time.perf_counter(), np.zeros(4)
    for _ in range(steps):
        totals += step()
    if run.device_type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, totals / steps


@contextmanager
def quiet_stderr():
    """Standard error silenced inside: torch.profiler's CPU build writes a 'USDT: ... profiler_start'
    line there for every use. An exception inside still reaches the user, once stderr is back."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_allocation_peak(fn):
    """fn()'s result, and the most bytes of CPU tensors it held at once beyond those alive before it:
    the running sum of torch.profiler's allocation and free events, the CPU counterpart of
    torch.cuda.max_memory_allocated (what malloc keeps of freed memory does not count)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with quiet_stderr(), torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    held = np.cumsum([nbytes for _, nbytes in events])
    return result, max(0, int(held.max())) if len(held) else 0


def local(t):
    """This rank's part of a tensor: under FSDP a shard's own, else the tensor."""
    return t.to_local() if parallel.is_sharded(t) else t


def local_bytes(tensors):
    """Bytes of these tensors on this rank: under FSDP a sharded tensor's own shard only."""
    return sum(local(t).nbytes for t in tensors)


def memory_accounting(step, indices, policy, ref, optimizer, run):
    """One more step, on the batch indices, with this rank's bytes counted as the step holds them
    (under FSDP each rank's shares; the bytes per parameter are over the whole model's parameters):
        weights      the policy's parameters             gradients   at the optimizer step (a pre-hook)
        reference    the reference's parameters          optimizer   AdamW's moments, after the step
        saved        what autograd saves for backward, in three parts: weight copies (autocast's
                     low-precision casts of the weights, known by their shape; FSDP's gathered
                     weights are parameters, not counted), logits (the one copy at the target
                     positions), activations
    need: their sum. peak: the most tensor memory held at once, the allocator's on CUDA, on a CPU the
    tensors alive before the step plus the most it allocated at once (cpu_allocation_peak)."""
    n_params = sum(p.numel() for p in policy.parameters())  # the whole model's (a DTensor's numel is global)
    weight_shapes = {tuple(p.shape) for p in policy.parameters() if p.dim() == 2}
    own = {local(p).untyped_storage().data_ptr() for p in policy.parameters()}
    saved, grads = {}, []

    def pack(t):  # a storage counted once, however many tensors view it
        storage = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter) and storage.data_ptr() not in own:
            kind = ('weight copies' if tuple(t.shape) in weight_shapes and t.dtype != torch.float32 else
                    'logits' if t.dim() == 2 and t.shape[-1] >= policy.config.vocab_size else 'activations')
            saved[storage.data_ptr()] = (kind, storage.nbytes())
        return t

    hook = optimizer.register_step_pre_hook(lambda *_: grads.append(local_bytes(
        p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None)))
    state_bytes = lambda: local_bytes(t for state in optimizer.state.values() for t in state.values()
                                      if torch.is_tensor(t) and t.dim() > 0)
    weights = local_bytes(policy.parameters())
    reference = local_bytes(ref.parameters()) if isinstance(ref, torch.nn.Module) else 0  # LoRA: none
    alive = weights + reference + state_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if run.device_type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            alive = torch.cuda.memory_allocated()
            _, pairs, n_tokens, n_targets = step(indices)
            peak = torch.cuda.max_memory_allocated()
        else:
            (_, pairs, n_tokens, n_targets), extra = cpu_allocation_peak(lambda: step(indices))
            peak = alive + extra
    hook.remove()
    parts = {'weights': weights, 'reference': reference, 'gradients': grads[0], 'optimizer': state_bytes()}
    for kind in ('weight copies', 'logits', 'activations'):
        parts[kind] = sum(nbytes for k, nbytes in saved.values() if k == kind)
    need = sum(parts.values())
    return dict(peak_GB=peak / 1e9, need_GB=need / 1e9, peak_over_need=peak / need,
                bytes_per_param={k: parts[k] / n_params for k in ('weights', 'reference', 'gradients', 'optimizer',
                                                                  'weight copies')},
                activation_bytes_per_token=parts['activations'] / n_tokens,
                logits_bytes_per_target=parts['logits'] / n_targets if n_targets else 0.0,
                saved_MB_per_pair=(parts['activations'] + parts['logits']) / pairs / 1e6,
                logits_MB_per_pair=parts['logits'] / pairs / 1e6)


PLAN_TOKENS = 4 * 2 * 512  # config/hh.py's micro-batch at its longest: 4 pairs, 2 sequences each, max_length 512
PLAN_GPUS = (24, 40, 80)  # GB
PLAN_HEADROOM = 0.9  # a step fits a GPU when it needs at most this share of its memory (CUDA's context, fragmentation)


def plan_memory(measured):
    """The GB per GPU of one DPO step for every GPT-2 size, under DDP and under FSDP on 2, 4 and 8
    GPUs, with the reference live or precomputed, for PLAN_TOKENS tokens every one of which has a
    target (an upper bound). From measured, a dpo row of a one-process run (as a DDP rank holds):
    its bytes per parameter, its activation bytes per token scaled by n_layer * n_embd to each size,
    and its logits' bytes per target. FSDP divides the weights, the reference, the gradients and the
    moments by the GPUs (as the 2-rank measurement shows), and holds gathered weights: the root's (the
    embeddings) in float32 with autocast's bf16 copy of the output layer, and two blocks' (one
    computing, one prefetched) in bf16.
    A markdown table; a cell is 'GB (the smallest of PLAN_GPUS that it fits)'."""
    fits = lambda b: next((f"{g}" for g in PLAN_GPUS if b <= PLAN_HEADROOM * g * 1e9), '> 80')
    per_param, (L0, _, C0) = measured['bytes_per_param'], SHAPES[measured['model']]
    per_layer_width = measured['activation_bytes_per_token'] / (L0 * C0)
    lines = ['| model | reference | DDP | FSDP, 2 GPUs | FSDP, 4 GPUs | FSDP, 8 GPUs |', '|---|---|---|---|---|---|']
    for name, (L, H, C) in GPT2_SHAPES.items():
        with torch.device('meta'):  # the shape, with no memory
            shape = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=1024))
        P, block = sum(p.numel() for p in shape.parameters()), sum(p.numel() for p in shape.transformer.h[0].parameters())
        saved = PLAN_TOKENS * (per_layer_width * L * C + measured['logits_bytes_per_target'])
        for live in ((True,) if measured['lora_rank'] else (True, False)):
            state = P * (per_param['weights'] + per_param['gradients'] + per_param['optimizer'] +
                         (per_param['reference'] if live else 0))
            cells = [state + P * per_param['weight copies'] + saved]
            root = P - L * block  # the embeddings (tied to the output layer) and the final LayerNorm
            gathered = root * 4 + 2 * block * 2 + shape.config.vocab_size * C * 2  # and the output layer's bf16 copy
            for gpus in (2, 4, 8):
                cells.append(state / gpus + gathered + saved)
            kind = f"LoRA r={measured['lora_rank']}: adapters off" if measured['lora_rank'] else 'live' if live else 'precomputed'
            lines.append(f"| {name} | {kind} | " +
                         ' | '.join(f"{b / 1e9:.1f} ({fits(b)})" for b in cells) + ' |')
    return '\n'.join(lines)


def profile_step(step, run):
    """Where the time of three steps goes: torch.profiler's busiest operators (by their own time on
    the device: GPU kernels on CUDA, CPU time on a CPU), and the share of a few kinds of work."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = run.device_type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with quiet_stderr(), torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    sort_by = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
    # first match wins, so the specific kinds come first: flash attention's kernels carry 'cutlass' in
    # their names, and a fused Triton kernel is named after the ops it fused ('to_copy_add_layer_norm')
    kinds = {'attention': r'flash|fmha|attention|sdpa', 'optimizer': r'adam',
             'log-probs (logsumexp, exp, gather)': r'logsumexp|exp|gather|scatter|softmax',
             'matmul': r'gemm|matmul|\bmm\b|addmm|linear|cutlass|sm90_xmma|nvjet',
             'copies, casts and fused elementwise': r'copy|cast|contiguous|cat|triton'}
    totals, whole = dict.fromkeys(kinds, 0.0), 0.0
    for event in prof.key_averages():
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # CPU-side operators: their kernels are counted on the device
        t = event.self_device_time_total if cuda else event.self_cpu_time_total
        whole += t
        kind = next((k for k, pattern in kinds.items() if re.search(pattern, event.key, re.IGNORECASE)), None)
        if kind:
            totals[kind] += t
    print('where the time goes: ' + ', '.join(f"{k} {v / whole:.0%}" for k, v in totals.items())
          + f", other {1 - sum(totals.values()) / whole:.0%}")


def main():
    if memory_plan and ('dpo' not in what.split(',') or 'RANK' in os.environ):
        sys.exit("error: memory_plan=True measures the dpo step (what=dpo) of one process (no torchrun)")
    run = parallel.start(device, dtype, seed)
    n_layer, n_head, n_embd = SHAPES[model]
    policy = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024)).to(run.device)
    if lora_rank:  # one model: the adapters trained, the reference the base with them off
        ref = BaseOf(add_lora(policy, lora_rank, 2.0 * lora_rank))
    else:
        ref = GPT(policy.config).to(run.device).eval().requires_grad_(False)
    # under torchrun, as dpo.py spreads them (DDP, or FSDP with fsdp=True); compiled with compile=True
    step_model, step_ref = parallel.distribute(policy, run, fsdp, compile), parallel.distribute(ref, run, fsdp, compile, forward_only=True)
    optimizer = policy.configure_optimizers(0.0, 1e-6, (0.9, 0.999), run.device_type)  # after wrap: FSDP's shards
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == 'float16')
    data = random_pairs(max(64 * batch_size * run.world_size, 256), np.random.default_rng(seed))
    loader = PairLoader(data.pair_lengths(), batch_size, seed, run.rank, run.world_size, group_by_length=group_by_length)
    ref_logps = np.random.default_rng(seed).normal(-100, 10, (len(data), 2)).astype(np.float32)
    peak_flops = run.peak_flops if run.device_type == 'cuda' else measure_cpu_peak(run.dtype)
    results = {'model': model, 'params_M': policy.num_params() / 1e6, 'lora_rank': lora_rank, 'device': run.device, 'dtype': run.dtype,
               'batch_size': batch_size, 'lengths': lengths, 'group_by_length': group_by_length, 'pack': pack,
               'compile': compile, 'peak_tflops': (peak_flops or 0) / 1e12}
    plain, grouped = (PairLoader(data.pair_lengths(), batch_size, seed, group_by_length=g).epoch_batches(0) for g in (False, True))
    results['padding'] = {'plain': dpo_padding(data, plain), 'grouped': dpo_padding(data, grouped),
                          'plain_packed': dpo_padding(data, plain, True), 'grouped_packed': dpo_padding(data, grouped, True)}
    rows = []

    def dpo_train_step(precomputed):  # as dpo.py's loop runs it, with one micro-step
        def step(indices=None):
            indices = next(loader) if indices is None else indices
            batch = dpo_batch(data, indices, pack).to(run.device)
            batch_ref_logps = torch.from_numpy(ref_logps[indices]).to(run.device) if precomputed else None
            losses, _ = dpo_step(step_model, step_ref, batch, batch_ref_logps, run.autocast, beta=0.1)
            scaler.scale(losses.mean()).backward()
            optimizer_step(policy, optimizer, scaler, 1.0)
            n_tokens, n_targets, attended = batch.flops_shape()
            flops = policy.flops(n_tokens, n_targets, attended) + (
                0 if precomputed else policy.flops(n_tokens, n_targets, attended, backward=False))
            return flops, len(indices), n_tokens, n_targets
        return step

    def sft_train_step(indices=None):  # as sft.py's loop runs it
        indices = next(loader) if indices is None else indices
        batch = sft_batch(data, indices, pack).to(run.device)
        loss, _ = sft_step(step_model, batch, run.autocast)
        scaler.scale(loss).backward()
        optimizer_step(policy, optimizer, scaler, 1.0)
        n_tokens, n_targets, attended = batch.flops_shape()
        return policy.flops(n_tokens, n_targets, attended), len(indices), n_tokens, n_targets

    # the batch with the most cells, for the memory accounting: the step whose memory is the largest
    largest = max(loader.epoch_batches(0), key=lambda b: len(b) * (data.lengths('prompt')[b] + np.maximum(
        data.lengths('chosen')[b], data.lengths('rejected')[b])).max())
    steps_to_run = {'dpo': dpo_train_step(False), 'dpo_precomputed': dpo_train_step(True), 'sft': sft_train_step}
    for name in [w for w in what.split(',') if w in steps_to_run]:
        if run.master:  # a gpt2 step takes seconds on a CPU: say what is being timed, as it starts
            print(f"{name}: {warmup_steps} warm-up and {steps} timed steps of {model}, batch {batch_size}, then one "
                  "more on the largest batch, its memory counted ...", flush=True)
        seconds, (flops, pairs, tokens, _) = timed(steps_to_run[name], run)
        rows.append(dict(step=name, seconds=seconds, pairs_per_sec=pairs / seconds, tokens_per_sec=tokens / seconds,
                         mfu=flops / seconds / peak_flops if peak_flops else float('nan'),
                         **memory_accounting(steps_to_run[name], largest, policy, ref, optimizer, run)))
        # at once, so that a run cut short (a compile that outlasts a time limit) still says something
        if run.master:
            print(f"{name}: {seconds:.3f} s/step, {pairs / seconds:.2f} pairs/s, MFU {rows[-1]['mfu']:.1%}", flush=True)
    if profile:
        profile_step(steps_to_run[what.split(',')[0]], run)
    if 'sample' in what and not run.ddp:  # (under torchrun the ranks' models are wrapped, or sharded)
        policy.eval().to(parallel.DTYPES[run.dtype])  # as sample.py does: the weights themselves cast, no autocast
        prompt = [list(range(1000, 1000 + sample_prompt))] * sample_batch
        for use_cache in (True, False):
            print(f"sampling {sample_tokens} new tokens for {sample_batch} prompt(s) of {sample_prompt} tokens, "
                  f"{'with the KV cache' if use_cache else 'recomputing every step'} ...", flush=True)
            t0 = time.perf_counter()
            out = policy.generate(prompt, sample_tokens, temperature=1.0, eos_token_id=None, use_cache=use_cache,
                                  generator=torch.Generator(run.device).manual_seed(seed))
            seconds = time.perf_counter() - t0
            rows.append(dict(step=f"sample {'with' if use_cache else 'without'} KV cache", seconds=seconds,
                             tokens_per_sec=sum(map(len, out)) / seconds))
            print(f"{rows[-1]['step']}: {seconds:.2f} s, {rows[-1]['tokens_per_sec']:.0f} tokens/s", flush=True)
    results['steps'] = rows
    if run.master:
        report(results, rows, run)
    run.exit_together()


def report(results, rows, run):
    """The table, the bytes per parameter, the memory plan (memory_plan=True) and the JSON line."""
    pad = results['padding']
    print(f"{model} ({results['params_M']:.0f}M), {run.device}, {run.dtype}, batch {batch_size} pairs, lengths {lengths}, "
          f"group_by_length {group_by_length}, pack {pack}; peak {results['peak_tflops']:.2f} TFLOP/s")
    print(f"DPO padding: plain {pad['plain']:.1%}, grouped by length {pad['grouped']:.1%}, packed {pad['plain_packed']:.1%}, "
          f"grouped and packed {pad['grouped_packed']:.1%}")
    print(f"{'step':<26}{'s/step':>8}{'pairs/s':>9}{'tokens/s':>10}{'MFU':>7}{'peak GB':>9}{'need GB':>9}{'ratio':>7}"
          f"{'act MB/pair':>13}{'logits MB/pair':>16}")
    columns = (('pairs_per_sec', 9, '.2f'), ('tokens_per_sec', 10, '.1f'), ('mfu', 7, '.1%'), ('peak_GB', 9, '.2f'),
               ('need_GB', 9, '.2f'), ('peak_over_need', 7, '.2f'), ('saved_MB_per_pair', 13, '.1f'),
               ('logits_MB_per_pair', 16, '.1f'))
    for r in rows:  # '-' where a figure does not apply (sampling has no pairs, MFU or memory accounting)
        print(f"{r['step']:<26}{r['seconds']:>8.3f}" + ''.join(
            f"{format(r[key], spec) if key in r else '-':>{width}}" for key, width, spec in columns))
    print("(pairs/s and MB/pair of the sft row count sequences, one per pair)")
    layout = f"{'FSDP' if fsdp else 'DDP'}, {run.world_size} rank(s)" if run.ddp else "one process"
    for r in rows:
        if 'bytes_per_param' in r:
            print(f"{r['step']}, bytes per parameter on each rank ({layout}): " + ', '.join(
                f"{k} {v:.2f}" for k, v in r['bytes_per_param'].items()) +
                f"; activations {r['activation_bytes_per_token'] / 1e3:.1f} KB per token")
    if memory_plan:
        dpo_row = next(r for r in rows if r['step'] == 'dpo')
        print(f"\nGB per GPU of a DPO step, config/hh.py's micro-batch at its longest ({PLAN_TOKENS} tokens):")
        print(plan_memory({'model': model, 'lora_rank': lora_rank, **dpo_row}))
    print(json.dumps(results))


if __name__ == '__main__':
    configure(globals(), RANGES)
    with one_line_errors():  # a missing file, no internet for HH: one line, not a traceback
        if padding:
            print_padding()
        else:
            main()

"""
Sample from a trained checkpoint (init_from='resume' reads out_dir/ckpt.pt) or from a GPT-2 by
name, hub id or hub-layout directory:

    python sample.py --init_from=gpt2 --start="The meaning of life is" --num_samples=3 --top_p=0.9

The samples are drawn batch_size at a time, each batch with the KV cache.
"""

import os
import time

import torch

from common import UserError, one_line_errors
from configurator import configure
from data import encode, response_text
from losses import sequence_logps
from model import EOT_TOKEN, load_model
from parallel import DTYPES, resolve_device, resolve_dtype

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', a hub id or a directory
out_dir = 'out'
start = ''  # the prompt, or 'FILE:path' to read it from a file; '' starts from <|endoftext|> (unconditional)
num_samples = 3
batch_size = 64  # samples drawn together: the KV cache and logits of this many must fit in memory
max_new_tokens = 256
temperature = 1.0  # 0 is greedy; below 1 sharper, above 1 more random
top_k = None  # e.g. 50: sample only among the 50 likeliest tokens
top_p = None  # e.g. 0.9: sample only among the likeliest tokens that make up 90% of the probability
seed = 1337
device = 'auto'  # 'auto' (cuda if there is one, else cpu), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bf16 where the hardware has it, float16 on older GPUs, else float32), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the forward pass (pays off for long or many samples on a GPU)
use_cache = True  # False recomputes the whole context for every new token (for comparison only)
ref_from = ''  # a reference model: order the samples by the implicit reward beta * log(pi / pi_ref), best first
beta = 0.1
# -----------------------------------------------------------------------------
RANGES = {  # what each setting may be: configure() checks them all before any work
    'num_samples': '>= 1', 'batch_size': '>= 1', 'max_new_tokens': '>= 1', 'temperature': '>= 0',
    'top_k': 'None or >= 1', 'top_p': 'None or (0, 1]', 'seed': '>= 0',
    'dtype': ('auto', *DTYPES), 'beta': '> 0',
}


def read_prompt(start):
    """The prompt text: start itself, or the contents of the file that 'FILE:path' names."""
    if not start.startswith('FILE:'):
        return start
    path = start[len('FILE:'):]
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read the prompt file {path}: {e.strerror}") from None
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt file {path} is not UTF-8 text (byte {raw[e.start]:#04x} at "
                        f"offset {e.start})") from None


def check_memory(config, rows, length, dtype_bytes, device):
    """Refuse, before any work, a batch whose generation would not fit in the device's free memory:
    about the KV cache (keys and values of every layer, every position) and the float32 logits over
    the vocabulary three times (logits, probabilities, the draw)."""
    need = 2 * config.n_layer * rows * length * config.n_embd * dtype_bytes + 3 * rows * config.vocab_size * 4
    if device.startswith('cuda'):
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')
    if need > free:
        raise UserError(f"batch_size={rows} samples of up to {length} tokens at a time need about "
                        f"{need / 1e9:.1f} GB (KV cache and logits), and {device} has {free / 1e9:.1f} GB "
                        f"free: lower --batch_size (about {max(1, int(rows * free / need / 2))} fits)")


def main():
    run_device = resolve_device(device)
    run_dtype = resolve_dtype(dtype, run_device)
    if init_from == 'resume' and not os.path.isfile(os.path.join(out_dir, 'ckpt.pt')):
        raise UserError(f"no checkpoint at {os.path.join(out_dir, 'ckpt.pt')}: name the model to sample from, "
                        "--init_from=gpt2 (or gpt2-medium, a hub id, a hub-layout directory, a run's out_dir "
                        "such as out-demo/dpo-beta0.1), or the run with --out_dir=DIR")
    print(f"device {run_device}, dtype {run_dtype}")
    model = load_model(init_from, out_dir, run_device)
    model.eval()
    # sampling only: cast the weights themselves (no autocast), so each step reads half the bytes
    model.to(DTYPES[run_dtype])
    if compile:
        model.forward = torch.compile(model.forward, dynamic=True)

    prompt = read_prompt(start)
    prompt_ids = encode(prompt) or [EOT_TOKEN]  # GPT-2's unconditional samples start after <|endoftext|>
    generator = torch.Generator(device=run_device).manual_seed(seed)
    rows = min(batch_size, num_samples)
    check_memory(model.config, rows, min(len(prompt_ids) + max_new_tokens, model.config.block_size),
                 DTYPES[run_dtype].itemsize, run_device)
    t0 = time.perf_counter()
    samples = []
    for i in range(0, num_samples, rows):
        samples += model.generate([prompt_ids] * min(rows, num_samples - i), max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator, use_cache=use_cache)
    seconds = time.perf_counter() - t0
    rewards = [None] * num_samples
    if ref_from:  # "your language model is secretly a reward model": rank by beta * log(pi / pi_ref)
        ref = load_model(ref_from, out_dir, run_device).eval().to(DTYPES[run_dtype])
        rows = [prompt_ids] * num_samples
        rewards = beta * (sequence_logps(model, rows, samples) - sequence_logps(ref, rows, samples))
        order = sorted(range(num_samples), key=lambda i: -rewards[i])
        samples, rewards = [samples[i] for i in order], [float(rewards[i]) for i in order]
    for i, (tokens, reward) in enumerate(zip(samples, rewards)):
        print(f"\n==================== sample {i + 1}/{num_samples}" +
              (f" (implicit reward {reward:.3f})" if reward is not None else ""))
        print(prompt + response_text(tokens))
    n_tokens = sum(len(s) for s in samples)
    print(f"\n{n_tokens} tokens in {seconds:.2f}s: {n_tokens / seconds:.1f} tokens/s "
          f"({num_samples} samples, {rows} a batch, {'with' if use_cache else 'without'} KV cache)")

if __name__ == '__main__':
    configure(globals(), RANGES)
    with one_line_errors():
        main()

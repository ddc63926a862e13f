# Preferred-FT (the DPO paper's SFT stage) of GPT-2 on Anthropic HH-RLHF: maximise the likelihood
# of the chosen responses, one epoch.
#   python sft.py config/sft_hh.py                                   # one GPU
#   torchrun --standalone --nproc_per_node=8 sft.py config/sft_hh.py  # eight: lower gradient_accumulation_steps to 1
# Arithmetic:
#   HH train: 160,800 rows; prompts p50 ~160 tokens, chosen responses ~70 (python data.py --dataset=hh)
#   64 sequences per step (8 x 8 accumulation on one GPU) x ~230 tokens = ~15k tokens per step
#   one epoch = 160,800 / 64 = ~2,500 steps
#   FLOPs per step = 6 * 124M params * 15k tokens = ~11 TFLOP; on one H100 (989 TFLOP/s bf16) at
#   40% MFU that is ~0.03 s a step, ~1.5 min an epoch, before data and eval. Measured on a 2-core
#   CPU (AMD EPYC, bf16): ~450 tokens/s for DPO's forward+backward, so an epoch there takes days.
init_from = 'gpt2'       # or gpt2-medium, gpt2-large, gpt2-xl
dataset = 'hh'
max_length = 512         # the DPO paper's code: 512 tokens, of which at most 256 of prompt
max_prompt_length = 256
out_dir = 'out-sft-hh'
batch_size = 8
gradient_accumulation_steps = 8
max_iters = 2500
learning_rate = 1e-5
warmup_iters = 150
decay_lr = True
lr_decay_iters = 2500
min_lr = 1e-6
grad_clip = 1.0
eval_interval = 250
eval_iters = 64          # 64 x 8 = 512 held-out pairs of the 8,552 in HH's test split
log_interval = 10

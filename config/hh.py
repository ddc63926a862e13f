# DPO of the SFT model of config/sft_hh.py on Anthropic HH-RLHF, with the DPO paper's recipe:
# beta 0.1, learning rate 1e-6 with 150 warmup steps then constant, 64 pairs per step.
#   python sft.py config/sft_hh.py && python dpo.py config/hh.py
#   torchrun --standalone --nproc_per_node=8 dpo.py config/hh.py --gradient_accumulation_steps=2
# Arithmetic:
#   64 pairs per step = batch_size 4 x 16 accumulation on one GPU (4 x 2 x 8 on eight)
#   each pair is two rows (chosen, rejected) of ~230 tokens: ~29k tokens per step
#   one epoch = 160,800 / 64 = ~2,500 steps
#   FLOPs per step = policy 6N + reference 2N per token = 8 * 124M * 29k = ~29 TFLOP; on one H100
#   at 25% MFU (measured by tools/bench.py for gpt2-medium, eager, 48 pairs a micro-batch; 20% at 16)
#   ~0.12 s a step, ~5 min an epoch. Micro-batches of 4 pairs leave a GPU mostly idle: where memory
#   allows, raise batch_size and lower gradient_accumulation_steps to keep 64 pairs a step.
#   precompute_ref_logps=True drops the reference's 2N from every step (and its memory) after one
#   pass over the data; pack=True computes each prompt once (~a third fewer tokens at HH's lengths).
init_from = 'out-sft-hh'
dataset = 'hh'
max_length = 512
max_prompt_length = 256
out_dir = 'out-dpo-hh'
beta = 0.1
loss_type = 'sigmoid'
batch_size = 4
gradient_accumulation_steps = 16
max_iters = 2500
learning_rate = 1e-6
warmup_iters = 150
decay_lr = False
grad_clip = 10.0
eval_interval = 250
eval_iters = 128         # 128 x 4 = 512 held-out pairs
log_interval = 10

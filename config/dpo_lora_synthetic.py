# DPO with LoRA on the embedded task: config/dpo_synthetic.py's recipe, but the SFT model stays
# frozen and only rank-32 adapters on every attention and MLP projection train (lora_rank), so the
# reference is the SFT model with the adapters off: one copy of the weights in memory.
#   python sft.py config/sft_synthetic.py && python dpo.py config/dpo_lora_synthetic.py
# Measured from the demo's SFT model (seed 1337, float32, true reward 0.365; scored as the demo
# scores, 200 held-out prompts x 4 samples), 300 steps each:
#   full DPO (config/dpo_synthetic.py):   true reward 0.522, KL 0.30, win rate 0.649
#   lora_rank 32, alpha 64, lr 1e-3:      true reward 0.433, KL 0.29, win rate 0.584
#   lora_rank 8, alpha 16, lr 1e-3:       true reward 0.400, KL 0.23, win rate 0.567
#   lora_rank 8, alpha 16, lr 3e-3:       true reward 0.399, KL 0.31, win rate 0.569
init_from = 'out-sft-synthetic'
dataset = 'synthetic'
max_length = 64
max_prompt_length = 32
out_dir = 'out-dpo-lora-synthetic'
beta = 0.1
rpo_alpha = 1.0  # as config/dpo_synthetic.py: plain DPO lowers the shared tokens too
lora_rank = 32
lora_alpha = 64.0
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 300
learning_rate = 1e-3  # adapters start at zero and move little per step: LoRA wants a larger rate
warmup_iters = 20
eval_interval = 100
eval_iters = -1
log_interval = 25

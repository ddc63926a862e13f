# DPO on the embedded task, starting from (and against) the SFT model of config/sft_synthetic.py.
#   python sft.py config/sft_synthetic.py && python dpo.py config/dpo_synthetic.py
init_from = 'out-sft-synthetic'
dataset = 'synthetic'
max_length = 64
max_prompt_length = 32
out_dir = 'out-dpo-synthetic'
beta = 0.1
batch_size = 32
gradient_accumulation_steps = 1  # 32 pairs = 64 rows of ~36 tokens per step
max_iters = 300
learning_rate = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = -1                  # all 1,000 held-out pairs
log_interval = 25

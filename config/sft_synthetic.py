# SFT of a small GPT from scratch on the embedded task (in data.py): it learns the review format
# and the demonstrators' mixed quality. Runs on a laptop CPU in a few minutes.
#   python sft.py config/sft_synthetic.py
init_from = 'scratch'
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64      # prompts are <= 28 tokens, responses <= 22 (python data.py --dataset=synthetic)
dataset = 'synthetic'
max_length = 64
max_prompt_length = 32
out_dir = 'out-sft-synthetic'
batch_size = 32
gradient_accumulation_steps = 1  # 32 sequences of ~36 tokens = ~1,150 tokens per step
max_iters = 600                  # ~1 epoch of the 20,000 chosen responses
learning_rate = 1e-3             # a small model from scratch takes a large rate
warmup_iters = 50
lr_decay_iters = 600
min_lr = 1e-4
eval_interval = 200
eval_iters = -1                  # all 1,000 held-out pairs: 32 batches
log_interval = 50

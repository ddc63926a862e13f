# Online DPO on the embedded task, from (and against) the SFT model of config/sft_synthetic.py:
# each step samples two responses per prompt from the policy as it is, the task's true reward
# picks the better one (a tie gives no pair), and the policy takes a DPO step on those pairs.
#   python sft.py config/sft_synthetic.py && python dpo.py config/online_synthetic.py
# judge='implicit:out-dpo-synthetic' ranks the samples by an offline DPO run's implicit reward instead
# (on this task the policy soon writes text that judge scores high and the true reward -1: README, the DPO family).
init_from = 'out-sft-synthetic'
dataset = 'synthetic'            # its prompts; its held-out pairs for the eval/ metrics
max_length = 64
max_prompt_length = 32
out_dir = 'out-online-synthetic'
online = True
judge = 'true_reward'
online_temperature = 1.0
online_max_new_tokens = 32
beta = 0.1
rpo_alpha = 1.0                  # as config/dpo_synthetic.py
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 300
learning_rate = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = -1
log_interval = 25

# DPO on the embedded task, starting from (and against) the SFT model of config/sft_synthetic.py.
#   python sft.py config/sft_synthetic.py && python dpo.py config/dpo_synthetic.py
# The SFT run above trained a GPT from scratch (4 layers, 4 heads, n_embd 128, block_size 64;
# 7M parameters) for about one epoch of the 20,000 chosen responses; its out_dir holds ckpt.pt.
# This run's path through the code, in dpo.py's main(): model.load_model and load_reference (the
# policy and the reference: two copies of that ckpt.pt) -> data.load_dataset (synthetic_source;
# the token cache the SFT run wrote with these lengths, else tokenize_pairs; truncate cuts nothing,
# prompts are <= 28 tokens, responses <= 22, as python data.py --dataset=synthetic prints) ->
# PairLoader (grouped by length) -> AdamW (GPT.configure_optimizers, model.get_lr) ->
# batch_losses: losses.dpo_batch (pad_rows) -> dpo_step (chosen_rejected_logps: GPT.forward,
# target_logprobs) -> preference_loss (sigmoid, + rpo_alpha); losses.held_out_means;
# run.full_state, checkpoint.write. No KTO, online, LoRA, packing or precomputed reference.
# The logged loss includes RPO's NLL, so it does not start at ln 2.
init_from = 'out-sft-synthetic'  # the policy starts as that model; the reference: a frozen copy
dataset = 'synthetic'
max_length = 64
max_prompt_length = 32
out_dir = 'out-dpo-synthetic'
beta = 0.1
# RPO: plus the chosen response's NLL per token. Plain DPO lowers the log-probs of chosen and
# rejected alike, and on this task it lowered those of the tokens they share too, so samples lost
# words and scored -1 as malformed. Measured when the recipe was chosen, on an SFT model at 0.36
# true reward, by python tools/evaluate.py --init_from=OUT_DIR --num_prompts=100 (x 4 samples):
#   plain DPO, lr 1e-4: true reward -0.97 (KL 359, collapsed); lr 1e-5: 0.12 (KL 1.4)
#   rpo_alpha=1: lr 3e-5: 0.44 (KL 0.15); lr 1e-4: 0.56 (KL 0.37)
rpo_alpha = 1.0
batch_size = 32
gradient_accumulation_steps = 1  # 32 pairs = 64 rows of ~36 tokens per step
max_iters = 300                  # 9,600 pairs: about half an epoch of the 20,000
learning_rate = 1e-4
warmup_iters = 20
eval_interval = 100              # evaluated at 0, 100, 200, 300; ckpt.pt (one file) written at
                                 # 100, 200 and 300
eval_iters = -1                  # all 1,000 held-out pairs
log_interval = 25

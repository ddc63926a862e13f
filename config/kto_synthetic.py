# KTO on the embedded task, from (and against) the SFT model of config/sft_synthetic.py. Each
# preference pair gives two unpaired rows: its chosen response as desirable, its rejected one as
# undesirable (a JSONL file of prompt/completion/label rows works the same, with dataset='jsonl').
#   python sft.py config/sft_synthetic.py && python dpo.py config/kto_synthetic.py
init_from = 'out-sft-synthetic'
dataset = 'synthetic'
max_length = 64
max_prompt_length = 32
out_dir = 'out-kto-synthetic'
loss_type = 'kto'
beta = 0.1
# plus a desirable row's NLL per token, as config/dpo_synthetic.py adds RPO's to DPO, for the same
# reason: KTO too lowered the log-probs of every completion, desirable ones included, until samples
# fell apart. Measured (200 held-out prompts x 4 samples, SFT model at 0.338 true reward, beta 0.05):
#   lr 1e-4: true reward -0.01 (KL 93); lr 3e-5: -0.74 (KL 10); rpo_alpha=1, lr 1e-4: 0.42 (KL 0.19)
#   (before KTO's mismatched rows stopped sharing a prompt; since: 0.43, KL 0.18)
# With it, in the README's family figure (2 seeds): beta 0.05, 0.1, 0.5 give 0.43, 0.47, 0.54 (KL 0.23, 0.28, 0.63).
rpo_alpha = 1.0
batch_size = 64                  # rows: the 32 pairs of config/dpo_synthetic.py's step
gradient_accumulation_steps = 1
max_iters = 300
learning_rate = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = -1                  # all 2,000 held-out rows
log_interval = 25

"""
GPT-2 in one file, in a learner's order: the config, attention, the MLP, the block, the GPT with its
forward pass (logits, or the log-probs of targets), the training helpers (AdamW's groups, FLOPs),
generation (GPT.generate: sample.py, evaluation and online DPO's sampling; an offline step never
calls it), and the learning-rate schedule get_lr. That first section is all of GPT-2's math.
TargetLogProbs (in target_logprobs) and onednn_off (in generate) lead to later sections, each
doing what its plain form beside it does, only faster or leaner (and tested against it). The
sections, after the first:
- the model a script starts from (load_model: a run's ckpt.pt, model_from_checkpoint, or a GPT-2
  from the hub), and the frozen reference (load_reference);
- reading a checkpoint and checking a loaded model (the guard rails of load_model, just below it);
- loading and saving the official weights in the Hugging Face hub layout;
- the memory-lean log-probs of targets (TargetLogProbs), beside the plain form;
- what generate uses: the KV cache, and the next token's choice (top-k, top-p, temperature);
- the CPU decoding speed-ups (onednn_off for one-row steps; inverse_cdf_draw, torch.multinomial's
  draw);
- LoRA: adapters on a frozen GPT, and load_adapted (a LoRA run's model from its checkpoint).

Datasets, losses and distributed training are in other files; of the project's own modules this
one imports only common.py (UserError, atomic_open, first_line, hub_file) and, for the hint on a
run that does not exist yet, configurator.py.
References: OpenAI's GPT-2 TensorFlow code, Hugging Face transformers' modeling_gpt2.py, nanoGPT.
"""

import hashlib
import json
import math
import os
import re
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from common import UserError, atomic_open, first_line, hub_file
from configurator import missing_run_hint

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>: ends every document, and every response here


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence, = the number of learned positions
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # GPT-2 has biases in every Linear and LayerNorm

    def __post_init__(self):  # a shape that cannot be built is refused here, in words
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} must be a whole number >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head} "
                             "(each head takes n_embd / n_head of the channels)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        # q, k, v at once
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, H, S, D), S = positions so far
        # attn_mask None means plain causal attention over positions 0..T-1 (no cache, no padding):
        # is_causal lets scaled_dot_product_attention pick the flash kernel where there is one
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2 used the tanh approximation ("gelu_new")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameters, counted once despite the tying. Positions are left out by default: they
        cost no matmul, while the token embedding does, as the output layer."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # ---------------------------------------------------------------- forward

    def hidden_states(self, idx, position_ids=None, attn_mask=None, kv_cache=None):
        """Final-LayerNorm outputs (B, T, n_embd) for token ids idx (B, T).

        position_ids: (B, T), or None for kv_cache.pos + 0..T-1 (0..T-1 without a cache).
        attn_mask: (B, 1, T, S) bool, True where a query may look at a key (S = keys, cached ones
        included), or None for plain causal attention over a sequence that starts at position 0.
        """
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)  # (T,), broadcast over B
        if attn_mask is None and past > 0:  # generation: new tokens after cached ones
            attn_mask = self._after_cache_mask(T, past, idx.device)
        x = self.transformer.drop(
            self.transformer.wte(idx) + self.transformer.wpe(position_ids))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None, position_ids=None, attn_mask=None, kv_cache=None,
                last_only=False):
        """Without targets: logits (B, T, vocab) at every position, or (B, 1, vocab) with last_only.

        With targets (B, T): log p(targets[b, t] | idx[b, :t+1]) as a (B, T) tensor, exactly 0 where
        targets == -1. The vocabulary projection then runs only at positions that have a target, so
        prompt and padding positions cost no logits, and no fp32 copy of all logits is ever made.
        (One method for both, so that DDP, which hooks forward, sees the training computation.)
        """
        x = self.hidden_states(idx, position_ids, attn_mask, kv_cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)
        return self.target_logprobs(x, targets)

    # not compiled (parallel.compiled leaves it eager): the number of targets changes every batch
    def target_logprobs(self, x, targets):
        """(B, T) log-probs of targets (B, T) from final hidden states x (B, T, C):
        log_softmax(x @ lm_head.weight.T) at each target, 0 where targets == -1."""
        keep = targets != -1  # (B, T)
        x, weight = x[keep], self.lm_head.weight  # (N, C) for the N positions with a target
        if torch.is_autocast_enabled(x.device.type):  # the dtype autocast would give the projection
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        # that, as plain_target_logprobs computes it, but with one low-precision copy of the logits
        # and no float32 one (tested equal; section "memory-lean log-probs"); logp is float32
        # (float64 for a float64 model)
        logp = TargetLogProbs.apply(x, weight, targets[keep])  # (N,)
        out = torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device)
        return out.masked_scatter(keep, logp)  # (B, T)

    # ---------------------------------------------------------------- training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (matmul weights, embeddings) only, never on biases
        or LayerNorm gains; the fused kernel on CUDA and on CPU (one pass over each tensor
        instead of a dozen)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type in ('cuda', 'cpu'))

    def flops(self, n_tokens, n_targets, seq_len, backward=True):
        """Matmul FLOPs (PaLM appendix B, as in nanoGPT) of a forward, and with backward also the
        backward, over n_tokens tokens in sequences of seq_len, of which n_targets have a target:
        per token 2 per weight of the blocks plus 4 * n_layer * n_embd * seq_len for attention's
        QK^T and AV; per target 2 * vocab * n_embd for the vocabulary projection. The backward is
        twice the forward when every weight trains (the gradients of each matmul's input and of its
        weight); with frozen weights (LoRA) it is the inputs' gradients (the forward again, and
        attention's a second time: both its operands are activations) plus 2 per trained weight."""
        c = self.config
        head = 2 * c.vocab_size * c.n_embd
        attention = 4 * c.n_layer * c.n_embd * seq_len
        forward = n_tokens * (2 * self.num_params() - head + attention) + n_targets * head
        if not backward:
            return forward
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if trained == self.num_params(non_embedding=False):
            return 3 * forward
        return 2 * forward + n_tokens * (attention + 2 * trained)

    # ---------------------------------------------------------------- generation
    # (sample.py, tools/evaluate.py, online DPO's sampling: an offline step never calls it; get_lr,
    # the schedule, follows the class)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=EOT_TOKEN, generator=None, use_cache=True):
        """Continue each prompt by up to max_new_tokens tokens; returns the new tokens of each row
        as a list of lists, each ending at its first eos_token_id (kept) if one was drawn.

        prompts: a list of token-id lists of any lengths, or a (B, T) tensor.
        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p. generator: a torch.Generator on the model's device, for a seed.
        Prompts of different lengths are left-padded, with an attention mask that hides the padding
        and position ids that start at 0 on each row's first real token, so a row gives the same
        tokens in a batch as alone. Past block_size the context is cropped to its last block_size
        tokens, as in nanoGPT; from there on each step recomputes the window without the cache.
        """
        rows = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("generate needs at least one prompt, "
                             "and every prompt at least one token")
        device = self.lm_head.weight.device
        B, T0 = len(rows), max(len(r) for r in rows)
        idx = torch.zeros(B, T0, dtype=torch.long, device=device)    # (B, T0) left-padded prompts
        valid = torch.zeros(B, T0, dtype=torch.bool, device=device)  # (B, T0) False on padding
        for b, r in enumerate(rows):
            idx[b, T0 - len(r):] = torch.tensor(r, device=device)
            valid[b, T0 - len(r):] = True
        block_size = self.config.block_size
        kv_cache = (KVCache(self.config.n_layer, min(block_size, T0 + max_new_tokens))
                    if use_cache else None)
        out = [[] for _ in range(B)]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            if kv_cache is not None and idx.size(1) > kv_cache.max_len:
                kv_cache = None  # the window has to slide: positions shift, cached keys are stale
            if kv_cache is not None:
                new = idx[:, kv_cache.pos:]  # the whole prompt first, then one token at a time
                # a CPU speed-up (last section)
                with onednn_off(device.type == 'cpu' and new.numel() == 1):
                    logits = self(new, None, *self._positions_and_mask(valid, kv_cache.pos),
                                  kv_cache, last_only=True)
            else:
                window, window_valid = idx[:, -block_size:], valid[:, -block_size:]
                logits = self(window, None, *self._positions_and_mask(window_valid, 0),
                              last_only=True)
            next_token = sample_next_token(logits[:, -1, :].float(), temperature, top_k, top_p,
                                           generator)  # (B,)
            next_token = torch.where(finished, eos_token_id if eos_token_id is not None else 0,
                                     next_token)
            for b, t in enumerate(next_token.tolist()):
                if not finished[b]:
                    out[b].append(t)
            if eos_token_id is not None:
                finished |= next_token == eos_token_id
            idx = torch.cat([idx, next_token[:, None]], dim=1)  # (B, T+1)
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            if finished.all():
                break
        return out

    @staticmethod
    def _after_cache_mask(T, past, device):
        """(T, past + T) bool: causal attention for T new tokens after past cached positions."""
        if T > 1:  # a chunk after cached positions: causal, shifted by the cache (bottom-right)
            return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)
        # one new token may look at everything before it; the mask spans every key, since CUDA's
        # memory-efficient kernel refuses a mask broadcast along its last dimension
        return torch.ones(1, past + 1, dtype=torch.bool, device=device)

    @staticmethod
    def _positions_and_mask(valid, past):
        """Position ids and attention mask for the positions past.. of rows whose padding valid
        marks (B, S). Returns ((B, T) positions, (B, 1, T, S) mask or None when nothing is
        padded)."""
        B, S = valid.shape
        # 0 at each row's first real token
        position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
        if valid.all():
            return position_ids, None
        T = S - past
        causal = torch.ones(T, S, dtype=torch.bool, device=valid.device).tril(past)  # (T, S)
        mask = causal & valid[:, None, :]  # (B, T, S): no query looks at padding
        # a padding query would see no key and give NaN; let it see itself (its output is unused)
        query_pos = torch.arange(past, S, device=valid.device)  # (T,)
        mask |= query_pos[:, None] == torch.arange(S, device=valid.device)  # (T, S) the diagonal
        return position_ids, mask[:, None]  # (B, 1, T, S)


def get_lr(it, learning_rate, warmup_iters, decay_lr, lr_decay_iters, min_lr):
    """The learning rate of iteration it: a linear warmup over warmup_iters (iteration 0 takes
    learning_rate / (warmup_iters + 1)), then constant (decay_lr=False, the DPO paper's schedule) or
    a cosine decay to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


# ---------------------------------------------------------------- the models a script starts from

def load_model(init_from, out_dir='out', device='cpu', dropout=0.0, checkpoint=None,
               max_length=None, lora=None):
    """The model a script starts from: 'resume' is out_dir/ckpt.pt (or the checkpoint dict given,
    already read); a directory holding a ckpt.pt (an SFT run's out_dir) is that checkpoint; anything
    else goes to from_pretrained, below (a GPT-2 name, a hub id or a hub-layout directory). A LoRA
    run's checkpoint holds only its adapters: its base is loaded from where the run started, and
    the adapters are merged into it (kept apart for 'resume'). lora: (rank, alpha, dropout,
    targets) to add new adapters on top (add_lora). max_length: the data's longest sequence, which
    must fit the model's block_size."""
    resuming = init_from == 'resume'
    if resuming or os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
        path = os.path.join(out_dir if resuming else init_from, 'ckpt.pt')
        checkpoint = checkpoint or read_checkpoint(path)  # on the CPU: the weights go to device
        model = model_from_checkpoint(path, checkpoint, dropout, merge_adapters=not resuming)
    else:
        model = from_pretrained(init_from, dropout=dropout)
    check_weights(model, init_from, max_length)  # no NaN, and block_size holds the longest sequence
    if lora and lora[0] and not lora_layers(model):
        add_lora(model, *lora)
    return model.to(device)


def model_from_checkpoint(path, checkpoint, dropout, merge_adapters):
    """load_model's model from a checkpoint dict (read from path): its model_args and weights, or
    for a LoRA run its base with the adapters loaded (merged into the base if merge_adapters)."""
    if 'model_args' not in checkpoint or 'model' not in checkpoint:
        raise UserError(f"{path} has no 'model_args' and 'model' entries: not a checkpoint of "
                        "this project")
    if 'lora_base_sha256' in checkpoint['model']:
        model = load_adapted(path, checkpoint, dropout)  # (in the LoRA section, last)
        return merge_lora(model) if merge_adapters else model
    try:
        model = GPT(GPTConfig(**{**checkpoint['model_args'], 'dropout': dropout}))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: its model_args do not make a model: {e}") from None
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit its model_args: {e}") from e
    return model


def load_reference(source, policy, device, resumed=None):
    """The frozen reference (eval mode, no gradients) and the sha256 of its weights. It must have
    the policy's shape, and a resumed run must find the very weights it started against. A policy
    with LoRA adapters has its reference in itself: its base, the adapters off (BaseOf)."""
    if lora_layers(policy):
        ref, sha256 = BaseOf(policy), lora_base_sha256(policy)
    else:
        ref = load_model(source, device=device).eval().requires_grad_(False)
        if {**asdict(ref.config), 'dropout': 0} != {**asdict(policy.config), 'dropout': 0}:
            raise UserError(f"the reference ({source}) has the shape {asdict(ref.config)}, but the "
                            f"policy has {asdict(policy.config)}")
        sha256 = weights_sha256(ref)
    if resumed and resumed.get('ref_sha256', sha256) != sha256:
        raise UserError(f"the reference {source} is not the model this run trained against: its "
                        "weights changed since the run started (sha256 differs); resume with the same "
                        "reference")
    return ref, sha256


# ------------------------------------------------------------ a checkpoint read, a model checked
# (what load_model and load_reference call; each check stops with one line naming the file)

def read_checkpoint(path):
    """A ckpt.pt's dict, as torch.save wrote it: only tensors and plain values are unpickled, and
    the tensors are memory-mapped (a node's ranks share the pages)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        size = os.path.getsize(path)
        raise UserError(f"{path} is not a readable checkpoint: " + ("the file is empty" if size == 0
                        else f"its {size} bytes are not the zip archive that torch.save writes"))
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint: {type(e).__name__}: "
                        f"{first_line(e)}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint's dict")
    return checkpoint


def check_weights(model, source, max_length=None):
    """A UserError for a model with a NaN or infinite weight (which would only show as a NaN loss
    later), or whose block_size is shorter than the data's longest sequence, max_length."""
    for name, t in model.state_dict().items():
        if not torch.isfinite(t).all():
            raise UserError(f"the model {source} is broken: its weight {name} holds "
                            f"{(~torch.isfinite(t)).sum().item()} NaN or infinite values; start "
                            "from another checkpoint")
    if max_length is not None and max_length > model.config.block_size:
        raise UserError(f"max_length={max_length} is longer than the model's block_size "
                        f"{model.config.block_size}")


def weights_sha256(model):
    """A fingerprint of a model's weights: the sha256 of its state dict's names and bytes."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # no copy of the bytes
    return digest.hexdigest()


# ---------------------------------------------------------------- loading and saving the hub layout

# the four official sizes, by their short names, and where the hub keeps them
OFFICIAL_MODELS = {
    'gpt2':        'openai-community/gpt2',         # 124M
    'gpt2-medium': 'openai-community/gpt2-medium',  # 350M
    'gpt2-large':  'openai-community/gpt2-large',   # 774M
    'gpt2-xl':     'openai-community/gpt2-xl',      # 1558M
}


# GPT-2 was written with a "Conv1D" layer whose weight is (in, out), the transpose of nn.Linear's
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight',
                  'mlp.c_fc.weight', 'mlp.c_proj.weight')
# the official files also hold each layer's causal-mask buffer, which is not a weight
MASK_BUFFER = re.compile(r'h\.\d+\.attn\.(masked_)?bias$')


def from_pretrained(name_or_dir, dropout=0.0, cache_dir=None):
    """A GPT-2 from the hub or a local hub-layout directory (config.json + model.safetensors).

    name_or_dir: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', a hub id ('openai-community/gpt2'),
    or a directory. Downloads go to the normal hub cache (or cache_dir) and are reused from it.
    """
    try:
        config_path, weights_path = resolve_pretrained_files(name_or_dir, cache_dir)
    except UserError as e:  # an out_dir not made yet: the hint names the command that makes it
        raise UserError(f"{e}{missing_run_hint(name_or_dir)}") from None
    model = GPT(config_from_hub_json(config_path, dropout))
    from safetensors.torch import load_file  # safetensors holds only tensors: nothing runs on load
    try:
        state_dict = load_file(weights_path)
    except Exception as e:
        raise UserError(f"{weights_path} is not a readable safetensors file: {e}") from e
    load_hub_state_dict(model, state_dict, weights_path)
    return model

def load_hub_state_dict(model, state_dict, path='state dict'):
    """Copy in weights whose keys follow either layout found in the wild: the official repos'
    ('h.0.attn.c_attn.weight', with mask buffers, no lm_head) or transformers' save_pretrained
    ('transformer.h.0...'). Conv1D weights are transposed to nn.Linear's (out, in)."""
    ours = model.state_dict()
    ours.pop('lm_head.weight')  # the same tensor as transformer.wte.weight
    found, lm_head = {}, None  # our key -> (key in the file, tensor)
    for key, t in state_dict.items():
        if key == 'lm_head.weight':
            lm_head = t
            continue
        name = key if key.startswith('transformer.') else 'transformer.' + key
        if MASK_BUFFER.search(name):
            continue
        if name not in ours:
            raise UserError(f"{path}: unexpected key '{key}', which is not part of a GPT-2")
        found[name] = (key, t.t() if name.endswith(CONV1D_WEIGHTS) else t)
    prefix = 'transformer.' if any(k.startswith('transformer.') for k in state_dict) else ''
    for name, param in ours.items():
        if name not in found:
            raise UserError(f"{path}: missing key '{prefix}{name.removeprefix('transformer.')}'")
        key, t = found[name]
        if t.shape != param.shape:
            raise UserError(f"{path}: key '{key}' has shape {tuple(t.shape)} (as stored), "
                            f"but the config asks for {tuple(param.shape)}")
    if lm_head is not None and not torch.equal(lm_head, found['transformer.wte.weight'][1]):
        raise UserError(f"{path}: lm_head.weight differs from the token embedding; "
                        "GPT-2 ties them and this model does too")
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(found[name][1])

def save_pretrained(model, save_dir):
    """Write config.json and model.safetensors in the layout transformers' save_pretrained uses,
    so GPT2LMHeadModel.from_pretrained(save_dir) (and GPT.from_pretrained) load it. Each file is
    written whole or not at all."""
    if not model.config.bias:
        raise ValueError("a model with bias=False has no GPT-2 hub layout "
                         "(GPT-2 has biases everywhere)")
    from safetensors.torch import save  # the file's bytes
    tensors = {}
    for name, t in model.state_dict().items():
        if name == 'lm_head.weight':
            continue  # tied: transformers rebuilds it from the token embedding
        tensors[name] = (t.t() if name.endswith(CONV1D_WEIGHTS) else t).detach().cpu().contiguous()
    c = model.config
    hub_config = dict(
        model_type='gpt2', architectures=['GPT2LMHeadModel'],
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
        n_ctx=c.block_size, vocab_size=c.vocab_size, n_inner=None, activation_function='gelu_new',
        layer_norm_epsilon=1e-5, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        tie_word_embeddings=True, scale_attn_weights=True,
        torch_dtype=str(next(iter(tensors.values())).dtype).removeprefix('torch.'))
    if EOT_TOKEN < c.vocab_size:
        hub_config.update(bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN)
    # each file written whole or not at all (atomic_open), with a normal file's mode
    with atomic_open(os.path.join(save_dir, 'model.safetensors'), 'wb') as f:
        f.write(save(tensors, metadata={'format': 'pt'}))
    with atomic_open(os.path.join(save_dir, 'config.json')) as f:
        json.dump(hub_config, f, indent=2)


def resolve_pretrained_files(name_or_dir, cache_dir=None):
    """Paths (config.json, model.safetensors) of a local hub-layout directory, or of a hub model
    fetched with huggingface_hub (only these two files, into the normal hub cache)."""
    if os.path.isdir(name_or_dir):
        paths = tuple(os.path.join(name_or_dir, f) for f in ('config.json', 'model.safetensors'))
        if not any(os.path.isfile(p) for p in paths):  # load_model found no ckpt.pt there either
            raise UserError(f"{name_or_dir} holds no model: neither a run's ckpt.pt (sft.py and "
                            "dpo.py write it at their first eval_interval) nor config.json and "
                            "model.safetensors (the Hugging Face hub layout)")
        for p in paths:
            if not os.path.isfile(p):
                raise UserError(f"{p} does not exist: a model directory needs config.json and "
                                "model.safetensors (the Hugging Face hub layout)")
        return paths
    repo_id = OFFICIAL_MODELS.get(name_or_dir, name_or_dir)
    if (name_or_dir.startswith(('.', '/', '~')) or os.path.exists(name_or_dir)
            or repo_id.count('/') != 1):
        raise UserError(f"'{name_or_dir}' is not a directory, nor a model name "
                        f"({', '.join(OFFICIAL_MODELS)}) nor a hub id like openai-community/gpt2")
    hint = "pass a local hub-layout directory"
    paths = [hub_file(repo_id, f, cache_dir=cache_dir, offline_hint=hint)
             for f in ('config.json', 'model.safetensors')]
    return tuple(paths)


def config_from_hub_json(path, dropout=0.0):
    """GPTConfig from a transformers GPT2Config file; refuses variants this model does not
    compute."""
    try:
        with open(path) as f:
            hub = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON file: {e}") from e
    for key in ('n_layer', 'n_head', 'n_embd', 'n_positions', 'vocab_size'):
        if key not in hub:
            raise UserError(f"{path}: missing key '{key}'")
    same_math = {  # key: (value GPT-2 has, values this implementation accepts)
        'model_type': ('gpt2', ('gpt2',)),
        'activation_function': ('gelu_new', ('gelu_new', 'gelu_pytorch_tanh')),
        'layer_norm_epsilon': (1e-5, (1e-5,)),
        'n_inner': (None, (None, 4 * hub['n_embd'])),
        'scale_attn_weights': (True, (True,)),
        'scale_attn_by_inverse_layer_idx': (False, (False,)),
        'tie_word_embeddings': (True, (True,)),
    }
    for key, (default, accepted) in same_math.items():
        if hub.get(key, default) not in accepted:
            raise UserError(f"{path}: {key}={hub[key]!r} is not supported "
                            f"(this GPT-2 computes {default!r})")
    try:
        return GPTConfig(block_size=hub['n_positions'], vocab_size=hub['vocab_size'],
                         n_layer=hub['n_layer'], n_head=hub['n_head'], n_embd=hub['n_embd'],
                         dropout=dropout, bias=True)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


# ---------------------------------------------------------------- memory-lean log-probs of targets

def plain_target_logprobs(x, weight, targets):
    """log_softmax(x @ weight.T)[n, targets[n]] for N rows x (N, C), the plain way: what
    TargetLogProbs computes, and what it is tested against. It keeps the (N, vocab) logits and a
    float32 log-softmax of them for the backward pass."""
    # at least float32
    logits = (x @ weight.T).to(torch.promote_types(x.dtype, torch.float32))  # (N, V)
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)


class TargetLogProbs(torch.autograd.Function):
    """log_softmax(x @ weight.T)[n, targets[n]] for N rows, keeping one copy of the (N, vocab)
    logits in the compute dtype and nothing else of that size: the log-sum-exp is taken in float32
    a chunk of rows at a time, and the backward pass turns the saved logits into the log-prob's
    gradient, onehot - softmax, chunk by chunk. F.cross_entropy would keep a float32 log-softmax
    (twice the bytes of bf16 logits) for its backward, and make float32 copies on the way in and
    out."""

    # float32 elements per chunk of rows: 64 MB, a few chunks (few kernel launches) at most
    CHUNK = 2 ** 24
    PAD_VOCAB_ON = ('cuda',)  # device types whose matmuls want the vocabulary padded (below)

    @staticmethod
    def forward(ctx, x, weight, targets):  # x (N, C), weight (V, C), targets (N,): dtypes as given
        V = weight.size(0)
        # on CUDA, pad the vocabulary to a multiple of 64 (50257 -> 50304): with rows of an odd
        # length the matmul falls back to slower kernels (docs/PERFORMANCE.md has what that cost)
        pad = -V % 64 if x.device.type in TargetLogProbs.PAD_VOCAB_ON else 0
        with torch.autocast(x.device.type, enabled=False):
            # the one copy of the logits; its padding columns go unused
            logits = x @ F.pad(weight, (0, 0, 0, pad)).T  # (N, V + pad)
            # float32, or float64 for float64 inputs
            acc = torch.promote_types(logits.dtype, torch.float32)
            lse = torch.empty(len(x), dtype=acc, device=x.device)  # (N,)
            rows = max(1, TargetLogProbs.CHUNK // V)
            for i in range(0, len(x), rows):
                lse[i:i + rows] = torch.logsumexp(logits[i:i + rows, :V].to(acc), dim=-1)
            logp = logits.gather(1, targets[:, None]).squeeze(1).to(acc) - lse  # (N,)
        ctx.save_for_backward(x, weight, targets, logits, lse)
        ctx.rows = rows
        return logp

    @staticmethod
    def backward(ctx, grad):  # grad (N,), lse's dtype
        x, weight, targets, logits, lse = ctx.saved_tensors
        V, rows = weight.size(0), ctx.rows
        with torch.autocast(x.device.type, enabled=False):
            # rows as long as the logits' (aligned): a view of an (N, V + pad) buffer
            grad_logits = torch.empty_like(logits)[:, :V]  # (N, V)
            for i in range(0, len(x), rows):
                g = grad[i:i + rows, None]  # (n, 1)
                chunk = (logits[i:i + rows, :V].to(lse.dtype)
                         - lse[i:i + rows, None]).exp_().mul_(-g)  # -g * softmax
                # g * (onehot - softmax)
                grad_logits[i:i + rows] = chunk.scatter_add_(1, targets[i:i + rows, None], g)
            return grad_logits @ weight, grad_logits.T @ x, None  # (N, C), (V, C)


# -------------------------------------------------------- what generate uses: KV cache, next token

class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated up to max_len.

    k, v: (n_layer, B, n_head, max_len, head_dim), allocated on the first write, in the dtype the
    attention computes in (so it follows autocast or a bf16 model).
    """

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None
        self.pos = 0  # positions filled so far; GPT.hidden_states advances it after the last layer

    def update(self, layer, k, v):
        # k, v: (B, n_head, T, head_dim) for the T new positions
        B, H, T, D = k.shape
        if self.k is None:
            shape = (self.n_layer, B, H, self.max_len, D)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H, pos+T, D) each


def top_k_filter(logits, k):
    """logits (B, V) with all but the k largest of each row set to -inf (ties with the k-th
    kept)."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float('-inf'))


def top_p_filter(logits, p):
    """logits (B, V) keeping, per row, the smallest set of likeliest tokens whose probability
    reaches p (nucleus sampling); the likeliest token is always kept."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of the tokens ranked above
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float('-inf'))


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V): greedy at temperature 0, else drawn from the
    temperature-scaled distribution after the top-k and top-p filters."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    # torch.multinomial(probs, 1)'s draw, faster (next section)
    return inverse_cdf_draw(probs, generator)


# ---------------------------------------------------------------- CPU decoding speed-ups

@contextmanager
def onednn_off(off=True):
    """oneDNN (mkldnn) off inside, when off. A cached step of one row is a matrix-vector product for
    each weight, bound by reading the weights; in bf16 on a CPU, PyTorch's own kernel reads them
    about twice as fast as oneDNN's (docs/PERFORMANCE.md). From two rows on oneDNN's matmul is the
    faster; float32 and float16 do not go through it."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and not off
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def inverse_cdf_draw(probs, generator=None):
    """One token id per row of probs (B, V), drawn with its probability, as
    torch.multinomial(probs, 1) draws it (tested against the distribution)."""
    # Inverse-CDF draw: one uniform a row, and the first token whose cumulative probability passes
    # it. torch.multinomial draws an exponential for every vocabulary entry instead, many times
    # slower on a CPU. float64, so the running sum over 50257 tokens stays exact enough that no
    # token's share of [0, total) is visibly off.
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1), 1 up to rounding
    u = torch.rand(probs.size(0), 1, dtype=cdf.dtype, device=cdf.device,
                   generator=generator) * total  # (B, 1)
    # u < total even after rounding
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    # right=True: the first i with cdf[i] > u >= cdf[i-1], so probs[i] > 0; a filtered token is
    # never drawn
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # (B,)


# ---------------------------------------------------------------- LoRA: adapters on a frozen GPT
# LoRA (Hu et al., 2021) trains a low-rank update of chosen linear layers and freezes everything
# else: layer(x) + dropout(x) @ A.T @ B.T * (alpha / rank), A (rank, in) random, B (out, rank) zero,
# so that the adapted model starts as the base exactly. With the adapters off (adapters_off) the
# model is its base: DPO's reference, with no second copy of the weights. The base's weights keep
# their names; the adapters are each layer's submodule 'lora' (transformer.h.0.attn.c_attn.lora.A),
# added to the layer's output by a forward hook.

LORA_TARGETS = ('c_attn', 'c_proj', 'attn.c_proj', 'c_fc', 'mlp.c_proj')  # 'c_proj': both, as peft


class LoRA(nn.Module):

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, linear.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise it
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank))
        self.scale, self.dropout, self.enabled = alpha / rank, nn.Dropout(dropout), True

    def forward(self, x):  # x (..., in) -> the update (..., out)
        return self.dropout(x) @ self.A.t() @ self.B.t() * self.scale


def add_update(linear, args, output):  # the forward hook of an adapted layer
    return output + linear.lora(args[0]) if linear.lora.enabled else output


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, 'lora')]


def add_lora(model, rank, alpha, dropout=0.0, targets='c_attn,c_proj,c_fc'):
    """model with rank-`rank` adapters on each linear layer that targets names (comma-separated,
    LORA_TARGETS), every other weight frozen; its buffer lora_base_sha256 is the fingerprint of the
    frozen base (weights_sha256), saved with the adapters and checked when they are loaded."""
    names = [t.strip() for t in targets.split(',') if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise UserError(f"lora_targets={targets!r}: {', '.join(unknown) or 'no layer'} is not a layer "
                        f"LoRA adapts here; choose among {', '.join(LORA_TARGETS)}")
    if lora_layers(model):
        raise UserError("this model has adapters already: merge them first (merge_lora)")
    base_sha256 = weights_sha256(model)
    model.requires_grad_(False)
    for name, module in model.transformer.h.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith(t) for t in names):
            module.lora = LoRA(module, rank, alpha, dropout).to(module.weight.device)
            module.lora_hook = module.register_forward_hook(add_update)
    model.register_buffer('lora_base_sha256', torch.tensor(list(bytes.fromhex(base_sha256)),
                                                           dtype=torch.uint8, device=model.lm_head.weight.device))
    return model


def lora_base_sha256(model):
    """The fingerprint of an adapted model's frozen base, or None for a model without adapters."""
    buffer = getattr(model, 'lora_base_sha256', None)
    return None if buffer is None else bytes(buffer.cpu().tolist()).hex()


@contextmanager
def adapters_off(model):
    """Within the block the model is its base: every adapter is switched off, then back on."""
    layers = lora_layers(model)
    for layer in layers:
        layer.lora.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.lora.enabled = True


class BaseOf:
    """An adapted model's frozen base as a model of its own: called, it runs the model with its
    adapters off. The DPO reference under LoRA: the same weights in memory, not a copy."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


def merge_lora(model):
    """model with each adapter folded into its layer's weight (W + scale * B @ A) and removed: a
    plain GPT that computes what the adapted one did, for sampling, evaluation and export."""
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.weight += (layer.lora.B @ layer.lora.A * layer.lora.scale).to(layer.weight.dtype)
            del layer.lora
            layer.lora_hook.remove()
    if hasattr(model, 'lora_base_sha256'):
        del model.lora_base_sha256
    return model.requires_grad_(True)


def load_adapted(path, checkpoint, dropout):
    """A LoRA run's model from its checkpoint: the base it started from (its config's init_from,
    which must still have the weights it had then), with the run's adapters loaded onto it."""
    config = checkpoint.get('config', {})
    base = load_model(config['init_from'], dropout=dropout)
    add_lora(base, config['lora_rank'], config['lora_alpha'], config['lora_dropout'],
             config['lora_targets'])
    saved_sha256 = bytes(checkpoint['model']['lora_base_sha256'].tolist()).hex()
    if lora_base_sha256(base) != saved_sha256:
        raise UserError(f"{path} holds LoRA adapters for the base {config['init_from']}, whose "
                        "weights changed since the run started (sha256 differs): the adapters mean "
                        "nothing on other weights")
    try:
        missing, unexpected = base.load_state_dict(checkpoint['model'], strict=False)
    except RuntimeError as e:  # an adapter of another shape
        raise UserError(f"{path}: its adapters do not fit its config's LoRA settings (lora_rank "
                        f"{config['lora_rank']}, lora_targets {config['lora_targets']!r}): "
                        + next((line.strip() for line in str(e).splitlines() if 'mismatch' in line),
                               first_line(e))) from None
    trained = {name for name, p in base.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise UserError(f"{path}: its adapters do not fit its config's LoRA settings (lora_rank "
                        f"{config['lora_rank']}, lora_targets {config['lora_targets']!r}): "
                        f"{(unexpected or sorted(trained & set(missing)))[0]} is not one of them")
    return base


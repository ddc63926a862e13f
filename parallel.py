"""
How a model is spread over the ranks that torchrun starts, for sft.py and dpo.py:

    DDP  (the default)  every rank holds the whole model, its gradients and AdamW's moments; the
                        gradients are all-reduced after the last micro-step.
    FSDP (fsdp=True)    PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard): every rank holds 1/N
                        of each parameter, gradient and moment. A block's weights are gathered when
                        it runs, forward and backward, the embeddings' and LayerNorms' for the whole
                        step; the gradients are reduce-scattered after every micro-step.

Both compute the same thing: float32 weights, matmuls in the run's dtype (bf16), a float32 residual
stream, float32 reductions and optimizer steps. The loops read the same for both: wrap() once,
sync_gradients() each micro-step, and full_state() for a checkpoint, which always holds whole
tensors (ckpt.pt's format does not change with the layout: a run saved under FSDP resumes under DDP
or on one process, and the other way round).
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError


def check(fsdp, run):
    """Stop early on what FSDP cannot do here."""
    if fsdp and run.dtype == 'float16':
        raise ConfigError("fsdp=True does not go with dtype=float16, whose loss scaler does not take sharded gradients: "
                          "use bfloat16 (or float32)")


def wrap(model, run, fsdp=False, compile=False, forward_only=False):
    """The model the forward goes through, in three steps. fsdp under torchrun: rank 0's weights on
    every rank, then the model sharded in place, each block's attention and MLP and then the rest
    (the embeddings, tied to the output layer, and the LayerNorms), so that its parameters are this
    rank's shards from here on: build the optimizer after wrap(). compile: torch.compile. Training
    under torchrun without fsdp: DDP around it (forward_only, the reference: no DDP, nothing to reduce)."""
    if fsdp and run.ddp:
        for t in [*model.parameters(), *model.buffers()]:  # as DDP starts: a model made from scratch
            dist.broadcast(t.detach(), 0)                  # differs by each rank's seed
        # Each block's attention and MLP (all its matmul weights) are gathered in the compute dtype,
        # half the bytes of float32, and autograd saves those gathered weights for backward, freed
        # after the forward and gathered again for the backward (autocast's casts of float32 weights
        # would stay, 2 bytes a parameter). Their inputs are not cast: the residual stream stays float32
        # as under DDP with autocast. The rest, the embeddings and every LayerNorm, is the root's, in
        # float32: the same computation as DDP's.
        compute = None if run.dtype == 'float32' else getattr(torch, run.dtype)  # torch.bfloat16
        matmuls = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.transformer.h:
            fully_shard(block.attn, mp_policy=matmuls)
            fully_shard(block.mlp, mp_policy=matmuls)
        # the root's weights stay gathered from its forward to its backward by default; a model that
        # only runs forward (the reference) would keep them gathered for good
        fully_shard(model, reshard_after_forward=True if forward_only else None)
    if compile:
        model = torch.compile(model, dynamic=True)  # batch lengths change every step: one graph for all
    if run.ddp and not fsdp and not forward_only:
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not in a second copy
        model = DDP(model, device_ids=[run.local_rank] if run.device_type == 'cuda' else None,
                    gradient_as_bucket_view=True)
    return model


def sync_gradients(model, on):
    """Whether the next backward of model (wrap()'s) all-reduces the gradients, under DDP: only the
    last micro-step's needs to, the others accumulate locally for free. Under FSDP every micro-step
    reduce-scatters: skipping it would keep each rank's gradients whole, in float32, until the last
    micro-step (FSDP2 accumulates them unsharded), 4 bytes a parameter on every rank."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = on


def is_sharded(t):
    return isinstance(t, DTensor)


def local(t):
    """This rank's part of a tensor: a shard's own (FSDP), or the whole of a tensor that is not sharded."""
    return t.to_local() if is_sharded(t) else t


def whole(t):
    """A tensor as a whole: a shard gathered from all ranks (a collective: every rank calls it)."""
    return t.full_tensor() if is_sharded(t) else t


def full_state(model, optimizer, keep):
    """The model's and the optimizer's state dicts with whole tensors on the CPU, as a one-process
    run has them, on the rank that keeps them (keep: rank 0, which saves); None on the others. Under
    FSDP every rank takes part in each gather, one tensor at a time, in the same order, so that a
    GPU never holds more than one whole tensor beyond its shards."""
    def gathered(t):
        t = whole(t.detach())  # under FSDP a collective
        return t.cpu() if keep else None
    copies = {}  # id of a parameter -> its copy: the tied embedding and output weights stay one tensor
    model_state = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if id(param) not in copies:
            copies[id(param)] = gathered(param)
        model_state[name] = copies[id(param)]
    optimizer_state = optimizer.state_dict()
    optimizer_state['state'] = {i: {k: gathered(v) for k, v in s.items()} for i, s in optimizer_state['state'].items()}
    return (model_state, optimizer_state) if keep else (None, None)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict for a state with whole tensors (full_state's): under FSDP each
    moment is cut into this rank's shard of its parameter first."""
    params = [p for group in optimizer.param_groups for p in group['params']]  # in the state's numbering
    moments = {}
    for i, values in state['state'].items():
        p = params[i]
        moments[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                      if is_sharded(p) and v.shape == p.shape else v  # (every rank has it whole: no scatter)
                      for k, v in values.items()}
    optimizer.load_state_dict({**state, 'state': moments})

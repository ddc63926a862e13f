"""
How a model is spread over the ranks that torchrun starts, for sft.py and dpo.py:

    DDP  (the default)  every rank holds the whole model, its gradients and AdamW's moments; the
                        gradients are all-reduced after the last micro-step.
    FSDP (fsdp=True)    PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard): every rank holds 1/N
                        of each parameter, gradient and moment, and gathers the weights of one block
                        at a time for its forward and backward; the gradients are reduce-scattered.
                        Computed in the run's dtype (bf16), reduced and stepped in float32.

The loops read the same for both: wrap() once, sync_gradients() each micro-step, and full_state()
for a checkpoint, which always holds whole tensors (ckpt.pt's format does not change with the
layout: a run saved under FSDP resumes under DDP or on one process, and the other way round).
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP


def wrap(model, run, fsdp=False, compile=False, train=True):
    """The model the forward goes through. fsdp under torchrun: model sharded in place, each block
    and then the rest (the embeddings, tied to the output layer, the final LayerNorm), so that its
    parameters are this rank's shards from here on: build the optimizer after wrap(). compile:
    torch.compile. Training under torchrun without fsdp: DDP around it."""
    if fsdp and run.ddp:
        for t in [*model.parameters(), *model.buffers()]:  # rank 0's weights on every rank, as DDP starts
            dist.broadcast(t.detach(), 0)                  # (a model made from scratch differs by the rank's seed)
        compute = None if run.dtype == 'float32' else getattr(torch, run.dtype)  # torch.bfloat16
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        # the root's weights stay gathered from its forward to its backward, by default; a model that
        # only runs forward (the reference) would keep them gathered for good
        fully_shard(model, mp_policy=policy, reshard_after_forward=None if train else True)
    if compile:
        model = torch.compile(model, dynamic=True)  # batch lengths change every step: one graph for all
    if run.ddp and train and not fsdp:
        model = DDP(model, device_ids=[run.local_rank] if run.device_type == 'cuda' else None)
    return model


def sync_gradients(model, on):
    """Whether the next backward of model (wrap()'s) all-reduces (DDP) or reduce-scatters (FSDP)
    the gradients: only the last micro-step's needs to, the others accumulate locally."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = on
    elif isinstance(getattr(model, '_orig_mod', model), FSDPModule):  # (compiled: the module inside)
        getattr(model, '_orig_mod', model).set_requires_gradient_sync(on)


def is_sharded(t):
    return isinstance(t, DTensor)


def whole(t):
    """A tensor as a whole: a shard gathered from all ranks (a collective: every rank calls it)."""
    return t.full_tensor() if is_sharded(t) else t


def full_state(model, optimizer, keep):
    """The model's and the optimizer's state dicts with whole tensors on the CPU, as a one-process
    run has them, on the rank that keeps them (keep: rank 0, which saves); None on the others. Under
    FSDP every rank takes part in each gather, one tensor at a time, so a GPU never holds more than
    one whole tensor beyond its shards."""
    done = {}  # a tensor's memory -> its copy: the tied embedding and output weights stay one tensor

    def gathered(t):
        local = t.to_local() if is_sharded(t) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key not in done:
            full = whole(t)  # under FSDP a collective: every rank, in the same order
            done[key] = full.cpu() if keep else None
        return done[key]
    model_state = {name: gathered(t) for name, t in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    optimizer_state['state'] = {i: {k: gathered(v) for k, v in s.items()} for i, s in optimizer_state['state'].items()}
    return (model_state, optimizer_state) if keep else (None, None)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict for a state with whole tensors (full_state's): under FSDP each
    moment is cut into this rank's shard of its parameter first."""
    params = [p for group in optimizer.param_groups for p in group['params']]  # in state's numbering
    state = {**state, 'state': {i: {k: distribute_tensor(v.to(params[i].device), params[i].device_mesh,
                                                         params[i].placements, src_data_rank=None)  # every rank has it whole
                                    if is_sharded(params[i]) and v.shape == params[i].shape else v
                                    for k, v in s.items()}
                                for i, s in state['state'].items()}}
    optimizer.load_state_dict(state)

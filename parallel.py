"""
The devices and ranks a run runs on: the device and dtype, torchrun's process group and its
collectives, and how a model is spread over the ranks:

    DDP  (the default)  every rank holds the whole model, its gradients and AdamW's moments; the
                        gradients are all-reduced after the last micro-step.
    FSDP (fsdp=True)    PyTorch's FSDP2 (fully_shard): every rank holds 1/N of each parameter,
                        gradient and moment; a block's weights are gathered when it runs, and the
                        gradients reduce-scattered after every micro-step.

Both compute the same thing: float32 weights, matmuls in the run's dtype, a float32 residual stream,
float32 reductions and optimizer steps; a checkpoint always holds whole tensors (full_state), so a
run saved under one layout resumes under another. A reader of the training story can leave this closed.
"""

import json
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import DATA_CACHE_DIR, UserError, first_line, is_timeout


# -------------------------------------------------------------------- the device and dtype

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def cpu_has_native_bf16():
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16). Elsewhere bf16 matmuls
    are emulated, hundreds of times slower than float32 (docs/PERFORMANCE.md)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: assume no native bf16
        return False
    return bool(flags & {'amx_bf16', 'avx512_bf16'})


def resolve_device(device):
    """'auto' becomes cuda when there is a GPU, else cpu; anything else is returned as given, once
    it is known to name a device this machine has."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or "
                        "'cuda:N'") from None
    if kind.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f"device={device!r} cannot train or sample: use 'auto', 'cpu', 'cuda' or "
                        "'cuda:N' (or 'mps' on a Mac)")
    if kind.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"device={device!r}, but this torch build or machine has no MPS (Apple "
                        "GPU) support: use device='cpu', or 'auto'")
    if kind.type == 'cuda':
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(f"device={device!r}, but torch finds no GPU here "
                            f"(torch {torch.__version__}, {build}); "
                            "use device='cpu', or 'auto' to take a GPU only where there is one")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise UserError(f"device={device!r}, but this machine has "
                            f"{torch.cuda.device_count()} GPU(s): "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(dtype, device):
    """'auto' becomes what the hardware computes fastest: bf16 on CUDA GPUs that have it (fp16,
    which needs a GradScaler to train, on older ones), bf16 on CPUs with native bf16, else
    float32."""
    if dtype != 'auto':
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        return dtype
    if device.startswith('cuda'):
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if device == 'cpu' and cpu_has_native_bf16():
        return 'bfloat16'
    return 'float32'


def autocast(device, dtype):
    """Mixed-precision context for the forward pass: weights stay float32, matmuls run in dtype."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=DTYPES[dtype])


# -------------------------------------------------------------------- the ranks

DDP_TIMEOUT_S = 600  # how long a rank waits for the others at a collective before the run stops


def start(device, dtype, seed, timeout_s=DDP_TIMEOUT_S):
    """This process's Run. Under torchrun (RANK is set) it joins the process group: nccl on CUDA,
    one GPU a process; gloo on CPU; a collective that waits more than timeout_s for a rank (stopped,
    crashed, stuck in I/O) fails instead of waiting forever. Seeds torch with seed + rank, and sets
    torch's global speed flags (TF32 matmuls, no cuDNN attention)."""
    ddp = 'RANK' in os.environ
    rank, local_rank, world_size = (0, 0, 1)
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    device = resolve_device(device)
    if ddp and device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo',
                                timeout=timedelta(seconds=timeout_s))
    torch.manual_seed(seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores, where there are
    torch.backends.cudnn.allow_tf32 = True
    # cuDNN's attention kernels plan anew for every new sequence length, and here every batch has
    # its own: a quarter of a DPO step's CPU time on an H100 (docs/PERFORMANCE.md). Flash attention
    # (or the memory-efficient kernel, with a mask) needs no plan.
    torch.backends.cuda.enable_cudnn_sdp(False)
    return Run(ddp, rank, local_rank, world_size, device, resolve_dtype(dtype, device), timeout_s)


class Run:
    """This process's part in a run: its device and dtype, its rank among torchrun's processes
    (master: rank 0, the one that logs and saves), and the collectives that every rank calls
    together. Without torchrun (ddp False) each collective is the plain one-process case."""

    def __init__(self, ddp=False, rank=0, local_rank=0, world_size=1, device='cpu', dtype='float32',
                 timeout_s=DDP_TIMEOUT_S):
        self.ddp, self.rank, self.local_rank, self.world_size = ddp, rank, local_rank, world_size
        self.master = rank == 0
        self.device, self.device_type, self.dtype = device, device.split(':')[0], dtype
        self.autocast = autocast(device, dtype)  # the forward's mixed precision
        self.peak_flops = peak_flops(device, dtype)  # what MFU is measured against, or None
        self.timeout_s = timeout_s

    @contextmanager
    def collective(self, what):
        """Around a collective: a rank that times out there stops with a UserError naming it."""
        try:
            yield
        except RuntimeError as e:
            if not is_timeout(e):
                raise
            raise UserError(f"rank {self.rank}: {what} waited more than {self.timeout_s} s for the "
                            f"other ranks, one of which stopped, crashed or is stuck "
                            f"({first_line(e, 200)})") from None

    def sum(self, t, what='the metrics'):
        """t summed over the ranks, in place (t itself without DDP)."""
        if self.ddp:
            with self.collective(f"the all-reduce of {what}"):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self, why):
        if self.ddp:
            with self.collective(f"the barrier {why}"):
                dist.barrier()

    @contextmanager
    def node_first(self):
        """The block runs on each node's first rank (LOCAL_RANK 0), then on the node's others: the
        first writes a file (the token cache) that the others then read, so that no two processes
        of a node write it at once and every node has it on its own disk. (Nodes that share storage
        may write it at once: each through atomic_open, which leaves one whole copy.)"""
        if self.local_rank != 0:
            self.barrier("waiting for the node's first rank to write the token cache")
        yield
        if self.local_rank == 0:
            self.barrier("after the node's first rank wrote the token cache")

    def stop_unless_finite(self, loss_sum, iter_num, what='loss'):
        """Raise UserError, on every rank at once, when the loss is NaN or infinite: checked before
        each optimizer step, so nothing broken reaches the weights, and on the held-out loss before
        each save, so a checkpoint never holds weights that an earlier step broke."""
        loss_sum = torch.as_tensor(loss_sum, dtype=torch.float32, device=self.device).clone()
        if not torch.isfinite(self.sum(loss_sum, what)):
            raise UserError(f"iteration {iter_num}: the {what} is {loss_sum.item()}; stopped, and "
                            "the last checkpoint is untouched (try a lower learning_rate, or "
                            "dtype=float32)")

    def every_rank(self, flat, what):
        """(world_size, n) int32 on the CPU: row r is rank r's flat (n,) integers (the same n on
        every rank). One all-reduce of a table in which each rank fills its own row: plain tensors
        on the device the backend wants, nothing pickled (as all_gather_object would)."""
        table = torch.zeros(self.world_size, flat.numel(), dtype=torch.int32, device=self.device)
        table[self.rank] = flat.to(self.device, torch.int32)
        return self.sum(table, what).cpu()

    def rng_states(self):
        """Every rank's RNG states, rank 0's first, so that each rank of a resumed run continues its
        own random stream (dropout). Under DDP a collective: every rank calls it."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        mine = {'torch': torch.get_rng_state(), 'cuda': cuda}
        if not self.ddp:
            return [mine]
        flat = torch.cat([mine['torch'], *mine['cuda']])
        table = self.every_rank(flat, 'the RNG states').to(torch.uint8)
        sizes = [mine['torch'].numel()] + [t.numel() for t in mine['cuda']]
        return [{'torch': parts[0].clone(), 'cuda': [p.clone() for p in parts[1:]]} for parts in
                (row.split(sizes) for row in table)]

    def set_rng_states(self, states):
        """This rank's RNG states back, as rng_states() saved them."""
        torch.set_rng_state(states['torch'])
        if states['cuda'] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states['cuda'])

    def gather(self, values, what='the data positions'):
        """Every rank's list of integers values (the same length on every rank), rank 0's first.
        Under DDP a collective: every rank calls it."""
        return self.every_rank(torch.tensor(values), what).tolist()

    def full_state(self, model, optimizer):
        """The model's and the optimizer's state dicts with whole tensors (under FSDP gathered from
        the shards: a collective) on the master, which saves them; (None, None) on the others."""
        return full_state(model, optimizer, self.master)

    def full_tensor(self, t):
        """t as a whole: under FSDP a shard (DTensor) gathered from every rank (a collective)."""
        return t.full_tensor() if is_sharded(t) else t

    def exit_together(self, code=0):
        """The end of a run under DDP: every rank waits here for the others (the master's last save
        done), then the process ends at once with os._exit(code), skipping an interpreter teardown
        that can deadlock in gloo (seen in about one run of ten on 2 CPU ranks). Without DDP:
        nothing, or SystemExit(code) for a code other than 0."""
        if self.ddp:
            self.barrier("at the end, waiting for the master's last save")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        if code:
            raise SystemExit(code)

    # ---------------------------------------------------------------- a graceful stop on a signal

    def save_on_signals(self):
        """From here on SIGTERM (a cluster's notice before it kills a job; torchrun passes it on to
        its ranks) and SIGINT (^C) are noted instead of ending the process: stop_signal() reports
        them after the step under way, where the script saves ckpt.pt and ends (exit_stopped). The
        same signal again ends the process at once, without a save."""
        def note(signum, frame):
            name = signal.Signals(signum).name
            if signum in self.signals:
                print(f"{'' if self.master else f'rank {self.rank}: '}{name} again: stopped at once, "
                      "without a save", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.signals.append(signum)
            if self.master:
                print(f"{name}: saving ckpt.pt after this step, then stopping (send {name} again to "
                      "stop at once, without a save)", file=sys.stderr, flush=True)
        self.signals = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, note)

    def stop_signal(self):
        """The signal any rank was sent since save_on_signals (its number), else 0. Under DDP a
        collective: every rank learns of it after the same step, so that all of them stop there."""
        got = torch.tensor([self.signals[0] if getattr(self, 'signals', None) else 0],
                           dtype=torch.int32, device=self.device)
        if self.ddp:
            with self.collective("the all-reduce of the stop signal"):
                dist.all_reduce(got, op=dist.ReduceOp.MAX)
        return int(got.item())

    def exit_stopped(self, signum, iter_num, out_dir, script):
        """The end of a run that a signal stopped, its ckpt.pt saved: one line on the master that
        says how to go on, and the exit status the signal itself gives (128 + its number)."""
        name = signal.Signals(signum).name
        if self.master:
            print(f"stopped: {name} at iteration {iter_num}; "
                  f"{self.how_to_go_on(iter_num, out_dir, script)}", file=sys.stderr, flush=True)
        self.exit_together(128 + signum)

    def raise_stopped(self, error, iter_num, out_dir, script):
        """Raise the UserError error, with where the run stopped and how to go on (how_to_go_on)."""
        raise UserError(f"{error}; stopped at iteration {iter_num}: "
                        f"{self.how_to_go_on(iter_num, out_dir, script)}")

    def how_to_go_on(self, iter_num, out_dir, script):
        """What a run that stopped at iter_num (its ckpt.pt saved there) tells its user."""
        if iter_num == 0:
            return "before the first step, so nothing was saved"
        how = (f"the same torchrun command with {script}" if self.ddp else f"python {script}")
        how += f" --init_from=resume --out_dir={out_dir}"
        return f"{out_dir}/ckpt.pt holds iteration {iter_num}; to go on: {how}"

    def error_on_any_rank(self, error, what):
        """This rank's error (a UserError, or None) where it has one, else a UserError naming the
        ranks that had one, else None: every rank learns of one together. what: what failed, for
        the line. Under DDP a collective: every rank calls it."""
        had = self.gather([error is not None], f"{what}'s errors")  # a [0|1] row per rank
        failed = [rank for rank, (one,) in enumerate(had) if one]
        if error is None and failed:
            return UserError(f"{what} failed on rank {', '.join(map(str, failed))} (that rank's "
                             "own line says why)")
        return error


# -------------------------------------------------------------------- the model over the ranks

def distribute(model, run, fsdp=False, compile=False, forward_only=False):
    """The model the forward goes through: on one process the model itself (compiled if compile);
    under torchrun, with fsdp, sharded in place (shard, below: build the optimizer after), else
    inside DDP, except the reference (forward_only), which has no gradients to all-reduce."""
    if not isinstance(model, torch.nn.Module):  # a LoRA policy's base (BaseOf): where the policy is
        return model
    if fsdp and run.dtype == 'float16':  # (CHECKS refuses it when asked; here 'auto' chose it)
        raise UserError("fsdp=True does not go with dtype=float16, whose loss scaler does not take "
                        "sharded gradients: use bfloat16 (or float32)")
    if fsdp and run.ddp:
        shard(model, run.dtype, forward_only)
    model = compiled(model) if compile else model
    if run.ddp and not fsdp and not forward_only:
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not in a second copy
        model = DDP(model, device_ids=[run.local_rank] if run.device_type == 'cuda' else None,
                    gradient_as_bucket_view=True)
    return model


def shard(model, dtype, forward_only=False):
    """FSDP2 on model, in place: rank 0's weights broadcast to every rank, then each block's
    attention and MLP sharded, then the rest (the embeddings, tied to the output layer, and the
    LayerNorms), so that its parameters are this rank's shards from here on."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # (2 s to import: only here)
    for t in [*model.parameters(), *model.buffers()]:  # as DDP starts: a model made from scratch
        dist.broadcast(t.detach(), 0)                  # differs by each rank's seed
    # Each block's attention and MLP (all its matmul weights) are gathered in the compute dtype,
    # half the bytes of float32, and autograd saves those gathered weights for backward, freed
    # after the forward and gathered again for the backward (autocast's casts of float32 weights
    # would stay, 2 bytes a parameter). Their inputs are not cast: the residual stream stays float32
    # as under DDP with autocast. The rest, the embeddings and every LayerNorm, is the root's, in
    # float32: the same computation as DDP's.
    compute = None if dtype == 'float32' else getattr(torch, dtype)  # torch.bfloat16
    matmuls = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
    for block in model.transformer.h:
        fully_shard(block.attn, mp_policy=matmuls)
        fully_shard(block.mlp, mp_policy=matmuls)
    # the root's weights stay gathered from its forward to its backward by default; a model that
    # only runs forward (the reference) would keep them gathered for good
    fully_shard(model, reshard_after_forward=True if forward_only else None)


def compiled(model):
    """torch.compile(model), one graph for every batch length (dynamic: they change every step), its
    target_logprobs left eager: the number of targets changes every batch, so it would recompile each
    time. (Here, not as a decorator in model.py: torch._dynamo takes 2 s to import, paid only by a
    compiled run.)"""
    model.target_logprobs = torch.compiler.disable(model.target_logprobs)
    return torch.compile(model, dynamic=True)


def is_sharded(t):
    """t is a DTensor, FSDP's shard (none exists unless fsdp imported torch.distributed.tensor)."""
    tensor = sys.modules.get('torch.distributed.tensor')
    return tensor is not None and isinstance(t, tensor.DTensor)


def full_state(model, optimizer, keep):
    """The model's and the optimizer's state dicts with whole tensors on the CPU, as a one-process
    run has them (of a model with frozen parameters, LoRA's, only the trained ones and the
    buffers), on the rank that keeps them (keep: rank 0, which saves); None on the others. Under
    FSDP every rank takes part in each gather, one tensor at a time, in the same order, so that a
    GPU never holds more than one whole tensor beyond its shards."""
    def gathered(t):
        t = t.detach()
        t = t.full_tensor() if is_sharded(t) else t  # under FSDP a collective
        return t.cpu() if keep else None
    copies = {}  # id of a parameter -> its copy: the tied embedding and output weights stay one tensor
    model_state = {}
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    trained_only = frozen and any(p.requires_grad for p in model.parameters())  # LoRA: the adapters
    for name, param in model.state_dict(keep_vars=True).items():
        if trained_only and name in frozen:
            continue  # the frozen base is not saved: the run's config says where it comes from
        if id(param) not in copies:
            copies[id(param)] = gathered(param)
        model_state[name] = copies[id(param)]
    optimizer_state = optimizer.state_dict()
    optimizer_state['state'] = {i: {k: gathered(v) for k, v in s.items()}
                                for i, s in optimizer_state['state'].items()}
    return (model_state, optimizer_state) if keep else (None, None)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict for a state with whole tensors (full_state's): under FSDP each
    moment is cut into this rank's shard of its parameter first."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for group in optimizer.param_groups for p in group['params']]  # in the state's numbering
    moments = {}
    for i, values in state['state'].items():
        p = params[i]
        # every rank has the moment whole: its shard is cut out, no scatter
        moments[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                           src_data_rank=None)
                      if is_sharded(p) and v.shape == p.shape else v
                      for k, v in values.items()}
    optimizer.load_state_dict({**state, 'state': moments})

# ------------------------------------------------------------ the peak FLOPs MFU is measured against

PEAK_FLOPS = {  # published dense tensor-core figures, bf16/fp16 (float32 runs as TF32 at half of it)
    'H100': 989e12, 'H100 PCIe': 756e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12,
    'L40': 181e12, 'A10': 125e12, 'L4': 121e12, '4090': 165e12,
}  # a device takes the longest name its own contains ('NVIDIA L40S' is an L40S, not an L4)


PEAK_CACHE = os.path.join(DATA_CACHE_DIR, 'peak_flops.json')


def cpu_name():
    """The CPU's model name (what a measured peak is filed under), or the platform's word for it."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def peak_flops(device, dtype):
    """The peak that MFU is measured against: a GPU's published figure, or, on a CPU (which has no
    one published figure), the matmul rate that `python tools/bench.py` measured on this CPU and cached
    in PEAK_CACHE; None when neither is known (no MFU is logged then)."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        known = max((k for k in PEAK_FLOPS if k in name), key=len, default=None)
        peak = PEAK_FLOPS.get(known)
        return peak / 2 if peak and dtype == 'float32' else peak
    try:
        with open(PEAK_CACHE) as f:
            return json.load(f).get(f"{cpu_name()} {os.cpu_count()} cores {dtype}")
    except (OSError, ValueError):
        return None



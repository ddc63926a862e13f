"""
Plumbing that the scripts share: device and dtype choice, torchrun's process group, the learning-rate schedule,
the optimizer step, checkpoint files, metric logging and the device's peak FLOPs for MFU.
The training loops themselves stay in sft.py and dpo.py, flat and readable top to bottom.
"""

import errno
import glob
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

import parallel
from configurator import ConfigError, read_config_file
from model import GPT, GPTConfig, LoadError, first_line, from_pretrained


class TrainingError(RuntimeError):
    """A run that has to stop (a NaN loss, a full disk, a rank that stopped answering); the message
    says why and where."""

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
        raise ConfigError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if kind.type == 'cuda':
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device={device!r}, but torch finds no GPU here (torch {torch.__version__}, {build}); "
                              "use device='cpu', or 'auto' to take a GPU only where there is one")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}, but this machine has {torch.cuda.device_count()} GPU(s): "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(dtype, device):
    """'auto' becomes what the hardware computes fastest: bf16 on CUDA GPUs that have it (fp16,
    which needs a GradScaler to train, on older ones), bf16 on CPUs with native bf16, else float32."""
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


@contextmanager
def atomic_open(path, mode='w'):
    """A file to write path through: written under a name of this process's own (host and pid: two
    nodes may write the same path on shared storage), flushed to disk, then renamed over path, so a
    crash at any moment leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(checkpoint, path):
    """checkpoint written to path atomically; a failed write (a full disk) leaves the old file and
    raises TrainingError naming the file."""
    try:
        with atomic_open(path, 'wb') as f:
            torch.save(checkpoint, f)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write either way
        cause, full = e, False
        while cause is not None and not full:
            full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
            cause = cause.__cause__ or cause.__context__
        folder = os.path.dirname(os.path.abspath(path))
        reason = (f"the disk is full ({shutil.disk_usage(folder).free / 1e6:.0f} MB free in {folder})" if full
                  else f"{type(e).__name__}: {first_line(e, 300)}")
        raise TrainingError(f"could not write {path}: {reason}; the checkpoint there before is kept") from None


def weights_sha256(model):
    """A fingerprint of a model's weights: the sha256 of its state dict's names and bytes."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path, map_location='cpu', script=None):
    """A checkpoint dict written by save_checkpoint; only tensors and plain values are unpickled.
    script ('sft' or 'dpo'): the script about to resume it, which must be the one that wrote it."""
    if not os.path.isfile(path):
        raise LoadError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)  # pages shared by the ranks
    except Exception as e:
        raise LoadError(f"{path} is not a readable checkpoint: {type(e).__name__}: {e}") from e
    if script is not None:
        config = checkpoint.get('config', {})
        written_by = checkpoint.get('script', 'dpo' if 'ref_from' in config else 'sft')  # older checkpoints
        if written_by != script:
            hint = (f"; to start DPO from it, pass --init_from={os.path.dirname(path) or '.'}"
                    if (written_by, script) == ('sft', 'dpo') else f"; resume it with {written_by}.py")
            raise LoadError(f"{path} was written by {written_by}.py, so {script}.py cannot resume it{hint}")
    return checkpoint


def load_model(init_from, out_dir='out', device='cpu', dropout=0.0, checkpoint=None):
    """The model a script starts from: 'resume' is out_dir/ckpt.pt (or the checkpoint dict given,
    already read); a directory holding a ckpt.pt (an SFT run's out_dir) is that checkpoint; anything
    else goes to model.from_pretrained (a GPT-2 name, a hub id or a hub-layout directory)."""
    if init_from == 'resume' or os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
        path = os.path.join(out_dir if init_from == 'resume' else init_from, 'ckpt.pt')
        checkpoint = checkpoint or load_checkpoint(path)  # to the CPU: only the weights go on to the device
        if 'model_args' not in checkpoint or 'model' not in checkpoint:
            raise LoadError(f"{path} has no 'model_args' and 'model' entries: not a checkpoint of this project")
        try:
            model = GPT(GPTConfig(**{**checkpoint['model_args'], 'dropout': dropout}))
        except (TypeError, ValueError) as e:
            raise LoadError(f"{path}: its model_args do not make a model: {e}") from None
        try:
            model.load_state_dict(checkpoint['model'])
        except RuntimeError as e:
            raise LoadError(f"{path}: the weights do not fit its model_args: {e}") from e
    else:
        try:
            model = from_pretrained(init_from, dropout=dropout)
        except LoadError as e:
            raise LoadError(f"{e}{missing_run_hint(init_from)}") from None
    return model.to(device)


def missing_run_hint(name):
    """For a model source that does not exist: the config in config/ whose out_dir it is, as the
    command that makes it (dpo.py config/hh.py starts from out-sft-hh, which sft.py makes)."""
    if os.path.exists(name):
        return ''
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', '*.py'))):
        try:
            out = read_config_file(path).get('out_dir')
        except ConfigError:
            continue
        if out == name.rstrip('/'):
            script = 'sft.py' if os.path.basename(path).startswith('sft') else 'dpo.py'
            return f"; it is the out_dir of config/{os.path.basename(path)}: run python {script} config/{os.path.basename(path)} first"
    return ''


def exit_with_error(error):
    """Stop the process with one line, 'error: ...'. Under torchrun only rank 0 prints it (every rank
    meets the same mistake), unless the error is this rank's own (a collective that timed out)."""
    if int(os.environ.get('RANK', 0)) == 0 or str(error).startswith('rank '):
        print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def prepare_out_dir(out_dir, run, resuming, overwrite, sources):
    """Stop before a run destroys work. out_dir must not be a directory the run reads a model from
    (sources: {config key: source}), whose ckpt.pt the run would overwrite. A new run (not resuming)
    must not replace a run already in out_dir unless overwrite; then the old run's ckpt.pt and
    metrics.jsonl are removed first, so that the directory never mixes two runs."""
    for key, source in sources.items():
        if os.path.isdir(source) and os.path.realpath(source) == os.path.realpath(out_dir):
            raise ConfigError(f"out_dir={out_dir!r} is also {key}, a model this run reads: its ckpt.pt would be "
                              "overwritten; choose another out_dir")
    old = [name for name in ('ckpt.pt', 'metrics.jsonl') if os.path.exists(os.path.join(out_dir, name))]
    if resuming or not old:
        return
    if not overwrite:
        raise ConfigError(f"out_dir={out_dir!r} already holds a run ({' and '.join(old)}): continue it with "
                          "--init_from=resume, choose another --out_dir, or replace it with --overwrite=True")
    if run.master:
        for name in old:
            os.remove(os.path.join(out_dir, name))


def restore_training_state(checkpoint, optimizer, scaler, loader, run):
    """Put a checkpoint's optimizer moments (under FSDP, this rank's shards of them), loss scale,
    data order and this rank's RNG states back, so the run continues exactly where it stopped, on
    this layout or another; returns the iteration it stopped at."""
    parallel.load_optimizer_state(optimizer, checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    loader.load_state_dict(checkpoint['loader'])
    states = checkpoint['rng'] if isinstance(checkpoint['rng'], list) else [checkpoint['rng']]  # older: rank 0's
    if run.rank < len(states):  # a rank the saving run did not have keeps the seed + rank stream of setup()
        set_rng_states(states[run.rank])
    return checkpoint['iter_num']


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)


# -------------------------------------------------------------------- training set-up

DDP_TIMEOUT_S = 600  # how long a rank waits for the others at a collective before the run stops


def setup(device, dtype, seed, timeout_s=DDP_TIMEOUT_S):
    """Start DDP when torchrun launched us (RANK is set): nccl on CUDA, one GPU per process; gloo
    on CPU. A collective that waits more than timeout_s for a rank (stopped, crashed, stuck in I/O)
    fails instead of waiting forever. Seeds torch with seed + rank. Returns a namespace: ddp, rank,
    local_rank, world_size, master (rank 0: the one that logs and saves), device, device_type,
    dtype, autocast, timeout_s."""
    ddp = 'RANK' in os.environ
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    device = resolve_device(device)
    if ddp and device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo',
                                timeout=timedelta(seconds=timeout_s))
    dtype = resolve_dtype(dtype, device)
    torch.manual_seed(seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores where there are some
    torch.backends.cudnn.allow_tf32 = True
    # cuDNN's attention kernels plan anew for every new sequence length, and here every batch has
    # its own, which cost a quarter of a DPO step's CPU time on an H100 (docs/PERFORMANCE.md).
    # Flash attention (or the memory-efficient kernel, with a mask) needs no plan.
    torch.backends.cuda.enable_cudnn_sdp(False)
    device_type = device.split(':')[0]
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0,
                           device=device, device_type=device_type, dtype=dtype, autocast=autocast(device, dtype),
                           timeout_s=timeout_s)


def get_lr(it, learning_rate, warmup_iters, decay_lr, lr_decay_iters, min_lr):
    """Linear warmup from 0 over warmup_iters, then constant (decay_lr=False, the DPO paper's
    schedule) or cosine decay to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip, step, zero the gradients; returns the gradient norm before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return parallel.whole(grad_norm).item()  # (under FSDP a DTensor over the shards)


@contextmanager
def collective(what, run):
    """Around a collective: a rank that times out there stops with a TrainingError naming it."""
    try:
        yield
    except RuntimeError as e:  # gloo and nccl both report a timeout as a RuntimeError
        if 'time' not in str(e).lower():
            raise
        raise TrainingError(f"rank {run.rank}: {what} waited more than {run.timeout_s} s for the other ranks, "
                            f"one of which stopped, crashed or is stuck ({first_line(e, 200)})") from None


def all_reduce_sum(t, run, what='the metrics'):
    """t summed over the ranks (t itself without DDP)."""
    if run.ddp:
        with collective(f"the all-reduce of {what}", run):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(run, why):
    if run.ddp:
        with collective(f"the barrier {why}", run):
            dist.barrier()


@contextmanager
def node_first(run):
    """The block runs on each node's first rank (LOCAL_RANK 0), then on the node's other ranks: the
    first writes a file (the token cache) that the others then read, so that no two processes of a
    node write it at once, and every node has it on its own disk. On storage that the nodes share,
    their first ranks may write it at the same time: each writes a file of its own and renames it
    over the path (atomic_open), which leaves one whole copy."""
    if run.local_rank != 0:
        barrier(run, "waiting for the node's first rank to write the token cache")
    yield
    if run.local_rank == 0:
        barrier(run, "after the node's first rank wrote the token cache")


def stop_unless_finite(loss_sum, iter_num, run, what='loss'):
    """Raise TrainingError, on every rank at once, when the loss is NaN or infinite: checked before
    each optimizer step, so nothing broken reaches the weights, and on the held-out loss before each
    save, so a checkpoint never holds weights that an earlier step broke."""
    loss_sum = all_reduce_sum(torch.as_tensor(loss_sum, dtype=torch.float32, device=run.device).clone(), run, what)
    if not torch.isfinite(loss_sum):
        raise TrainingError(f"iteration {iter_num}: the {what} is {loss_sum.item()}; stopped, and the last "
                            "checkpoint is untouched (try a lower learning_rate, or dtype=float32)")


def rng_states(run):
    """Every rank's RNG states, rank 0's first, so that each rank of a resumed run continues its own
    random stream (dropout). Under DDP a collective: every rank calls it."""
    mine = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not run.ddp:
        return [mine]
    table = every_rank(torch.cat([mine['torch'], *mine['cuda']]), run, 'the RNG states').to(torch.uint8)
    sizes = [mine['torch'].numel()] + [t.numel() for t in mine['cuda']]
    return [{'torch': parts[0].clone(), 'cuda': [p.clone() for p in parts[1:]]} for parts in
            (row.split(sizes) for row in table)]


def loader_state(loader, run):
    """The PairLoader's state with every rank's own place, [epoch, micro-batches taken] a rank: the
    same on every rank, but for online DPO, whose ranks draw prompts as their samples need. Under DDP
    a collective: every rank calls it."""
    ranks = every_rank(torch.tensor([loader.epoch, loader.taken]), run, 'the data positions')
    return {**loader.state_dict(), 'ranks': ranks.tolist()}


def every_rank(flat, run, what):
    """(world_size, n) int32 on the CPU: row r is rank r's flat (n,) integers (any integer type that
    int32 holds; the same n on every rank). One all-reduce of a table in which each rank fills its
    own row: plain tensors on the device the backend wants, nothing pickled (as all_gather_object)."""
    table = torch.zeros(run.world_size, flat.numel(), dtype=torch.int32, device=run.device)
    table[run.rank] = flat.to(run.device, torch.int32)
    return all_reduce_sum(table, run, what).cpu()


def set_rng_states(states):
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def finish(run, log=None):
    """The end of a run: the metric log closed, and under DDP, once every rank is here (the master's
    last save done: a rank that left early could abort the others), the process ends at once with
    os._exit(0). The interpreter's own teardown would destroy gloo's process group with the GIL held
    while gloo's worker thread, freeing the last collective, waits for that GIL: a deadlock, seen in
    about one run of ten on 2 CPU ranks."""
    if log is not None:
        log.close()
    if run.ddp:
        barrier(run, "at the end, waiting for the master's last save")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# -------------------------------------------------------------------- measuring and logging

PEAK_FLOPS = {  # published dense tensor-core figures, bf16/fp16 (float32 runs as TF32 at half of it)
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10': 125e12, 'L4': 121e12, '4090': 165e12,
}


PEAK_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data_cache', 'peak_flops.json')


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
    one published figure), the matmul rate that `python bench.py` measured on this CPU and cached
    in PEAK_CACHE; None when neither is known (no MFU is logged then)."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        return peak / 2 if peak and dtype == 'float32' else peak
    try:
        with open(PEAK_CACHE) as f:
            return json.load(f).get(f"{cpu_name()} {os.cpu_count()} cores {dtype}")
    except (OSError, ValueError):
        return None


def speed(t0, examples, tokens, flops, peak_flops, run, unit='pairs'):
    """Throughput of the step that started at t0: examples (unit: 'pairs' for DPO, 'sequences' for
    SFT, counted over all ranks) and real tokens per second (this rank's times the ranks: with
    grouping by length, ranks hold other lengths, so an estimate), and MFU, this rank's model FLOPs
    over its device's peak."""
    if run.device_type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rates = {f'{unit}_per_sec': examples / seconds, 'tokens_per_sec': tokens * run.world_size / seconds}
    return {**rates, 'mfu': flops / seconds / peak_flops} if peak_flops else rates


def write_eval(metrics, iter_num, out_dir, run):
    """eval_only: print the held-out metrics and write them to out_dir/eval.json."""
    if run.master:
        print(', '.join(f"{k} {v:.4f}" for k, v in metrics.items()))
        write_json(os.path.join(out_dir, 'eval.json'), {'iter': iter_num, **metrics})


class MetricLog:
    """One line per logged step on stdout, and one JSON object per step in out_dir/metrics.jsonl
    (and wandb when asked), from the master process only. Resuming at start_iter first drops the
    lines a stopped run had logged after start_iter, so the file reads as one uninterrupted run."""

    def __init__(self, out_dir, master, start_iter=0, wandb_log=False, wandb_project='', wandb_run_name='', config=None):
        self.path, self.master, self.wandb = os.path.join(out_dir, 'metrics.jsonl'), master, None
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        if start_iter > 0 and os.path.exists(self.path):
            with atomic_open(self.path) as f:
                f.writelines(line for line, row in read_metrics(self.path) if row['iter'] <= start_iter)
        if wandb_log:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume='allow')

    def log(self, iter_num, metrics):
        if not self.master:
            return
        print(f"iter {iter_num}: " + ', '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in metrics.items()), flush=True)
        with open(self.path, 'a') as f:
            f.write(json.dumps({'iter': iter_num, **metrics}) + '\n')
        if self.wandb is not None:
            self.wandb.log(metrics, step=iter_num)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path):
    """(line, row) for each line of a metrics.jsonl. A last line cut short by a crash is dropped
    with a warning; a broken line before it stops with the file and line."""
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((line.rstrip('\n') + '\n', json.loads(line)))
        except json.JSONDecodeError:
            if lineno < len(lines):
                raise TrainingError(f"{path}, line {lineno}: not a JSON line; fix or remove it to resume") from None
            print(f"warning: {path}, line {lineno}: the last line is cut short (the run stopped while "
                  "writing it); dropped", file=sys.stderr)
    return rows

"""
Plumbing that the scripts share: device and dtype choice, autocast, and checkpoint files.
(The training issue adds DDP set-up, the LR schedule and metric logging here.)
"""

import os
from contextlib import nullcontext

import torch

from model import GPT, GPTConfig, LoadError

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def cpu_has_native_bf16():
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16). Elsewhere bf16 matmuls
    are emulated: on one AVX2-only machine 0.3 GFLOP/s against 164 GFLOP/s in float32."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: assume no native bf16
        return False
    return bool(flags & {'amx_bf16', 'avx512_bf16'})


def resolve_device(device):
    """'auto' becomes cuda when there is a GPU, else cpu; anything else is returned as given."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
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


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file in the same directory, flushed to disk, then renamed over
    path: a crash at any moment leaves either the old checkpoint or the new one, never half."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location='cpu'):
    """A checkpoint dict written by save_checkpoint; only tensors and plain values are unpickled."""
    if not os.path.isfile(path):
        raise LoadError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise LoadError(f"{path} is not a readable checkpoint: {type(e).__name__}: {e}") from e


def load_model(init_from, out_dir='out', device='cpu'):
    """The model a script starts from: 'resume' is out_dir/ckpt.pt (its 'model_args' and 'model'),
    anything else goes to GPT.from_pretrained (a GPT-2 name, hub id or hub-layout directory)."""
    if init_from == 'resume':
        path = os.path.join(out_dir, 'ckpt.pt')
        checkpoint = load_checkpoint(path, map_location=device)
        if 'model_args' not in checkpoint or 'model' not in checkpoint:
            raise LoadError(f"{path} has no 'model_args' and 'model' entries: not a checkpoint of this project")
        model = GPT(GPTConfig(**checkpoint['model_args']))
        try:
            model.load_state_dict(checkpoint['model'])
        except RuntimeError as e:
            raise LoadError(f"{path}: the weights do not fit its model_args: {e}") from e
    else:
        model = GPT.from_pretrained(init_from)
    return model.to(device)

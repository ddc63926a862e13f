"""
What a run keeps in its out_dir, and how it resumes: ckpt.pt written atomically (the scripts build
its dict: the weights, the optimizer, the place in the data and every rank's random stream), read
back with its recipe checked and restored; metrics.jsonl and eval.json; the guard that keeps a new
run from writing over an old one. A reader of the training story can leave this file closed.
"""

import atexit
import fcntl
import glob
import hashlib
import json
import os
import socket
import sys
import time

import torch

import parallel
from common import UserError, atomic_open, write_failure
from model import read_checkpoint


def write(checkpoint, path):
    """The dict checkpoint written to path atomically; a failed write (a full disk) leaves the old
    file and raises UserError naming the file."""
    try:
        with atomic_open(path, 'wb') as f:
            torch.save(checkpoint, f)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write either way
        raise write_failure(path, e, "the checkpoint there before is kept") from None


# On a resume, the settings not given on the command line come back from ckpt.pt: the run goes on
# with its own recipe. Given ones must agree with it, but for these: where and how the run goes on
# (never taken from ckpt.pt) ...
FRESH_ON_RESUME = ('init_from', 'ref_from', 'out_dir', 'overwrite', 'eval_only', 'device', 'dtype',
                   'compile', 'fsdp', 'wandb_log', 'wandb_project', 'wandb_run_name')
# ... and how long, how often and in which layout: the order of the pairs depends only on the pairs
# a step takes and the micro-batch, so more ranks with less accumulation may go on; the loader
# refuses a change to either of those two, and says which settings keep them
MAY_CHANGE_ON_RESUME = ('max_iters', 'eval_interval', 'eval_iters', 'log_interval', 'batch_size',
                        'gradient_accumulation_steps')


def load(path, script=None, config=None):
    """A checkpoint dict written by write(); only tensors and plain values are unpickled, and the
    tensors are memory-mapped (a node's ranks share the pages). script ('sft' or 'dpo'): the script
    about to resume it, which must be the one that wrote it, with all that a resume needs. config:
    the resuming run's Settings; those it gives must keep the saved recipe (above), and the
    checkpoint's 'recipe' is then the saved settings it does not give, for the script to take."""
    checkpoint = read_checkpoint(path)
    if script is None:
        return checkpoint
    older = (f"{path} cannot be resumed: it is a checkpoint of an older version (or not of this "
             f"project); start a new run from its weights with --init_from={os.path.dirname(path) or '.'}")
    if 'script' not in checkpoint:
        raise UserError(older)
    if checkpoint['script'] != script:
        written_by = checkpoint['script']
        hint = (f"; to start DPO from it, pass --init_from={os.path.dirname(path) or '.'}"
                if (written_by, script) == ('sft', 'dpo') else f"; resume it with {written_by}.py")
        raise UserError(f"{path} was written by {written_by}.py, so {script}.py cannot resume it{hint}")
    if script == 'dpo' and not checkpoint.get('config', {}).get('ref_from'):
        raise UserError(older)
    missing = [key for key in ('model', 'model_args', 'optimizer', 'scaler', 'loader', 'rng',
                               'iter_num', 'config') if key not in checkpoint]
    if missing:
        raise UserError(f"{path} cannot be resumed: it has no {', '.join(map(repr, missing))} "
                        f"(cut down to its weights?); start a new run from its weights with "
                        f"--init_from={os.path.dirname(path) or '.'}")
    saved, config = checkpoint.get('config', {}), config or {}
    given = getattr(config, 'given', set(config))
    changed = [f"{key} {saved[key]!r} -> {config[key]!r}" for key in given
               if key in saved and key not in FRESH_ON_RESUME + MAY_CHANGE_ON_RESUME
               and config[key] != saved[key]]
    if changed:
        raise UserError(f"a resume keeps the run's recipe, and this one would change "
                        f"{', '.join(sorted(changed))} (saved in {path} -> asked now): drop these "
                        "settings to resume, or start a new run from its weights (--init_from=DIR "
                        "with another --out_dir)")
    checkpoint['recipe'] = {key: value for key, value in saved.items() if key in config
                            and key not in given and key not in FRESH_ON_RESUME}
    max_iters = config['max_iters'] if 'max_iters' in given else saved.get('max_iters', float('inf'))
    if not config.get('eval_only') and checkpoint.get('iter_num', 0) >= max_iters:
        raise UserError(f"the run in {os.path.dirname(path) or '.'} is at iteration "
                        f"{checkpoint.get('iter_num', 0)}, already at max_iters={max_iters}: nothing to "
                        "resume; give a larger --max_iters")
    return checkpoint


LOCK = '.lock'  # out_dir's lock file: empty, flock'ed by the run that owns out_dir while it lives
held_locks = {}  # out_dir's real path -> this process's open lock file (closing it would unlock)


def claim_out_dir(out_dir, run, resuming, overwrite, sources):
    """Make out_dir if it is missing (lock_out_dir) and take it for this run, then
    clear_out_dir_or_refuse. Rank 0 holds an exclusive lock on out_dir/.lock (flock: the OS drops
    it when the process ends, however it ends) until it exits, so that a second run into out_dir,
    or a resume while the run lives, stops here in one line that names the holder, before anything
    is written. A collective under DDP: every rank calls it."""
    problem = lock_out_dir(out_dir) if run.master else ''
    taken = torch.tensor([float(bool(problem))], device=run.device)
    if run.sum(taken, 'whether out_dir is free').item():
        raise UserError(problem or f"out_dir={out_dir!r} is in use by another run")
    clear_out_dir_or_refuse(out_dir, run, resuming, overwrite, sources)


def lock_out_dir(out_dir):
    """'' once this process holds out_dir's lock, else why it cannot (the holder, if it is known)."""
    if not out_dir:
        return "out_dir is empty: give the directory the run writes to, --out_dir=DIR"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"out_dir={out_dir!r} is a file, not a directory: choose another --out_dir"
    if os.path.realpath(out_dir) in held_locks:
        return ''
    path = os.path.join(out_dir, LOCK)
    try:
        if not os.path.exists(out_dir):  # made here: removed at exit if the run wrote nothing in it
            os.makedirs(out_dir)
            atexit.register(remove_if_unused, out_dir)
        lock = open(path, 'a')
    except OSError as e:
        return f"out_dir={out_dir!r} cannot hold a run: {e.strerror} ({path})"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return (f"out_dir={out_dir!r} is in use by another run ({lock_holder(path)}, which holds "
                f"{path}): wait for it to end, or choose another --out_dir")
    held_locks[os.path.realpath(out_dir)] = lock
    remove_orphans(out_dir)
    return ''


def remove_orphans(out_dir):
    """Remove the temporary files (atomic_open's NAME.HOST.PID.tmp, up to a checkpoint's size) that
    runs killed mid-write left in out_dir. With out_dir's lock held no other run writes there, so
    each is an orphan, but for one of a live process on this host (eval_only writes eval.json
    without taking the lock)."""
    host, removed = socket.gethostname(), []
    for path in glob.glob(os.path.join(glob.escape(out_dir), '*.tmp')):
        pid = path[:-len('.tmp')].rsplit('.', 1)[-1]
        if not pid.isdigit():
            continue  # not atomic_open's
        if path.endswith(f".{host}.{pid}.tmp") and pid_alive(int(pid)):
            continue
        removed.append((os.path.basename(path), os.path.getsize(path)))
        os.remove(path)
    if removed:
        print(f"removed {len(removed)} temporary file(s) that a stopped run left in {out_dir} "
              f"({sum(size for _, size in removed) / 1e6:.1f} MB: {', '.join(n for n, _ in removed)})")


def pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def remove_if_unused(out_dir):
    """At exit: an out_dir this run made and left with nothing but its lock goes (a run that stopped
    on a mistake before writing anything leaves no trace)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) == [LOCK]:
        os.remove(os.path.join(out_dir, LOCK))
        os.rmdir(out_dir)


def lock_holder(path):
    """Who holds the flock on path, from /proc/locks (Linux): 'pid N on HOST', or as much as known."""
    inode = os.stat(path).st_ino
    try:
        with open('/proc/locks') as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
                fields = line.split()
                if len(fields) > 5 and fields[1] == 'FLOCK' and fields[5].endswith(f':{inode}'):
                    return f"pid {fields[4]} on {socket.gethostname()}"
    except OSError:
        pass
    return "a process this machine does not list: on another host, or its pid hidden"


def clear_out_dir_or_refuse(out_dir, run, resuming, overwrite, sources):
    """Stop before a run destroys work. out_dir must not be a directory the run reads a model from
    (sources: {config key: source}), whose ckpt.pt the run would overwrite. A new run (not resuming)
    must not replace a run already in out_dir unless overwrite; then the old run's ckpt.pt and
    metrics.jsonl are removed first, so that the directory never mixes two runs."""
    for key, source in sources.items():
        if os.path.isdir(source) and os.path.realpath(source) == os.path.realpath(out_dir):
            raise UserError(f"out_dir={out_dir!r} is also {key}, a model this run reads: its ckpt.pt "
                            "would be overwritten; choose another out_dir")
    old = [name for name in ('ckpt.pt', 'metrics.jsonl') if os.path.exists(os.path.join(out_dir, name))]
    if resuming or not old:
        return
    if not overwrite and old == ['metrics.jsonl']:  # a run that stopped before its first save
        raise UserError(f"out_dir={out_dir!r} holds the metrics.jsonl of a run that never saved a "
                        "ckpt.pt (it stopped before its first evaluation): replace it with "
                        "--overwrite=True, or choose another --out_dir")
    if not overwrite:
        raise UserError(f"out_dir={out_dir!r} already holds a run ({' and '.join(old)}): continue it "
                        "with --init_from=resume, choose another --out_dir, or replace it with "
                        "--overwrite=True")
    if run.master:
        for name in old:
            os.remove(os.path.join(out_dir, name))


def restore(checkpoint, optimizer, scaler, loader, run):
    """Put a checkpoint's optimizer moments (under FSDP, this rank's shards of them), loss scale,
    data order and this rank's RNG states back, so the run continues exactly where it stopped, on
    this layout or another; returns the iteration it stopped at."""
    parallel.load_optimizer_state(optimizer, checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    loader.load_state_dict(checkpoint['loader'])
    if run.rank < len(checkpoint['rng']):  # a rank the saved run did not have keeps seed + rank
        run.set_rng_states(checkpoint['rng'][run.rank])
    return checkpoint['iter_num']


def write_json(path, obj):
    """obj as a JSON file, written atomically: a failed write keeps the file there before."""
    try:
        with atomic_open(path) as f:
            json.dump(obj, f, indent=2)
    except OSError as e:
        raise write_failure(path, e, "the file there before is kept") from None


class MetricLog:
    """One line per logged step on stdout, and one JSON object per step in out_dir/metrics.jsonl
    (and wandb when asked), from the master process only. A resumed run at iteration start_iter
    first removes the lines its stopped run had logged after start_iter, so that the file reads as
    one uninterrupted run. eval_only writes eval.json instead (write_eval)."""

    def __init__(self, out_dir, master, start_iter=0, eval_only=False, wandb_log=False,
                 wandb_project='', wandb_run_name='', config=None):
        self.out_dir = out_dir
        self.path, self.master, self.wandb = os.path.join(out_dir, 'metrics.jsonl'), master, None
        self.start_iter, self.started = start_iter, time.perf_counter()  # for speed()'s ETA
        if not master or eval_only:
            return
        os.makedirs(out_dir, exist_ok=True)
        if start_iter > 0 and os.path.exists(self.path):  # a new file, swapped in whole
            kept = [line for line, row in read_metrics(self.path) if row['iter'] <= start_iter]
            try:
                with atomic_open(self.path) as f:
                    f.writelines(kept)
            except OSError as e:
                raise write_failure(self.path, e, "the log is kept as it was") from None
        if wandb_log:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config,
                                    resume='allow')

    def log(self, iter_num, metrics):
        if not self.master:
            return
        print(f"iter {iter_num}: " + ', '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in metrics.items()), flush=True)
        end = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps({'iter': iter_num, **metrics}) + '\n')
        except OSError as e:  # (a full disk) a line cut short goes; the lines before stay
            if os.path.exists(self.path):
                os.truncate(self.path, end)
            raise write_failure(self.path, e, "its lines before this one are kept") from None
        if self.wandb is not None:
            self.wandb.log(metrics, step=iter_num)

    def describe(self, script, model, run, n_train, n_eval, examples, per_step, rest=''):
        """The run's summary line, on the master: the model's size (and what LoRA trains of it),
        where it runs, the data and the examples a step takes; rest: the script's own words."""
        if not self.master:
            return
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = trained < model.num_params(non_embedding=False)  # the adapters train, not it
        print(f"{script}: {model.num_params() / 1e6:.1f}M parameters"
              + (f" ({trained / 1e6:.2f}M trained: LoRA)" if lora else "")
              + f", {run.device}, {run.dtype}, {run.world_size} rank(s); {n_train} train / "
              f"{n_eval} held-out {examples}; {per_step} {rest}")

    def speed(self, iter_num, max_iters, seconds, examples, n_examples, tokens, flops, peak_flops):
        """A step's speed: it took seconds for n_examples and tokens (all ranks') and flops (this
        rank's); its MFU where the device's peak is known; and the minutes left at the pace so far,
        evaluations and saves included."""
        pace = (time.perf_counter() - self.started) / (iter_num - self.start_iter)
        speed = {f'{examples}_per_sec': n_examples / seconds, 'tokens_per_sec': tokens / seconds,
                 'ms_per_iter': 1000 * seconds, 'eta_min': pace * (max_iters - iter_num) / 60}
        if peak_flops:
            speed['mfu'] = flops / seconds / peak_flops
        return speed

    def write_eval(self, iter_num, metrics):
        """eval_only: the held-out metrics printed and written to out_dir/eval.json."""
        if self.master:
            print(', '.join(f"{k} {v:.4f}" for k, v in metrics.items()))
            write_json(os.path.join(self.out_dir, 'eval.json'), {'iter': iter_num, **metrics})

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
                raise UserError(f"{path}, line {lineno}: not a JSON line; fix or remove it to "
                                "resume") from None
            print(f"warning: {path}, line {lineno}: the last line is cut short (the run stopped while "
                  "writing it); dropped", file=sys.stderr)
    return rows

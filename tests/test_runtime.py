"""parallel.py and checkpoint.py: dtype and device choice, atomic checkpoints (a full disk included), loading a model
from a checkpoint, guarding out_dir, the metric log's resume, and DDP's timeout and ordering."""

import errno
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from common import UserError
import checkpoint
import common
import parallel

from model import GPT, GPTConfig, load_model
from conftest import ROOT



def test_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(parallel, 'cpu_has_native_bf16', lambda: True)
    assert parallel.resolve_dtype('auto', 'cpu') == 'bfloat16'
    monkeypatch.setattr(parallel, 'cpu_has_native_bf16', lambda: False)
    assert parallel.resolve_dtype('auto', 'cpu') == 'float32'
    assert parallel.resolve_dtype('float16', 'cpu') == 'float16'  # asked for: given
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    assert parallel.resolve_dtype('auto', 'cuda') == 'float16'
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"):
        parallel.resolve_dtype('fp8', 'cpu')


def test_a_crash_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.write({'iter_num': 1, 'w': torch.ones(3)}, path)
    real_save = torch.save
    def crash(obj, f):
        real_save({'partial': torch.zeros(1000)}, f)
        raise KeyboardInterrupt  # killed half-way
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write({'iter_num': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)['iter_num'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temporary file left behind


def test_load_model_resume_and_errors(tmp_path):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=8)
    model = GPT(GPTConfig(**args))
    checkpoint.write({'model_args': args, 'model': model.state_dict()}, str(tmp_path / 'ckpt.pt'))
    loaded = load_model('resume', str(tmp_path))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match=f"no checkpoint at {tmp_path / 'empty' / 'ckpt.pt'}"):
        load_model('resume', str(tmp_path / 'empty'))
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'ckpt.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match="is not a readable checkpoint: its 16 bytes are not the zip archive that "
                                        "torch.save writes$"):
        load_model('resume', str(tmp_path / 'junk'))
    (tmp_path / 'junk' / 'ckpt.pt').write_bytes(b'')
    with pytest.raises(UserError, match="ckpt.pt is not a readable checkpoint: the file is empty$"):
        load_model('resume', str(tmp_path / 'junk'))
    torch.save([1, 2], tmp_path / 'junk' / 'ckpt.pt')
    with pytest.raises(UserError, match="ckpt.pt holds a list, not a checkpoint's dict$"):
        load_model('resume', str(tmp_path / 'junk'))
    checkpoint.write({'script': 'sft', 'model_args': args, 'model': model.state_dict()}, str(tmp_path / 'ckpt.pt'))
    with pytest.raises(UserError, match=f"{tmp_path}/ckpt.pt cannot be resumed: it has no 'optimizer', 'scaler', "
                                        "'loader', 'rng', 'iter_num', 'config' .*--init_from="):
        checkpoint.load(str(tmp_path / 'ckpt.pt'), script='sft')
    broken = model.state_dict()
    broken['transformer.h.0.mlp.c_fc.weight'][0, :3] = float('nan')
    checkpoint.write({'model_args': args, 'model': broken}, str(tmp_path / 'junk' / 'ckpt.pt'))
    with pytest.raises(UserError, match=f"the model {tmp_path / 'junk'} is broken: its weight "
                                        r"transformer.h.0.mlp.c_fc.weight holds 3 NaN or infinite values"):
        load_model(str(tmp_path / 'junk'))


def test_a_full_disk_keeps_the_old_checkpoint_and_says_so(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.write({'iter_num': 1}, path)
    with open(path, 'rb') as f:
        good = f.read()
    os.symlink('/dev/full', f"{path}.{socket.gethostname()}.{os.getpid()}.tmp")  # written through /dev/full: ENOSPC
    with pytest.raises(UserError, match=f"could not write {path}: the disk is full .*; the "
                                                    "checkpoint there before is kept"):
        checkpoint.write({'iter_num': 2, 'w': torch.zeros(10 ** 6)}, path)
    with open(path, 'rb') as f:
        assert f.read() == good
    assert os.listdir(tmp_path) == ['ckpt.pt']


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_a_gpu_says_there_is_no_gpu():
    with pytest.raises(UserError, match=r"device='cuda', but torch finds no GPU here .*use device='cpu'"):
        parallel.resolve_device('cuda')
    with pytest.raises(UserError, match=r"device='gpu' is not a device"):
        parallel.resolve_device('gpu')
    with pytest.raises(UserError, match=r"^device='meta' cannot train or sample: use 'auto', 'cpu'"):
        parallel.resolve_device('meta')
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match=r"^device='mps', but this torch build or machine has no MPS"):
            parallel.resolve_device('mps')


def test_a_checkpoint_resumes_only_with_the_script_that_wrote_it(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    resumable = dict.fromkeys(['model', 'model_args', 'optimizer', 'scaler', 'loader', 'rng'], {})
    checkpoint.write({**resumable, 'script': 'sft', 'iter_num': 1, 'config': {'init_from': 'gpt2'}}, path)
    assert checkpoint.load(path, script='sft')['script'] == 'sft'
    with pytest.raises(UserError, match=f"{path} was written by sft.py, so dpo.py cannot resume it; to start "
                                        f"DPO from it, pass --init_from={tmp_path}"):
        checkpoint.load(path, script='dpo')


def test_each_rank_resumes_its_own_random_stream():
    states = []
    for rank in range(2):  # what two ranks saved
        torch.manual_seed(100 + rank)
        states.append(parallel.Run().rng_states()[0])
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=4))
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'cpu')
    scaler, loader = torch.amp.GradScaler('cpu', enabled=False), SimpleNamespace(load_state_dict=lambda s: None)
    saved = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), loader={}, iter_num=7, rng=states)
    draws = []
    for rank in range(2):
        torch.manual_seed(0)
        assert checkpoint.restore(saved, optimizer, scaler, loader, parallel.Run(rank=rank)) == 7
        draws.append(torch.rand(3))
    for rank in range(2):
        torch.manual_seed(100 + rank)
        assert torch.equal(draws[rank], torch.rand(3))  # rank r continues the stream rank r saved


def test_out_dir_holding_a_run_or_a_model_it_reads_is_refused(tmp_path):
    run = SimpleNamespace(master=True)
    out = tmp_path / 'out'
    checkpoint.clear_out_dir_or_refuse(str(out), run, False, False, {'init_from': 'gpt2'})  # nothing there: fine
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'weights')
    (out / 'metrics.jsonl').write_text('{"iter": 0}\n')
    with pytest.raises(UserError, match=f"out_dir='{out}' already holds a run \\(ckpt.pt and metrics.jsonl\\): "
                                          "continue it with --init_from=resume, .* --overwrite=True"):
        checkpoint.clear_out_dir_or_refuse(str(out), run, False, False, {'init_from': 'gpt2'})
    checkpoint.clear_out_dir_or_refuse(str(out), run, True, False, {'init_from': 'gpt2'})  # resuming it: fine
    for resuming, overwrite in ((False, True), (True, False)):  # never when out_dir is a model the run reads
        with pytest.raises(UserError, match=f"out_dir='{out}' is also ref_from, a model this run reads"):
            checkpoint.clear_out_dir_or_refuse(str(out), run, resuming, overwrite, {'init_from': 'gpt2', 'ref_from': str(out) + '/'})
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'metrics.jsonl'] and (out / 'ckpt.pt').read_bytes() == b'weights'
    checkpoint.clear_out_dir_or_refuse(str(out), run, False, True, {'init_from': 'gpt2'})  # asked to overwrite
    assert os.listdir(out) == []
    (out / 'metrics.jsonl').write_text('{"iter": 0}\n')  # a run that stopped before it saved: nothing to resume
    with pytest.raises(UserError, match=f"^out_dir='{out}' holds the metrics.jsonl of a run that never saved a ckpt.pt "
                                        r"\(it stopped before its first evaluation\): replace it with --overwrite=True"):
        checkpoint.clear_out_dir_or_refuse(str(out), run, False, False, {'init_from': 'gpt2'})


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"iter": 1, "loss": 0.5}\n{"iter": 2, "loss": 0.4}\n{"iter": 3, "lo')
    log = checkpoint.MetricLog(str(tmp_path), True, start_iter=2)
    assert "metrics.jsonl, line 3: the last line is cut short" in capsys.readouterr().err
    log.log(3, {'loss': 0.3})
    assert [json.loads(line)['iter'] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"iter": 1}\n{"it\n{"iter": 2}\n')  # a broken line before the last: not a crash's doing
    with pytest.raises(UserError, match="metrics.jsonl, line 2: not a JSON line"):
        checkpoint.MetricLog(str(tmp_path), True, start_iter=2)



class FullDisk:
    """A file whose writes stop after n bytes of the text with ENOSPC, as a disk that fills up."""
    def __init__(self, path, mode='r', n=5):
        self.f, self.n = open(path, mode), n

    def write(self, text):
        self.f.write(text[:self.n])
        self.f.flush()
        raise OSError(errno.ENOSPC, 'No space left on device')

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_keeps_the_metric_log_as_it_was_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"iter": 1, "loss": 0.5}\n{"iter": 2, "loss": 0.4}\n{"iter": 3, "loss": 0.3}\n')
    before = path.read_bytes()
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    os.symlink('/dev/full', tmp)  # a resume's new file, written through /dev/full: ENOSPC
    with pytest.raises(UserError, match=f"could not write {path}: the disk is full .*; the log is kept as it was"):
        checkpoint.MetricLog(str(tmp_path), True, start_iter=2)
    assert path.read_bytes() == before
    log = checkpoint.MetricLog(str(tmp_path), True, start_iter=3)
    monkeypatch.setattr(checkpoint, 'open', FullDisk, raising=False)  # the disk fills mid-line
    with pytest.raises(UserError, match=f"could not write {path}: the disk is full .*; its lines before this one "
                                        "are kept"):
        log.log(4, {'loss': 0.2})
    assert path.read_bytes() == before  # the cut line is gone, nothing else


RANK_CODE = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch, common, parallel
from common import UserError
run = parallel.start('cpu', 'float32', 0, timeout_s=2)
marker = {marker!r}
if {test!r} == 'stall':
    if run.rank == 1:
        time.sleep(8)  # a stuck rank
        sys.exit(0)
    t0 = time.time()
    try:
        run.sum(torch.ones(1), 'the loss')
    except UserError as e:
        print(f"{{time.time() - t0:.1f}} {{e}}")
elif {test!r} == 'backward':  # a rank that stops answering while the other's backward all-reduces
    model = parallel.distribute(torch.nn.Linear(4, 1), run)
    if run.rank == 1:
        time.sleep(8)
        sys.exit(0)
    try:
        with common.one_line_errors():
            model(torch.ones(2, 4)).sum().backward()
    except SystemExit as e:
        print(e)
else:  # node_first, 2 nodes of 2 ranks: a node's first rank's block ends before its other ranks' start
    node = run.rank // 2
    with run.node_first():
        if run.local_rank == 0:
            time.sleep(1)
            open(f"{{marker}}{{node}}", 'w').close()  # on the node's own disk
            for n in range(100):  # and on storage both nodes share, by both at once
                with common.atomic_open(marker + '-shared') as f:
                    f.write(str(node) * 100000)
        else:
            print('marker there' if os.path.exists(f"{{marker}}{{node}}") else 'marker missing')
    run.exit_together()
"""


def ranks(test, tmp_path, port, world_size=2, per_node=2):
    code = RANK_CODE.format(root=ROOT, marker=str(tmp_path / 'marker'), test=test)
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, 'RANK': str(r), 'LOCAL_RANK': str(r % per_node), 'WORLD_SIZE': str(world_size),
                                   'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}) for r in range(world_size)]
    return [p.communicate(timeout=120) for p in procs]


@pytest.mark.slow
def test_a_stalled_rank_ends_the_others_with_an_error_naming_the_collective(tmp_path):
    (out0, err0), _ = ranks('stall', tmp_path, 29611)
    assert "rank 0: the all-reduce of the loss waited more than 2 s for the other ranks" in out0, err0[-2000:]
    assert float(out0.split()[0]) < 7  # not the 8 s the stuck rank sleeps


@pytest.mark.slow
def test_a_stalled_rank_in_ddps_backward_ends_the_other_in_one_line(tmp_path):
    (out0, err0), _ = ranks('backward', tmp_path, 29612)
    assert out0.startswith("error: rank 0: a collective (DDP's all-reduce of the gradients in backward, or FSDP's "
                           "gathers) waited past the timeout for the other ranks, one of which stopped"), err0[-2000:]
    assert 'Traceback' not in err0


@pytest.mark.slow
def test_node_first_runs_each_nodes_first_rank_before_its_others(tmp_path):
    """2 nodes of 2 ranks (one machine, LOCAL_RANK set as torchrun sets it on each node): each node's
    second rank finds its own node's file; the file both nodes' first ranks wrote at once is whole."""
    results = ranks('node_first', tmp_path, 29612, world_size=4)
    errors = ''.join(err[-1000:] for _, err in results)
    assert [out.strip() for out, _ in results] == ['', 'marker there', '', 'marker there'], errors
    assert (tmp_path / 'marker-shared').read_text() in ('0' * 100000, '1' * 100000)
    assert sorted(os.listdir(tmp_path)) == ['marker-shared', 'marker0', 'marker1']  # no temporary file left


def test_training_reads_the_cpu_peak_that_bench_measured(tmp_path, monkeypatch):
    from bench import measure_cpu_peak
    monkeypatch.setattr(parallel, 'PEAK_CACHE', str(tmp_path / 'peak_flops.json'))
    assert parallel.peak_flops('cpu', 'float32') is None  # nothing measured: no MFU, and nothing timed here
    peak = measure_cpu_peak('float32', n=128, reps=1)
    assert peak > 0 and parallel.peak_flops('cpu', 'float32') == peak
    assert parallel.peak_flops('cpu', 'bfloat16') is None  # filed by dtype


@pytest.mark.parametrize('rank,message,printed', [('0', 'bad key', True), ('1', 'bad key', False),
                                                  ('1', 'rank 1: the barrier timed out', True)])
def test_under_torchrun_an_error_is_printed_once(rank, message, printed):
    code = f"import common; common.exit_with_error(common.UserError({message!r}))"
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, 'RANK': rank})
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {message}" if printed else '')


def test_a_checkpoint_of_an_older_layout_is_refused_in_one_line(tmp_path):
    """A checkpoint without what this version's resume needs (its script, a DPO run's reference, the
    data order by pairs) says so, and how to go on from its weights, instead of resuming inexactly."""
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.write({'model': {}, 'config': {'init_from': 'gpt2'}}, path)  # no 'script'
    with pytest.raises(UserError, match=f"{path} cannot be resumed: it is a checkpoint of an older version .*"
                                        f"--init_from={tmp_path}$"):
        checkpoint.load(path, script='sft')
    checkpoint.write({'script': 'dpo', 'config': {'init_from': 'gpt2'}}, path)  # no reference recorded
    with pytest.raises(UserError, match="cannot be resumed: it is a checkpoint of an older version"):
        checkpoint.load(path, script='dpo')
    from data import PairLoader
    with pytest.raises(UserError, match="the checkpoint's data order is an older version's"):
        PairLoader(list(range(20)), 4, seed=3).load_state_dict({'epoch': 2, 'batch': 1})


def test_a_resume_keeps_its_recipe(tmp_path):
    """Settings given on a resume must agree with the saved run's, but for where, how long, how
    often and in which layout it goes on; the settings not given come back from ckpt.pt."""
    from configurator import Settings
    path = str(tmp_path / 'ckpt.pt')
    saved = dict(init_from='out-sft', ref_from='out-sft', beta=0.1, loss_type='sigmoid', seed=1337,
                 max_length=512, max_iters=100, eval_interval=50, batch_size=8, device='auto')
    resumable = dict.fromkeys(['model', 'model_args', 'optimizer', 'scaler', 'loader', 'rng'], {})
    checkpoint.write({**resumable, 'script': 'dpo', 'config': saved, 'iter_num': 50}, path)

    def settings(**given):
        s = Settings({**{k: 0 for k in saved}, **given})  # what is not given: the script's defaults
        s.given = frozenset(given)
        return s
    with pytest.raises(UserError, match=r"^a resume keeps the run's recipe, and this one would change beta 0.1 "
                                        r"-> 0.5, loss_type 'sigmoid' -> 'ipo', seed 1337 -> 7 \(saved in "
                                        rf"{path} -> asked now\): drop these settings to resume, or start a new run"):
        checkpoint.load(path, 'dpo', settings(init_from='resume', beta=0.5, loss_type='ipo', seed=7))
    resumed = checkpoint.load(path, 'dpo', settings(init_from='resume', beta=0.1, max_iters=200,
                                                    eval_interval=10, batch_size=4, device='cpu'))
    assert resumed['recipe'] == dict(loss_type='sigmoid', seed=1337, max_length=512)  # not given: saved
    with pytest.raises(UserError, match=r"is at iteration 50, already at max_iters=50: nothing to resume; "
                                        r"give a larger --max_iters"):
        checkpoint.load(path, 'dpo', settings(init_from='resume', max_iters=50))
    checkpoint.load(path, 'dpo', settings(init_from='resume', max_iters=50, eval_only=True))  # evaluate it: fine


def test_one_run_at_a_time_in_an_out_dir(tmp_path):
    """A process that holds out_dir's lock (a run alive) keeps a second run, or a resume, out; the
    OS drops the lock with the process, however it ends."""
    out = tmp_path / 'out'
    holder = subprocess.Popen([sys.executable, '-c', "import checkpoint, sys, time; "
                               f"assert checkpoint.lock_out_dir({str(out)!r}) == ''; print('locked', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        run = parallel.Run()
        for resuming in (False, True):
            with pytest.raises(UserError, match=rf"^out_dir='{out}' is in use by another run \(pid {holder.pid} on "
                                                rf"{socket.gethostname()}, which holds {out}/.lock\): wait for it"):
                checkpoint.claim_out_dir(str(out), run, resuming, False, {'init_from': 'gpt2'})
    finally:
        holder.kill()
        holder.wait()
    checkpoint.claim_out_dir(str(out), parallel.Run(), False, False, {'init_from': 'gpt2'})  # its holder gone
    assert os.listdir(out) == ['.lock']


def test_a_signal_is_noted_and_the_same_signal_again_stops_at_once():
    """After save_on_signals, SIGTERM is noted for stop_signal() to report after the step; SIGINT too
    (torchrun passes a ^C on as SIGTERM, so one of each is not 'again'); SIGTERM again ends the process
    at once with SIGTERM's exit status."""
    code = ("import os, signal, parallel\n"
            "run = parallel.Run()\n"
            "print(run.stop_signal(), flush=True)\n"
            "run.save_on_signals()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "print(run.stop_signal(), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('not reached', flush=True)\n")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and result.stdout.split() == ['0', '15']
    assert result.stderr.splitlines() == [
        "SIGTERM: saving ckpt.pt after this step, then stopping (send SIGTERM again to stop at once, without a save)",
        "SIGINT: saving ckpt.pt after this step, then stopping (send SIGINT again to stop at once, without a save)",
        "SIGTERM again: stopped at once, without a save"]


def test_ctrl_c_before_the_loop_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        with common.one_line_errors():
            raise KeyboardInterrupt
    assert stop.value.code == 130
    assert capsys.readouterr().err == "stopped: SIGINT (^C); nothing was saved\n"


def test_a_run_removes_the_temporary_files_that_killed_runs_left(tmp_path, capsys):
    """kill -9 mid-save leaves ckpt.pt.HOST.PID.tmp; the next run to take out_dir removes those of
    processes that are gone (here: of another host, and of a pid that has ended) and keeps a live one's."""
    out = tmp_path / 'out'
    out.mkdir()
    host = socket.gethostname()
    ended = subprocess.Popen([sys.executable, '-c', 'pass'])
    ended.wait()
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        names = {'dead': f"ckpt.pt.{host}.{ended.pid}.tmp", 'other': "ckpt.pt.node-7.example.org.123.tmp",
                 'live': f"eval.json.{host}.{live.pid}.tmp", 'user': "notes.tmp"}
        for name in names.values():
            (out / name).write_bytes(b'x' * 1000)
        assert checkpoint.lock_out_dir(str(out)) == ''
        assert sorted(os.listdir(out)) == sorted([checkpoint.LOCK, names['live'], names['user']])
        assert f"removed 2 temporary file(s) that a stopped run left in {out} (0.0 MB: " in capsys.readouterr().out
    finally:
        live.kill()
        checkpoint.held_locks.pop(os.path.realpath(out)).close()


def test_an_out_dir_that_cannot_hold_a_run_says_why(tmp_path):
    (tmp_path / 'file').write_text('')
    assert checkpoint.lock_out_dir('') == "out_dir is empty: give the directory the run writes to, --out_dir=DIR"
    assert checkpoint.lock_out_dir(str(tmp_path / 'file')) == (f"out_dir='{tmp_path / 'file'}' is a file, not a "
                                                               "directory: choose another --out_dir")
    assert checkpoint.lock_out_dir('/proc/no_run_here') == ("out_dir='/proc/no_run_here' cannot hold a run: No such "
                                                            "file or directory (/proc/no_run_here/.lock)")


@pytest.mark.parametrize('name, peak', [('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                        ('NVIDIA L40S', 362e12), ('NVIDIA L40', 181e12), ('NVIDIA L4', 121e12),
                                        ('Tesla T4', None)])
def test_a_gpu_takes_the_peak_of_the_longest_name_it_contains(name, peak, monkeypatch):
    monkeypatch.setattr(parallel.torch.cuda, 'get_device_name', lambda device: name)
    assert parallel.peak_flops('cuda', 'bfloat16') == peak

"""
What every module needs once: the one error type for a user's mistakes and the one way a script
ends on it (one line, no traceback), the one atomic file write, and the one download from the
Hugging Face hub. A reader of the training story can leave this file closed.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager


# the token cache, the reference log-prob cache and the CPU's measured peak: the repository's
# data_cache/, or the directory NANODPO_DATA_CACHE names (where the repository is read-only)
DATA_CACHE_DIR = (os.environ.get('NANODPO_DATA_CACHE') or
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data_cache'))

class UserError(ValueError):
    """A mistake a user can make or mend (a setting, a file, a line of data, a model that does not
    fit) or a run that cannot go on (a NaN loss, a full disk, a rank that stopped answering). The
    message is one sentence that says which and where; exit_with_error prints it, no traceback."""


def exit_with_error(error, prefix='error', code=1):
    """End the process with one line, 'error: ...', and exit status code. Under torchrun only rank 0
    prints it (every rank meets the same mistake), unless the error is this rank's own ('rank N: ...')."""
    line = f"{prefix}: {error}"
    if int(os.environ.get('RANK', 0)) == 0 or str(error).startswith('rank '):
        print(line, file=sys.stderr, flush=True)
    stop = SystemExit(line)  # its text is the line (what a caller reads), its exit status code
    stop.code = code
    raise stop


@contextmanager
def one_line_errors():
    """Around a script's run: a UserError ends the process with its one line (exit_with_error), and
    so does ^C where nothing catches it (exit status 130, as SIGINT's own)."""
    try:
        yield
    except UserError as e:
        exit_with_error(e)
    except RuntimeError as e:  # a collective's timeout that no Run.collective named: DDP's backward
        if not is_timeout(e):
            raise
        exit_with_error(f"rank {os.environ.get('RANK', 0)}: a collective (DDP's all-reduce of the "
                        "gradients in backward, or FSDP's gathers) waited past the timeout for the "
                        "other ranks, one of which stopped, crashed or is stuck: see its output "
                        f"({first_line(e, 160)})")
    except KeyboardInterrupt:
        exit_with_error("SIGINT (^C); nothing was saved",
                        prefix='stopped', code=130)


def is_timeout(error):
    """Whether a RuntimeError is a collective's timeout: gloo and nccl both say so in its text."""
    text = str(error).lower()
    return 'timed out' in text or 'timeout' in text


def first_line(error, limit=240):
    """An exception's first line, for a one-line error: cut at a word, never mid-word."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return line if len(line) <= limit else line[:limit].rsplit(' ', 1)[0] + ' ...'


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


def write_failure(path, error, kept):
    """The UserError for a write of path that failed with error: a full disk says so, with the space
    left there; anything else gives the OS's reason. kept: what the failed write left as it was."""
    cause, full = error, False
    while cause is not None and not full:  # torch.save wraps the OSError in a RuntimeError
        full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        cause = cause.__cause__ or cause.__context__
    folder = os.path.dirname(os.path.abspath(path))
    reason = (f"the disk is full ({shutil.disk_usage(folder).free / 1e6:.0f} MB free in {folder})"
              if full else f"{type(error).__name__}: {first_line(error, 300)}")
    return UserError(f"could not write {path}: {reason}; {kept}")


def hub_file(repo_id, filename, repo_type=None, cache_dir=None, offline_hint=''):
    """The local path of a file of a hub repo: the hub cache's copy when there is one, with no
    network call at all (an unreachable hub then costs nothing), else downloaded into the cache.
    A failure is a UserError whose first line names the file; then offline_hint, what to do instead.
    (A repo updated on the hub after the download keeps its cached files: delete them to refresh.)"""
    import logging
    from huggingface_hub import hf_hub_download
    try:
        return check_hub_blob(hf_hub_download(repo_id, filename, repo_type=repo_type,
                                              cache_dir=cache_dir, local_files_only=True))
    except UserError:
        raise
    except Exception:  # not in the cache (yet)
        pass
    what = f"the dataset {repo_id}" if repo_type == 'dataset' else repo_id
    if int(os.environ.get('RANK', 0)) == 0:  # a download (or its retries, offline) takes a while
        print(f"downloading {filename} of {what} from the Hugging Face hub ...", file=sys.stderr,
              flush=True)
    hub_log = logging.getLogger('huggingface_hub')
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # a warning per retry would bury the one line raised below
    try:
        path = hf_hub_download(repo_id, filename, repo_type=repo_type, cache_dir=cache_dir)
    except Exception as e:  # offline, an unknown repo or file, ...
        # a short first line; what to do, and the hub's own words, after it
        raise UserError(f"could not get {filename} of {what} from the Hugging Face hub or its cache\n"
                        f"  without internet: {offline_hint}, or fill the hub cache where there is internet "
                        f"and set HF_HUB_OFFLINE=1\n  the hub's error: {type(e).__name__}: {first_line(e)}") from None
    finally:
        hub_log.setLevel(level)
    return check_hub_blob(path)


def check_hub_blob(path):
    """path, once its bytes are known whole: a hub cache keeps a large (LFS) file, the weights or a
    dataset's shard, as blobs/SHA256, named by the sha256 of its bytes. The first time a blob is read
    (recorded in DATA_CACHE_DIR/verified_blobs.json with its size and mtime) its bytes are checked
    against that name, so a download cut short or a disk's damage stops here in one line, not as
    broken weights later. Small files (named by a git sha1) and local directories have no such name."""
    blob = os.path.realpath(path)
    name = os.path.basename(blob)
    if os.path.basename(os.path.dirname(blob)) != 'blobs' or not re.fullmatch(r'[0-9a-f]{64}', name):
        return path
    stat = os.stat(blob)
    record_path, record = os.path.join(DATA_CACHE_DIR, 'verified_blobs.json'), {}
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        pass
    if record.get(name) == [stat.st_size, stat.st_mtime_ns]:
        return path
    if file_sha256(blob) != name:
        raise UserError(f"{path} is damaged in the hub cache: the sha256 of its bytes is not "
                        f"{name[:16]}..., which the hub names it by (a download cut short?); delete "
                        f"{blob} and {path}, and it is downloaded again")
    record[name] = [stat.st_size, stat.st_mtime_ns]
    try:
        with atomic_open(record_path) as f:
            json.dump(record, f)
    except OSError:  # a read-only cache: checked again next time, nothing worse
        pass
    return path


def file_sha256(path, chunk=1 << 24):
    """The sha256 of a file's bytes, read 16 MB at a time."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()

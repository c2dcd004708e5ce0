"""safety.py -- nothing lost, one clear line: what every script checks before it starts working.

The rules every script here follows (our choice; the paper has nothing to say about files):
  * a mistake gets one line, "error: ...", that says what is wrong and what to do, before any
    work starts wherever it can be known then -- never a traceback minutes into a run;
  * every file is written atomically (atomic_write: the old file or the new one, never half of
    one), with the mode the user's umask gives;
  * nothing a user made is replaced without being asked (--resume, --overwrite);
  * an output folder is proven writable by writing in it, and locked while a process writes there;
  * the disk and the memory the work needs are estimated and checked first, with the numbers.

Layers: this file imports only cdm (to rebuild checkpoints); data.py and everything above use it.
"""
import contextlib
import errno
import inspect
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import torch

import cdm

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no refusal of concurrent runs
    fcntl = None


def fail(msg):
    """Stop with one line on stderr and exit status 1."""
    raise SystemExit(f"error: {msg}")


def size(nbytes):
    """12345678 -> '12.3 MB' (decimal units, as disks are sold)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


def describe(e):
    """An OSError as a person reads it: 'No space left on device: runs/base/ckpt.pt'."""
    what = e.strerror or str(e)
    return f"{what}: {e.filename}" if e.filename else what


# --- atomic files ------------------------------------------------------------------------------
# Files are written so that nothing is ever half-written (our choice, for every script): each
# output goes to a temporary file beside its target, is flushed to disk, and is renamed onto the
# target only when complete -- a rename within a folder is atomic, so a reader sees the old file or
# the new one, never a mixture, and a full disk or a crash leaves the old file intact. The writer
# holds an advisory lock (flock) on its temporary file for as long as it exists, so that a later
# run can tell the leftovers of a killed writer (SIGKILL skips every clean-up) from files being
# written right now, and removes only the former (remove_stale_temporaries).
TMP_PREFIX = ".tmp-cdm-"


def try_lock(fd):
    """Take an exclusive advisory lock on an open file, without waiting: True if taken, False if
    another process holds it, None where this platform or file system has no such locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def default_mode(directory=False):
    """The mode a new file (0o666) or folder (0o777) gets from the user's umask: what open() and
    mkdir() would give, where mkstemp and mkdtemp give 0o600 and 0o700."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_many(writes):
    """writes: {path: write}. Call each write(tmp) on a locked temporary file beside its path, flush
    them all to disk, and only then rename each onto its path: if any write fails (a full disk, an
    error, Ctrl-C), no target is touched and every temporary file is removed."""
    done = []                                              # (fd, tmp, path), in order
    try:
        for path, write in writes.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX)
            done.append((fd, tmp, path))
            try_lock(fd)
            os.chmod(tmp, default_mode())
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for _, tmp, path in done:
            os.replace(tmp, path)
    finally:
        for fd, tmp, _ in done:
            os.close(fd)
            if os.path.exists(tmp):                        # not renamed: an error on the way
                os.remove(tmp)


def atomic_write(path, write):
    """Call write(tmp) on a temporary file in path's folder, flush it to disk, then rename it onto
    path: a crash mid-write leaves the previous file intact, never a half-written one."""
    atomic_write_many({path: write})


def remove_stale_temporaries(folder, min_age=10.0):
    """Remove the temporary files (and folders) that killed writers left in `folder`: those whose
    lock nobody holds. One younger than min_age seconds is kept, since its writer may have made it
    an instant ago and not locked it yet. Returns how many were removed."""
    removed = 0
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)]
    except OSError:
        return 0
    for name in names:
        path = os.path.join(folder, name)
        is_dir = os.path.isdir(path)
        try:                      # a temporary folder is locked through its .lock file
            fd = os.open(os.path.join(path, ".lock") if is_dir else path, os.O_RDONLY)
        except FileNotFoundError:
            fd = None             # a folder whose writer died before it made its .lock
        except OSError:
            continue
        try:
            if (fd is None or try_lock(fd) is True) and time.time() - os.stat(path).st_mtime >= min_age:
                shutil.rmtree(path) if is_dir else os.remove(path)
                removed += 1
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    return removed


# --- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(obj, path):
    """torch.save, atomically (see atomic_write)."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: torch.save rejects some temporary names
            torch.save(obj, f)
    atomic_write(path, write)


CHECKPOINT_FORMAT = 1    # written into every checkpoint; a file of a larger number is refused


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True: a checkpoint holds tensors and plain values only, so a
    hostile file cannot run code. Every failure says what is wrong with which file."""
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpt.pt")
        raise FileNotFoundError(f"checkpoint {path!r} is a folder" + (f": give {inside!r}, the checkpoint in it"
                                                                      if os.path.isfile(inside) else ", not a checkpoint file"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects ...
        raise ValueError(f"cannot read checkpoint {path!r}: it is corrupted, truncated, or holds "
                         f"objects other than tensors and plain values ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path!r} is not a cdm checkpoint (no 'config'/'model' entries)")
    version = ckpt.get("format", 1)                      # checkpoints before formats were numbered: 1
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} was written by a newer version of this code (checkpoint format "
                         f"{version}; this one reads up to {CHECKPOINT_FORMAT}): update the repository to use it")
    return ckpt



def load_stage(path, device="cpu", ema=True):
    """cdm.stage_from_checkpoint of the checkpoint at path, read by load_checkpoint, refusing in one
    line a file this version cannot rebuild exactly: model options it does not know, weights that
    do not fit the file's own config, or weights that are not finite (a diverged run)."""
    ckpt = load_checkpoint(path)
    known = set(inspect.signature(cdm.UNet.__init__).parameters) - {"self"}
    unknown = sorted(set(ckpt["config"]["model"]) - known)
    if unknown:
        raise ValueError(f"{path!r} asks for model options this version does not know ({', '.join(unknown)}): "
                         "it was written by another version of this code; update the repository to use it")
    try:
        stage = cdm.stage_from_checkpoint(ckpt, device, ema)
    except RuntimeError as e:
        raise ValueError(f"the weights in {path!r} do not match its own model config: "
                         f"{str(e).splitlines()[0]}") from None
    bad = [name for name, w in stage.model.state_dict().items() if w.is_floating_point() and not torch.isfinite(w).all()]
    if bad:
        which = "EMA " if ema and ckpt.get("ema") is not None else ""
        raise ValueError(f"the {which}weights in {path!r} are not finite "
                         f"(NaN or inf in {len(bad)} tensors, first {bad[0]}): the run diverged before this "
                         "save; sample an earlier checkpoint (--keep_every) or retrain with a lower --lr")
    return stage


# --- paths -------------------------------------------------------------------------------------
def writable_folder(folder, flag="--out"):
    """Make `folder` and its parents if needed, and prove that files can be written in it by
    writing one: permission bits cannot tell (root, read-only mounts, /proc, quotas). Returns it."""
    if not folder or not folder.strip():
        fail(f"{flag} is empty: name a folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"{flag} {folder} is a file, not a folder: choose a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        fail(f"{flag} {folder}: cannot write there ({e.strerror or e}); choose another folder")
    return folder


def writable_file(path, flag, overwrite=False):
    """Check, before any work, that a file can be written at `path`: not a folder, its folder
    writable, and not an existing file unless `overwrite` (the user asked)."""
    if not path or not path.strip():
        fail(f"{flag} is empty: name a file")
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder: name a file")
    writable_folder(os.path.dirname(path) or ".", flag)
    remove_stale_temporaries(os.path.dirname(path) or ".")
    if os.path.exists(path) and not overwrite:
        fail(f"{flag} {path} exists: add --overwrite to replace it, or choose another name")
    return path


def write_text(path, text):
    """text at path, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def json_safe(obj):
    """obj with every NaN or infinity (not JSON: strict readers reject them) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj, allow_nan=False):
    """obj as JSON at path, atomically; NaN and infinities become null unless allowed (as in
    Python's json module, whose files only Python reads back)."""
    write_text(path, json.dumps(obj if allow_nan else json_safe(obj), indent=1, allow_nan=allow_nan) + "\n")


def save_figure(fig, path, **kwargs):
    """A matplotlib figure as a PNG at path, atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))


_held_locks = {}  # lock file -> its descriptor, for the locks this process holds


def lock_folder(folder, flag="--out"):
    """Refuse a second process writing into `folder` at the same time: an exclusive advisory lock on
    FOLDER/.lock, held until this process exits or unlock_folder. The kernel drops it when the
    process dies, even by SIGKILL, so a crashed run never leaves a stale lock behind; the small
    file itself stays. Locking a folder this process holds already is a no-op."""
    if fcntl is None:
        return
    path = os.path.realpath(os.path.join(folder, ".lock"))
    if path in _held_locks:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        fail(f"{flag} {folder}: cannot create its lock file ({describe(e)})")
    taken = try_lock(fd)
    if taken is False:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        fail(f"another process{f' (pid {pid})' if pid else ''} is writing to {folder} right now: "
             f"wait for it to finish, or choose another {flag}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[path] = fd


def unlock_folder(folder):
    """Release lock_folder's lock (a process that ends releases it anyway)."""
    fd = _held_locks.pop(os.path.realpath(os.path.join(folder, ".lock")), None)
    if fd is not None:
        os.close(fd)


def prepare_output_folder(folder, flag="--out"):
    """Writable, locked for this process, and cleared of the temporary files killed runs left."""
    writable_folder(folder, flag)
    lock_folder(folder, flag)
    remove_stale_temporaries(folder)
    return folder


def visible_entries(folder):
    """What a person sees in a folder: everything but hidden names (.lock, .DS_Store, temporaries)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def refuse_to_replace(paths, what, flag="--out"):
    """Exit with one line if any of `paths` exists: what a user made is replaced only when asked."""
    there = [os.path.basename(p) for p in paths if os.path.exists(p)]
    if there:
        folder = os.path.dirname(paths[0]) or "."
        fail(f"{flag} {folder} already holds {what} ({', '.join(there[:4])}{', ...' if len(there) > 4 else ''}): "
             f"add --overwrite to replace them, or choose another {flag}")


# --- resources ---------------------------------------------------------------------------------
def free_disk(folder):
    """Bytes free for an unprivileged user on the file system holding `folder`."""
    return shutil.disk_usage(folder).free


def check_disk(folder, need, what):
    """Refuse work that will write more than the disk holds, before it starts."""
    free = free_disk(folder)
    if need > free:
        fail(f"{what} will write about {size(need)}, but {folder} has {size(free)} free: free some "
             f"space or choose a folder on another disk")


def available_memory():
    """Bytes of memory this process can still use: MemAvailable (Linux), lowered to what a
    container's memory limit (cgroup v2) leaves; physical memory elsewhere; None if unknown."""
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            have = min(have or float("inf"), int(limit) - used)
    except (OSError, ValueError):
        pass
    if have is None:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return have


def check_memory(need, what, hint=""):
    """Refuse work whose memory need (an estimate, from below) is more than the machine has: a
    MemoryError, or the kernel's OOM killer, would otherwise end it with no useful message."""
    have = available_memory()
    if have is not None and need > have:
        fail(f"{what} needs about {size(need)} of memory, but this machine has {size(have)} "
             f"available{': ' + hint if hint else ''}")


def check_memory_on(device, need, what, hint=""):
    """check_memory for the memory of `device`: a GPU's free memory, or this machine's."""
    if device.type != "cuda":
        return check_memory(need, what, hint)
    import torch
    free = torch.cuda.mem_get_info(device)[0]
    if need > free:
        fail(f"{what} needs about {size(need)} of GPU memory, but {device} has {size(free)} free"
             f"{': ' + hint if hint else ''}")


# --- the entry point of every script -----------------------------------------------------------
def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts():
    """Inside the block, Ctrl-C and SIGTERM are only noted; on leaving it they are raised as one
    KeyboardInterrupt. For code that an interrupt in its middle would leave broken, or that would
    swallow it (forking, for one). Outside the main thread (no signals there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted, parent = [], os.getpid()

    def note(signum, frame):
        if os.getpid() != parent:    # a process forked inside the block, before it set its own
            if signum == signal.SIGTERM:     # handlers: SIGTERM (its pool terminating it) ends it
                os._exit(128 + signum)
            return                           # and Ctrl-C is its parent's to handle
        noted.append(signum)
    before = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if noted and before[noted[0]] not in (signal.SIG_IGN, None):
        raise KeyboardInterrupt


class _ClosedOutputIsNoFailure:
    """stdout or stderr that a closed reader (`python train_base.py | head`) cannot stop: from the
    first write that fails with a broken pipe, the stream's descriptor goes to /dev/null and the
    run goes on, its files saved, instead of dying mid-training."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self):
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run_script(main):
    """Run a script's main() as a shell user expects: Ctrl-C or SIGTERM stops it with one line
    (its `finally:` blocks have removed the temporary files it was writing), a failure of the
    environment -- a full disk, a file it may not read, no memory -- is one error: line, and a
    closed stdout (`| head`) is no reason to lose the run."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ClosedOutputIsNoFailure):
            setattr(sys, name, _ClosedOutputIsNoFailure(stream))
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)   # the default would skip every clean-up
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: stopped before finishing; no file was left half-written", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        fail("out of memory: use a smaller --batch_size, --micro_batch, --n or --res")
    except OSError as e:
        hint = "; free some space and run it again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        fail(describe(e) + hint)
    finally:
        signal.signal(signal.SIGTERM, previous)

"""sandbox.py -- run code we do not trust (a student's cdm.py) with no more rights than it needs.

The grader (assign.py) runs each unit of a student's work as a separate process started here.
Student code is assumed hostile: it reads what its process can read, patches anything in its
own interpreter, writes wherever it may, and tries to outlive the grader. So it gets, layer by
layer, whatever this machine offers (docs/teaching.md says what each layer stops and what not):

  scratch      its own new folder, holding only what it is graded on; removed afterwards
  user         a separate user id (64000 + slot) when the grader runs as root, as on Gradescope:
               it cannot touch the grader's files, nor signal its processes
  landlock     the Linux Landlock LSM (kernel 5.13+, no privileges needed): it reads only the
               Python installation and its scratch folder, writes only the latter, opens no TCP
               connection, and (kernel 6.12+) signals no process and reaches no socket outside
  namespaces   new user, PID and network namespaces: no network at all, and when its first
               process ends or is killed, the kernel kills every process it started
  limits       CPU seconds, address space, file size, open files (and processes, as its own user)
  supervisor   a small trusted process per unit, outside all of the above: it ends the whole
               process tree when the unit ends, times out, or the grader goes away (even by
               SIGKILL: it notices its control pipe closing), and then removes the scratch folder

Nothing here is a promise on every machine: `protections()` says which layers this machine
gives, and the grader prints it. Linux only; elsewhere the grader refuses to run student code.

  python sandbox.py supervise CONFIG_JSON     # started by Sandbox.start; not for people
"""
import ctypes
import json
import os
import resource
import stat
import select
import shutil
import signal
import subprocess
import sys
import time

BASE_UID = 64000                   # slot k runs as uid/gid BASE_UID + k when the grader is root


# --- what this machine offers ---------------------------------------------------------------
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi():
    """The Landlock ABI version the kernel offers (0: none)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        v = _libc().syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # CREATE_RULESET_VERSION
    except (OSError, AttributeError):
        return 0
    return max(0, int(v))


def namespaces_work():
    """Whether an unprivileged process here can make new user, PID and network namespaces (some
    containers' seccomp profiles refuse them). Tried in a throwaway child."""
    if not sys.platform.startswith("linux"):
        return False
    code = ("import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); "
            "sys.exit(0 if l.unshare(0x10000000|0x20000000|0x40000000)==0 else 1)")
    try:
        return subprocess.run([sys.executable, "-I", "-c", code], timeout=30,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def usable_by_others(path):
    """Whether a user with no rights of its own can reach and read `path` (every folder above it
    searchable by others, the path itself readable): the Python a separate user must run."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        while path != "/":
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


def protections():
    """{layer: True/False} for this machine and this user. A separate user needs root, and a
    Python installation that others may run (not, say, one under root's own home)."""
    linux = sys.platform.startswith("linux")
    import torch                                      # what the student's process must import
    python = [sys.executable, sys.base_prefix, sys.prefix, os.path.dirname(torch.__file__)]
    user = linux and os.geteuid() == 0 and all(usable_by_others(p) for p in python)
    return {"scratch": True, "user": user, "landlock": landlock_abi() >= 1,
            "namespaces": namespaces_work(), "limits": linux, "supervisor": linux}


# --- Landlock, by its three system calls (linux/landlock.h) ------------------------------------
_FS_READ = (1 << 0) | (1 << 2) | (1 << 3)            # EXECUTE | READ_FILE | READ_DIR


def _fs_all(abi):
    bits = (1 << 13) - 1                               # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        bits |= 1 << 13                                # REFER
    if abi >= 3:
        bits |= 1 << 14                                # TRUNCATE
    if abi >= 5:
        bits |= 1 << 15                                # IOCTL_DEV
    return bits


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(read_paths, write_paths):
    """Restrict this process and every process it starts from now on: read (and execute) only
    beneath `read_paths`, read and write only beneath `write_paths`; no TCP bind or connect
    (ABI 4+); no signals to, nor abstract sockets of, processes outside (ABI 6+). Irreversible."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError("Landlock is not available")
    libc, fs = _libc(), _fs_all(abi)
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for paths, allowed in ((read_paths, _FS_READ), (write_paths, fs)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue                           # a path this machine lacks
                try:
                    rights = allowed if os.path.isdir(path) else allowed & ((1 << 0) | (1 << 1) | (1 << 2) | (1 << 14))
                    rule = _PathBeneath(rights, fd)
                    if libc.syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                                    ctypes.c_uint32(0)) != 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
                finally:
                    os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:            # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
        if libc.syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)


def python_paths(hidden):
    """What a Python process needs to read to run: the interpreter, its standard library and
    the installed packages (sys.path), the system's shared libraries and /proc, /sys, /dev; less
    anything that is or holds a path in `hidden` (the kit: a virtual environment *inside* the
    kit's folder is kept, the folder itself is not)."""
    hidden = [os.path.realpath(h) for h in hidden]
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys", "/dev"}
    cands |= {p for p in sys.path if p and os.path.isdir(p)}
    out = []
    for p in sorted(cands):
        r = os.path.realpath(p)
        if any(h == r or h.startswith(r.rstrip("/") + "/") for h in hidden):
            continue                                   # reading it would expose the kit
        out.append(r)
    return out


# --- the confined process: set up in the supervisor's child, then exec ------------------------
def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _confine_and_exec(cfg):
    """In the process that becomes the student's: limits, Landlock, then exec the worker.
    Runs after the user and namespaces are set (in _middle); any failure exits 126."""
    libc = _libc()
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)             # PR_SET_PDEATHSIG: dies with its parent
    os.chdir(cfg["scratch"])
    lim = cfg["limits"]
    for name, value in (("RLIMIT_CPU", lim["cpu_seconds"]), ("RLIMIT_AS", lim["memory_bytes"]),
                        ("RLIMIT_FSIZE", lim["file_bytes"]), ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    if cfg["uid"] is not None:                         # its own user: count its processes
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
    if cfg["landlock"]:
        landlock(cfg["read_paths"], [cfg["scratch"], "/dev/null"])
    keep = set(cfg["pass_fds"])
    for fd in range(3, 1024):                          # nothing of the grader's but its pipes
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    out = os.open(os.path.join(cfg["scratch"], cfg["output"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cfg["scratch"], "TMPDIR": cfg["scratch"],
           "LANG": "C.UTF-8", "OMP_NUM_THREADS": str(cfg.get("threads", 1)), "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(cfg["argv"][0], cfg["argv"], env)


def _read_to_end(fd):
    """Everything a pipe carries until its writers close it; the fd is closed after."""
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            os.close(fd)
            return data
        data += chunk


def _middle(cfg, report_fd):
    """The supervisor's child: become the sandbox user, make the namespaces, fork the student's
    first process (PID 1 of the new PID namespace), tell the supervisor its pid, wait for it."""
    try:
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
            _libc().prctl(4, 1, 0, 0, 0)               # PR_SET_DUMPABLE: to write its own uid_map
        if cfg["namespaces"]:
            uid, gid = os.getuid(), os.getgid()
            if _libc().unshare(0x10000000 | 0x20000000 | 0x40000000) != 0:   # USER | PID | NET
                os._exit(125)
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
        # a pipe that closes by itself when the exec succeeds (O_CLOEXEC), or carries why not: the
        # only word on confinement the supervisor takes, since an exit status the student can fake
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            try:
                os.close(report_fd)
                os.close(ready_r)
                _confine_and_exec(cfg)
            except BaseException as e:
                os.write(ready_w, f"{type(e).__name__}: {e}".replace("\n", " ").encode()[:500])
            os._exit(126)
        os.close(ready_w)
        why = _read_to_end(ready_r)
        os.write(report_fd, f"{child}\n".encode() + (b"confined\n" if not why else b"not confined: " + why + b"\n"))
        os.close(report_fd)
        for fd in cfg["pass_fds"]:
            os.close(fd)
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except BaseException:
        os._exit(125)


def _processes():
    """(pid, ppid, session, uid) of every process visible here."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            uid = os.stat(f"/proc/{name}").st_uid
            out.append((int(name), int(fields[1]), int(fields[3]), uid))
        except (OSError, ValueError):
            continue
    return out


def _kill_all_of_user(uid):
    """Kill every process of `uid` (kill(-1) sent as that user: all it may signal)."""
    code = f"import os,signal\nos.setgroups([]); os.setgid({uid}); os.setuid({uid})\nos.kill(-1, signal.SIGKILL)"
    subprocess.run([sys.executable, "-I", "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=30)


def _kill_tree(me, session, pid1, uid):
    """End everything the unit started: its PID 1 (with namespaces that ends them all), every
    process of its user, its session, and anything re-parented to this supervisor."""
    for _ in range(50):
        victims = set()
        if pid1:
            victims.add(pid1)
        for pid, ppid, sid, puid in _processes():
            if pid == me:
                continue
            if sid == session or ppid == me or (uid is not None and puid == uid):
                victims.add(pid)
        if uid is not None:
            _kill_all_of_user(uid)
        victims.discard(me)
        alive = False
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                alive = True
            except OSError:
                pass
        while True:                                    # reap what we can (we are their subreaper)
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break
        pid1 = None
        if not alive:
            return
        time.sleep(0.02)


def supervise(cfg):
    """The per-unit supervisor (trusted; started by Sandbox.start with its own session). Reads
    its control pipe on stdin: a byte 'k' or end of file (the grader ended, or was killed) ends
    the unit. Exits with the student's first process's status, or 137 when it was ended."""
    libc = _libc()
    libc.prctl(36, 1, 0, 0, 0)                         # PR_SET_CHILD_SUBREAPER: orphans come here
    me, session = os.getpid(), os.getsid(0)
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        _middle(cfg, w)
    os.close(w)
    for fd in cfg["pass_fds"]:
        os.close(fd)
    report = _read_to_end(r)
    lines = report.decode(errors="replace").splitlines()
    pid1 = int(lines[0]) if lines and lines[0].isdigit() else 0
    status_line = lines[1] if len(lines) > 1 else "not confined: the separate user or the namespaces were refused"
    os.write(1, (status_line + "\n").encode())          # to the grader: the student cannot reach this pipe
    status, ended_by_grader, data = None, False, b"k"
    while status is None:
        ready, _, _ = select.select([0], [], [], 0.05)
        if ready:
            data = os.read(0, 1)
            if not data or data == b"k":
                ended_by_grader = True
                break
        pid, st = os.waitpid(middle, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(st)
    _kill_tree(me, session, pid1, cfg["uid"])
    if ended_by_grader and not data:                    # the grader is gone: clean up for it
        shutil.rmtree(cfg["cleanup"], ignore_errors=True)
    os._exit(137 if status is None else status & 0xFF)


# --- the grader's side ----------------------------------------------------------------------
class Sandbox:
    """One unit's confined process: start(), then the caller talks to it over the pipes it
    passed, then stop() (or let it exit) and wait()."""

    def __init__(self, scratch, argv, *, slot=0, pass_fds=(), cpu_seconds=300, memory_bytes=6 << 30,
                 file_bytes=256 << 20, processes=64, hidden=(), layers=None, cleanup=None,
                 output="output.txt", threads=1):
        layers = protections() if layers is None else layers
        self.uid = BASE_UID + slot if layers["user"] else None
        self.cfg = {"scratch": scratch, "argv": list(argv), "uid": self.uid, "pass_fds": list(pass_fds),
                    "namespaces": bool(layers["namespaces"]), "landlock": bool(layers["landlock"]),
                    "read_paths": python_paths(hidden), "output": output, "cleanup": cleanup or scratch,
                    "threads": int(threads),
                    "limits": {"cpu_seconds": int(cpu_seconds), "memory_bytes": int(memory_bytes),
                               "file_bytes": int(file_bytes), "processes": int(processes)}}
        self.proc = None

    def start(self):
        if self.uid is not None:
            os.chown(self.cfg["scratch"], self.uid, self.uid)
            for root, dirs, files in os.walk(self.cfg["scratch"]):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), self.uid, self.uid)
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "supervise",
                                      json.dumps(self.cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     pass_fds=self.cfg["pass_fds"], start_new_session=True, close_fds=True)
        return self

    def confinement(self):
        """After wait(): '' if the student's process started confined, else why it did not."""
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        return "" if line == "confined" else (line or "not confined: the supervisor said nothing")

    def stop(self):
        """End the unit's whole process tree now (idempotent)."""
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"k")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass

    def wait(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "supervise":
        supervise(json.loads(sys.argv[2]))
    else:
        sys.exit("sandbox.py is started by assign.py's grader, not by hand")

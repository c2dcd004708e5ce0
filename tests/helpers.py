"""Helpers shared by the tests in tests/: the repository's root (on sys.path, so that the scripts
and test_cdm.py import from any working folder), the tiny training flags, and a script run in this
process or from the shell."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository's root
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import safety  # noqa: E402  (from HERE)


TINY = ["--ch", "8", "--mult", "1,2", "--res_blocks", "1", "--heads", "1", "--batch_size", "4",
        "--n_train", "16", "--steps", "3", "--sample_steps", "2", "--T", "20", "--no_progress",
        "--log_every", "1", "--device", "cpu"]  # CPU behaviour, also on a machine with a GPU


LONG = [*TINY, "--res", "8", "--attn", "4", "--ch", "16", "--n_train", "64", "--batch_size", "8",
        "--save_every", "5"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(script, *args, ok=True, shell=False):
    """`python SCRIPT ARGS` from the repository, its exit status and output (.returncode, .stdout,
    .stderr). By default in this process -- the script's main() under safety.run_script, as its
    `__main__` block runs it, output captured, the folder locks it took released -- which spares
    the suite two seconds of imports a call. shell=True: a process of its own, for what only a
    real process shows (the exit status the shell sees, what reaches the terminal)."""
    if shell:
        p = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                           text=True, cwd=HERE, timeout=300)
    else:
        import contextlib
        import importlib
        import types
        module = importlib.import_module(script[:-3])
        out, err, locks, cwd = io.StringIO(), io.StringIO(), set(safety._held_locks), os.getcwd()
        code = 0
        try:
            os.chdir(HERE)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    safety.run_script(lambda: module.main(list(args)))
                except SystemExit as e:          # what the interpreter makes of sys.exit(code)
                    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
        finally:
            os.chdir(cwd)
            for path in set(safety._held_locks) - locks:   # as the end of its process would
                os.close(safety._held_locks.pop(path))
        p = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def _save(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)

"""Fixtures shared by the tests in tests/ (plain helpers are in helpers.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # helpers.py, whatever the import mode

import pytest  # noqa: E402

from helpers import TINY, run  # noqa: E402  (it puts the repository's root on sys.path)


# One tiny cascade (8 -> 16 -> 32, 3 steps a stage) for the whole session: test_scripts.py and
# test_safety.py both sample from it (into folders of their own).
@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory):
    d = tmp_path_factory.mktemp("cascade")
    run("train_base.py", *TINY, "--res", "8", "--attn", "4", "--out", str(d / "base"))
    run("train_sr.py", *TINY, "--res", "16", "--low_res", "8", "--attn", "", "--aug_T", "20",
        "--sampler", "heun", "--out", str(d / "sr16"))
    run("train_sr.py", *TINY, "--preset", "demo32", "--res", "32", "--low_res", "16", "--attn", "",
        "--out", str(d / "sr32"))
    return d

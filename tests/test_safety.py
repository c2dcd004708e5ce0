"""Nothing lost, one clear line: what users get wrong (safety.py and every script).

Each case is what a person might do -- re-run a command, mistype a path, bring a phone photo,
fill their disk -- and each asserts one "error: ..." line and no traceback, or success with the
right output; where work could be lost, that the files there before are byte-identical after.
docs/safety.md describes the battery.

Run:   python -m pytest -q tests/test_safety.py
"""
import copy
import errno
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import HERE, LONG, TINY, _save, run  # (it puts the repository's root on sys.path)
import cdm
import data
import safety
from test_cdm import Spy, stage_config


# --- checkpoints: written atomically, read back with every check -----------------------------

def test_checkpoint_errors(tmp_path):
    cfg = stage_config()
    model = cdm.model_from_config(cfg["model"])
    good = tmp_path / "good.pt"
    safety.save_checkpoint({"config": cfg, "model": model.state_dict()}, str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted, truncated"):
        safety.load_checkpoint(str(truncated))
    hostile = tmp_path / "hostile.pt"
    torch.save({"config": cfg, "model": {}, "payload": Spy()}, str(hostile))   # a pickled object
    with pytest.raises(ValueError, match="objects other than tensors"):
        safety.load_checkpoint(str(hostile))
    with pytest.raises(FileNotFoundError):
        safety.load_checkpoint(str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    safety.save_checkpoint({"config": stage_config(model={**cfg["model"], "model_channels": 8}),
                         "model": model.state_dict()}, str(other))
    with pytest.raises(ValueError, match="do not match its own model config"):
        safety.load_stage(str(other))


# --- the battery ------------------------------------------------------------------------------

def files_of(folder):
    """{relative path: sha256} of every file under `folder` (lock files aside): to prove a refused
    command left them byte-identical."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            if n != ".lock":
                p = os.path.join(root, n)
                out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def refused(main, argv, says, keep=None):
    """main(argv) exits with one 'error: ...' line containing `says`, and the files under `keep`
    (a folder) are exactly what they were."""
    before = files_of(keep) if keep else None
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg.strip(), msg
    assert says in msg, msg
    if keep:
        assert files_of(keep) == before
    return msg


def shell(script, *args, **kw):
    """A script run as from the shell: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                       text=True, cwd=HERE, timeout=300, **kw)
    return p.returncode, p.stdout, p.stderr


def one_error_line(stderr, says):
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error: ") and says in lines[-1], stderr


@pytest.fixture
def trained(tiny_cascade, tmp_path):
    """A copy of the tiny cascade's base run: a folder a user trained (ckpt, log, preview)."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(tiny_cascade / "base", out)
    return out


def test_a_new_run_into_a_finished_one_is_refused_and_overwrite_replaces_it(trained):
    import train_base
    flags = [*TINY, "--res", "8", "--attn", "4", "--out", str(trained)]
    refused(train_base.main, flags, "already holds a training run", keep=trained)
    (trained / "ckpt_0000002.pt").write_bytes(b"an old kept checkpoint")
    train_base.main([*flags, "--overwrite"])
    assert not (trained / "ckpt_0000002.pt").exists()                    # the old run's files went
    assert len((trained / "log.jsonl").read_text().splitlines()) == 3    # the log starts afresh


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    import train_base
    refused(train_base.main, [*TINY, "--out", str(tmp_path / "typo"), "--resume"], "nothing to resume")
    assert not (tmp_path / "typo").exists()


def test_a_second_run_into_the_same_out_at_once_is_refused(tmp_path):
    import fcntl
    import importlib
    import train_base
    out = tmp_path / "busy"
    out.mkdir()
    holder = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)     # another process's lock, as the
    fcntl.flock(holder, fcntl.LOCK_EX)                          # kernel sees it (its own open file)
    os.pwrite(holder, b"4242\n", 0)
    try:
        refused(train_base.main, [*TINY, "--out", str(out)], "another process (pid 4242) is writing")
        refused(importlib.import_module("sample").main, ["--out", str(out)], "is writing to")
    finally:
        os.close(holder)
    assert safety.visible_entries(str(out)) == []


@pytest.mark.parametrize("out,says", [
    ("", "--out is empty"),
    ("FILE", "is a file, not a folder"),
    ("FILE/sub", "cannot write there"),
    ("/proc/self", "cannot write there"),          # exists, and no file can be made in it
    ("/proc/cdm-nowhere/run", "cannot write there"),
    ("x" * 300, "cannot write there"),              # a name too long for the file system
])
@pytest.mark.parametrize("script", ["train_base", "sample"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(script, out, says, tmp_path, monkeypatch):
    import importlib
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a user's file")
    module = importlib.import_module(script)
    refused(module.main, ([*TINY] if script == "train_base" else []) + ["--out", out], says, keep=tmp_path)


def test_evaluate_never_writes_its_classifier_over_a_file_that_is_no_cache(trained, tiny_cascade, tmp_path):
    import evaluate
    import sample
    samples = tmp_path / "samples"
    sample.main(["--device", "cpu", str(tiny_cascade / "base" / "ckpt.pt"), "--n", "8", "--steps", "2",
                 "--out", str(samples), "--no_progress"])
    ckpt = trained / "ckpt.pt"
    refused(evaluate.main, ["--samples", str(samples), "--classifier", str(ckpt)],
            "looks like a model checkpoint", keep=trained)
    garbage = tmp_path / "notes.pt"
    garbage.write_text("my notes")
    refused(evaluate.main, ["--samples", str(samples), "--classifier", str(garbage)],
            "cannot be read as a classifier cache")
    assert garbage.read_text() == "my notes"
    cache = tmp_path / "clf.pt"
    first = evaluate.main(["--samples", str(samples), "--classifier", str(cache), "--json", str(tmp_path / "e.json")])
    refused(evaluate.main, ["--samples", str(samples), "--classifier", str(cache), "--json", str(tmp_path / "e.json")],
            "--json", keep=tmp_path)                                  # an existing result: kept
    again = evaluate.main(["--samples", str(samples), "--classifier", str(cache), "--json",
                           str(tmp_path / "e.json"), "--overwrite"])
    assert again["accuracy"] == first["accuracy"]                     # the cache was reused
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 8
    refused(evaluate.main, ["--samples", str(samples), "--json", str(tmp_path)], "is a folder")


def write_samples(path, x, y, **extra):
    np.savez(path, arr_0=x, arr_1=y, **extra)
    return str(path)


@pytest.mark.parametrize("case,says", [
    ("float", "not uint8"),
    ("not square", "not square"),
    ("one sample", "at least 2"),
    ("no samples", "at least 2"),
    ("labels missing", "not arr_0 and arr_1"),
    ("too few labels", "non-negative integer labels"),
    ("labels out of range", "has 8 classes"),
    ("gray samples, colour data", "1-channel"),
    ("not an npz", "cannot be read"),
])
def test_evaluate_checks_the_samples_it_is_given(case, says, tmp_path):
    import evaluate
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    y = np.arange(6) % 8
    path = tmp_path / "s.npz"
    if case == "float":
        write_samples(path, x / 255.0, y)
    elif case == "not square":
        write_samples(path, x[:, :, :4], y)
    elif case in ("one sample", "no samples"):
        write_samples(path, x[:1 if case == "one sample" else 0], y[:1 if case == "one sample" else 0])
    elif case == "labels missing":
        np.savez(path, arr_0=x)
    elif case == "too few labels":
        write_samples(path, x, y[:3])
    elif case == "labels out of range":
        write_samples(path, x, y + 20)
    elif case == "gray samples, colour data":
        write_samples(path, x[..., :1], y)
    else:
        path.write_bytes(b"PK not really")
    refused(evaluate.main, ["--samples", str(path), "--data", "shapes", "--classifier", str(tmp_path / "c.pt")],
            says)
    assert not (tmp_path / "c.pt").exists()                           # refused before the work


def test_evaluate_refuses_samples_of_another_dataset(tiny_cascade, tmp_path):
    import evaluate
    import sample
    samples = tmp_path / "samples"
    sample.main(["--device", "cpu", str(tiny_cascade / "base" / "ckpt.pt"), "--n", "8", "--steps", "2",
                 "--out", str(samples), "--no_progress"])
    folder = tmp_path / "mine"
    for k in range(8):                                                # 8 classes too, other names
        (folder / f"class{k}").mkdir(parents=True)
        for i in range(10):
            _save(folder / f"class{k}" / f"{i}.png", np.full((8, 8, 3), 30 * k))
    refused(evaluate.main, ["--samples", str(samples), "--data", str(folder), "--classifier",
                            str(tmp_path / "c.pt")], "trained on shapes")


def relabelled_checkpoint(src, dst, class_names, data_name):
    ckpt = safety.load_checkpoint(str(src))
    ckpt["config"] = {**ckpt["config"], "class_names": class_names, "data": data_name}
    safety.save_checkpoint(ckpt, str(dst))
    return str(dst)


def test_nothing_is_sampled_silently_wrong_from_a_bad_or_foreign_checkpoint(tiny_cascade, tmp_path, monkeypatch):
    """A checkpoint whose weights are NaN (it sampled all-black images and exited 0), one of a
    newer checkpoint format, one asking for a model option this version does not know, a run
    folder given as a checkpoint, and a stage that samples non-finite values: each one line,
    naming the file or the stage, and no file written."""
    base = torch.load(tiny_cascade / "base" / "ckpt.pt", weights_only=True)
    assert base["format"] == safety.CHECKPOINT_FORMAT
    cases = {}
    nan = copy.deepcopy(base)
    for key in ("model", "ema"):
        nan[key][next(iter(nan[key]))].fill_(float("nan"))
    cases["nan.pt"] = (nan, "are not finite (NaN or inf")
    newer = dict(base, format=safety.CHECKPOINT_FORMAT + 1)
    cases["newer.pt"] = (newer, f"checkpoint format {safety.CHECKPOINT_FORMAT + 1}; this one reads up to")
    option = copy.deepcopy(base)
    option["config"]["model"]["flash_norm"] = True
    cases["option.pt"] = (option, "model options this version does not know (flash_norm)")
    for name, (ckpt, says) in cases.items():
        torch.save(ckpt, tmp_path / name)
        p = run("sample.py", str(tmp_path / name), "--out", str(tmp_path / name[:-3]), "--no_progress", ok=False)
        assert p.returncode == 1 and says in p.stderr and p.stderr.count("\n") == 1, (name, p.stderr)
        assert not (tmp_path / name[:-3]).exists() or not safety.visible_entries(str(tmp_path / name[:-3]))
    p = run("sample.py", str(tiny_cascade / "base"), "--out", str(tmp_path / "folder"), ok=False)
    assert p.returncode == 1 and "is a folder: give" in p.stderr and "ckpt.pt" in p.stderr
    real = cdm.sample_cascade
    monkeypatch.setattr(cdm, "sample_cascade", lambda *a, **k: [x * float("nan") for x in real(*a, **k)])
    p = run("sample.py", str(tiny_cascade / "base" / "ckpt.pt"), "--out", str(tmp_path / "nanout"), "--n", "4",
            "--no_progress", ok=False)
    assert p.returncode == 1 and "stage 1" in p.stderr and "non-finite" in p.stderr, p.stderr
    assert not (tmp_path / "nanout" / "samples.npz").exists()
    monkeypatch.setattr(cdm, "sample_cascade", real)
    # a network that overflows late in the chain: the error names the stage and the first such t
    forward, seen = cdm.UNet.forward, []
    def overflowing(self, x, t, **kw):
        seen.append(int(t.max()))
        return forward(self, x, t, **kw) * (float("inf") if int(t.max()) <= 300 else 1.0)
    monkeypatch.setattr(cdm.UNet, "forward", overflowing)
    p = run("sample.py", str(tiny_cascade / "base" / "ckpt.pt"), "--out", str(tmp_path / "infout"), "--n", "2",
            "--no_progress", ok=False)
    first = next(t for t in seen if t <= 300)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "stage 1" in p.stderr and "first non-finite or beyond +-10000" in p.stderr, p.stderr
    assert f"at t = {first};" in p.stderr, p.stderr
    assert not (tmp_path / "infout" / "samples.npz").exists()
    # finite but absurd (a bias of 1e38): x0_hat clipped to -1 made all-black images with exit 0
    monkeypatch.setattr(cdm.UNet, "forward", forward)
    huge = safety.load_checkpoint(str(tiny_cascade / "base" / "ckpt.pt"))
    for key in ("model", "ema"):
        huge[key]["out.2.bias"] = torch.full_like(huge[key]["out.2.bias"], 1e38)
    torch.save(huge, tmp_path / "huge.pt")
    p = run("sample.py", str(tmp_path / "huge.pt"), "--out", str(tmp_path / "hugeout"), "--n", "2", "--sampler", "ddim",
            "--no_progress", ok=False)
    assert p.returncode == 1 and "broke down" in p.stderr and "beyond +-10000" in p.stderr, p.stderr
    assert not (tmp_path / "hugeout" / "samples.npz").exists()


def _adobe_rgb_icc():
    """An ICC v2 matrix/TRC profile with Adobe RGB (1998)'s D50-adapted primaries and gamma
    563/256: written here, as no such file ships with Pillow or this machine."""
    import struct
    fixed = lambda *v: b"".join(struct.pack(">i", round(x * 65536)) for x in v)
    xyz = lambda *v: b"XYZ \0\0\0\0" + fixed(*v)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 563) + b"\0\0"
    tags = [(b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.60974, 0.31111, 0.01947)),
            (b"gXYZ", xyz(0.20528, 0.62567, 0.06087)), (b"bXYZ", xyz(0.14919, 0.06322, 0.74457)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    table, body, offset = b"", b"", 128 + 4 + 12 * len(tags)
    for sig, data_ in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data_))
        body += data_
    size = offset + len(body)
    header = struct.pack(">II", size, 0) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp" \
        + bytes(24) + struct.pack(">I", 0) + fixed(0.9642, 1.0, 0.8249) + bytes(48)
    return header + struct.pack(">I", len(tags)) + table + body


def test_images_with_a_colour_profile_are_read_in_srgb(tmp_path):
    """A photograph tagged Adobe RGB is converted to sRGB as a viewer shows it (it was read with
    the profile ignored): checked against the closed form, the primaries' XYZ through sRGB's."""
    rgb = np.array([[[30, 200, 30], [120, 120, 120], [200, 60, 150]]], np.uint8)
    path = tmp_path / "adobe.png"
    Image.fromarray(rgb).save(path, icc_profile=_adobe_rgb_icc())
    got = np.asarray(data.as_seen(Image.open(path)), dtype=np.float64)
    adobe = np.array([[0.60974, 0.20528, 0.14919], [0.31111, 0.62567, 0.06322], [0.01947, 0.06087, 0.74457]])
    srgb = np.array([[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169],
                     [0.0139322, 0.0971045, 0.7141733]])
    lin = np.clip(np.linalg.solve(srgb, adobe @ ((rgb[0] / 255.0) ** (563 / 256)).T).T, 0, 1)
    want = 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    assert np.abs(got[0] - want).max() <= 3, (got[0], want)
    assert np.abs(got[0] - rgb[0]).max() >= 20                  # the profile changed what is seen
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    assert np.array_equal(np.asarray(data.as_seen(Image.open(tmp_path / "plain.png"))), rgb)


def test_bench_checks_its_json_path_before_benchmarking(tmp_path):
    """bench.py --json into a folder it cannot write failed after the whole benchmark, with a
    traceback; now one line before any work (no row is printed)."""
    (tmp_path / "file").write_text("")
    for target, says in ((tmp_path / "file" / "out.json", "--json"), (tmp_path, "is a folder")):
        p = run("bench.py", "--configs", "base8", "--device", "cpu", "--json", str(target), ok=False)
        assert p.returncode == 1 and says in p.stderr and p.stderr.startswith("error:"), p.stderr
        assert "img/s" not in p.stdout and "base8" not in p.stdout, p.stdout


def test_evaluate_refuses_a_corrupt_stages_file_before_any_work(tmp_path):
    """evaluate.py beside a truncated or foreign stages.npz ended in a traceback after training
    its classifier; now one line naming the file, before the work."""
    x = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    data.write_npz(str(tmp_path / "samples.npz"), x, np.arange(4) % 2)
    for content in (b"PK\x03\x04 truncated", pickle.dumps({"a": 1})):
        (tmp_path / "stages.npz").write_bytes(content)
        p = run("evaluate.py", "--samples", str(tmp_path), "--classifier", str(tmp_path / "clf.pt"), ok=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and "stages.npz: cannot be read" in p.stderr, p.stderr
        assert not (tmp_path / "clf.pt").exists()


def test_a_closed_stdout_does_not_lose_the_run(tmp_path):
    """`python train_base.py | head`: once head has its lines and exits, the next print met a
    broken pipe and the run died without its checkpoint (exit status 0 all the same); now the run
    goes on and saves."""
    import shlex
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, os.path.join(HERE, "train_base.py"), *TINY, "--steps", "30",
                                            "--res", "8", "--attn", "4", "--out", str(tmp_path / "run")])
    p = subprocess.run(f"{cmd} 2>&1 | head -c 20", shell=True, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and len(p.stdout) == 20
    assert (tmp_path / "run" / "ckpt.pt").exists()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) >= 30


def test_a_decompression_bomb_given_to_low_res_is_one_line(tiny_cascade, tmp_path):
    """A 200-megapixel PNG of 24 KB given to sample.py --low_res ended in a traceback (Pillow's
    own bomb error escaped the reader), and a PNG whose text chunk unpacks past Pillow's limit
    gave an error naming no file; every image reader now shares one guarded path."""
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")
    p = run("sample.py", str(tiny_cascade / "sr16" / "ckpt.pt"), "--low_res", str(tmp_path / "bomb.png"),
            "--out", str(tmp_path / "out"), "--no_progress", ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "decompression bomb" in p.stderr, p.stderr
    with pytest.raises(ValueError, match="decompression bomb"):
        data.open_as_seen(str(tmp_path / "bomb.png"))
    from PIL import PngImagePlugin                  # a text chunk that unpacks past Pillow's limit
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (3 << 20), zip=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "text.png", pnginfo=info)
    with pytest.raises(ValueError, match=r"could not read image .*text\.png: Decompressed data too large"):
        data.open_as_seen(str(tmp_path / "text.png"))


def _lying_npz(path, shape):
    """An .npz whose arr_0 header claims `shape` (uint8) but stores 16 bytes; arr_1 is fine."""
    import zipfile
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": shape})
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", head.getvalue() + bytes(16))
        z.writestr("arr_1.npy", labels.getvalue())


def test_an_npz_whose_header_lies_is_one_line_naming_it(tmp_path):
    """A few-KB .npz whose arr_0 header claims 196 GB ended in 'out of memory: use a smaller
    --batch_size' (or a traceback): the header is now read first and the file named."""
    _lying_npz(tmp_path / "samples.npz", (10 ** 6, 256, 256, 3))
    p = run("evaluate.py", "--samples", str(tmp_path / "samples.npz"), ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "arr_0's header says uint8 (1000000, 256, 256, 3) (196.6 GB), but 16 bytes are stored" in p.stderr
    assert "batch_size" not in p.stderr
    with pytest.raises(ValueError, match="header says"):
        data.load_dataset(str(tmp_path / "samples.npz"), 8)
    # as training data: the header, not 'needs about 196.6 GB of memory' (the memory check came first)
    p = run("train_base.py", *TINY, "--data", str(tmp_path / "samples.npz"), "--out", str(tmp_path / "run"), ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "header says" in p.stderr and "memory" not in p.stderr, p.stderr
    # an array of Python objects: refused by name (it was numpy's 'Object arrays cannot be loaded
    # when allow_pickle=False', naming no file)
    np.savez(tmp_path / "objects.npz", np.array([{"a": 1}, None], dtype=object), np.zeros(2, np.int64))
    p = run("evaluate.py", "--samples", str(tmp_path / "objects.npz"), ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "objects.npz: arr_0 holds Python objects (a pickle), which are never loaded" in p.stderr, p.stderr


def test_class_folders_that_are_broken_or_looping_links_are_refused_by_name(tmp_path):
    """A class folder that is a broken link or a link loop was skipped: the model trained on
    fewer classes than the folder holds, and no one was told."""
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(root / c / f"{k}.png")
    assert len(data.load_dataset(str(root), 8).class_names) == 2
    (root / "c").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"imgs/c is a link that leads nowhere"):
        data.load_dataset(str(root), 8)
    (root / "c").unlink()
    (root / "d").symlink_to(root / "d")
    with pytest.raises(ValueError, match=r"imgs/d is a link that leads nowhere \(broken, or a loop\)"):
        data.load_dataset(str(root), 8)


def test_a_cascade_of_stages_trained_on_different_data_is_refused(tiny_cascade, tmp_path):
    import sample
    sr = relabelled_checkpoint(tiny_cascade / "sr16" / "ckpt.pt", tmp_path / "sr.pt",
                               [f"digit{k}" for k in range(8)], "data/digits")
    refused(sample.main, [str(tiny_cascade / "base" / "ckpt.pt"), sr, "--n", "2", "--out", str(tmp_path / "o")],
            "class 0 is 'digit0', stage 1's is 'circle'")
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_sample_refuses_to_replace_earlier_samples_and_writes_all_or_nothing(tiny_cascade, tmp_path, monkeypatch):
    import sample
    out = tmp_path / "samples"
    flags = ["--device", "cpu", str(tiny_cascade / "base" / "ckpt.pt"), "--n", "4", "--steps", "2",
             "--no_progress", "--out", str(out)]
    sample.main(flags)
    refused(sample.main, flags, "already holds samples of an earlier run", keep=out)
    # A full disk while the four files are written: none of the earlier ones is touched, no
    # temporary file stays behind.
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data, "write_npz", full)
    refused(sample.main, [*flags, "--overwrite", "--seed", "1"], "No space left on device", keep=out)
    assert sorted(os.listdir(out)) == [".lock", "grid.png", "samples.npz", "stages.npz", "stages.png"]
    monkeypatch.undo()
    sample.main([*flags, "--overwrite", "--seed", "1"])               # asked for: replaced
    assert files_of(out) != {}


def test_a_full_disk_while_training_ends_in_one_line_and_keeps_the_last_checkpoint(trained, monkeypatch):
    import train_base
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    before = (trained / "ckpt.pt").read_bytes()
    msg = refused(train_base.main, [*TINY, "--res", "8", "--attn", "4", "--steps", "5", "--out", str(trained),
                                    "--resume"], "No space left on device")
    assert "the last good checkpoint" in msg and "at step 3, is intact" in msg
    assert (trained / "ckpt.pt").read_bytes() == before                  # the log has steps 4, 5 more
    assert not [n for n in os.listdir(trained) if n.startswith(".tmp")]


def test_a_real_file_size_limit_while_training_ends_in_one_line(trained):
    """The same from the shell, with a real failing write: RLIMIT_FSIZE makes every write past the
    limit fail (EFBIG; Python ignores SIGXFSZ), as a full disk would, with nothing to mount."""
    import resource
    limit = (trained / "ckpt.pt").stat().st_size // 2
    before = files_of(trained)
    rc, _, err = shell("train_base.py", *TINY, "--res", "8", "--attn", "4", "--steps", "5", "--out", str(trained),
                       "--resume", preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert rc == 1
    one_error_line(err, "could not write the checkpoint of step 5: File too large")
    after = files_of(trained)
    assert after["ckpt.pt"] == before["ckpt.pt"] and not [n for n in os.listdir(trained) if n.startswith(".tmp")]


def test_disk_and_memory_are_checked_before_the_work(tiny_cascade, tmp_path, monkeypatch):
    import sample
    import train_base
    monkeypatch.setattr(safety, "free_disk", lambda folder: 10_000)
    refused(train_base.main, [*TINY, "--out", str(tmp_path / "a")], "will write about")
    assert safety.visible_entries(str(tmp_path / "a")) == []           # nothing written
    refused(sample.main, [str(tiny_cascade / "base" / "ckpt.pt"), "--n", "1000", "--out", str(tmp_path / "s")],
            "sampling 1000 images of 8 pixels will write about")
    assert safety.visible_entries(str(tmp_path / "s")) == []
    monkeypatch.undo()
    monkeypatch.setattr(safety, "available_memory", lambda: 10 ** 9)
    refused(train_base.main, [*TINY, "--T", "100000000", "--out", str(tmp_path / "b")], "--T 100000000 needs about 12.0 GB")
    refused(train_base.main, [*TINY, "--n_train", "1000000", "--out", str(tmp_path / "c")], "1000000 images) needs about")
    refused(train_base.main, [*TINY, "--batch_size", "100000", "--n_train", "100000", "--out", str(tmp_path / "d")],
            "needs about")


def test_sampling_more_than_memory_holds_is_refused(tiny_cascade, tmp_path):
    rc, _, err = shell("sample.py", str(tiny_cascade / "base" / "ckpt.pt"), "--n", str(10 ** 9), "--out",
                       str(tmp_path / "o"))
    assert rc == 1
    one_error_line(err, "sampling 1000000000 images of 8 pixels needs about")


def test_a_folder_at_a_resolution_too_large_to_hold_is_refused(tmp_path):
    src = small_folder(tmp_path / "src")
    rc, _, err = shell("train_base.py", *TINY, "--data", src, "--res", "65536", "--mult", "1", "--attn", "",
                       "--out", str(tmp_path / "o"))
    assert rc == 1
    one_error_line(err, "at --res 65536 (12 images) needs about 309.2 GB of memory")
    import train_base
    refused(train_base.main, [*TINY, "--data", src, "--out", os.path.join(src, "run")], "is inside --data")
    assert not os.path.exists(os.path.join(src, "run"))


def test_gray_samples_are_scored_against_gray_data(tmp_path):
    import evaluate
    folder = tmp_path / "gray"
    rng = np.random.default_rng(0)
    for k in range(2):
        (folder / f"c{k}").mkdir(parents=True)
        for i in range(20):
            img = np.zeros((8, 8), np.uint8)
            img[:, 4 * k:4 * k + 4] = rng.integers(150, 256)           # class 0 left half, 1 right
            Image.fromarray(img, "L").save(folder / f"c{k}" / f"{i}.png")
    real = data.load_dataset(str(folder), 8)
    assert real.channels == 1
    x = real.x.permute(0, 2, 3, 1).numpy()                            # (N, 8, 8, 1): one channel
    out = evaluate.main(["--samples", write_samples(tmp_path / "s.npz", x, real.y.numpy()), "--data", str(folder),
                         "--classifier", str(tmp_path / "c.pt")])
    assert out["accuracy"] == 1.0 and out["channel_difference"] == 0 and out["n"] == 36


def test_labels_that_are_no_class_indices_are_refused(tmp_path):
    x = np.zeros((10, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=x, arr_1=np.array([0] * 9 + [2 ** 40]))
    with pytest.raises(ValueError, match="labels go up to 1099511627776 for 10 images"):
        data.load_dataset(str(tmp_path / "d.npz"), 8)


def test_log_is_strict_json_outputs_get_the_umask_mode_and_keep_every_keeps(tmp_path):
    out = tmp_path / "m"
    rc, _, err = shell("train_base.py", *TINY, "--res", "8", "--attn", "4", "--steps", "7", "--save_every", "5",
                       "--keep_every", "3", "--out", str(out), preexec_fn=lambda: os.umask(0o022))
    assert rc == 0, err
    def strict(text):                                                  # NaN is not JSON
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
    lines = [strict(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and all(len(l["mse_quarters"]) == 4 for l in lines)
    assert any(v is None for l in lines for v in l["mse_quarters"])   # batch 4: some quarter empty
    for name in ("ckpt.pt", "log.jsonl", "samples_000007.png", "ckpt_0000003.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    # --keep_every 3 with --save_every 5: kept at 3 and 6 all the same (they were never saved)
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000003.pt", "ckpt_0000006.pt"]


def test_json_files_are_strict_json(tmp_path):
    path = tmp_path / "r.json"
    safety.write_json(str(path), {"psnr": [31.5, float("inf")], "fid": float("nan"), "n": 3})
    strict = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the file"))
    assert strict == {"psnr": [31.5, None], "fid": None, "n": 3}
    assert (path.stat().st_mode & 0o777) == safety.default_mode()      # the umask's, not mkstemp's 0600


def test_a_diverged_run_before_its_first_save_says_so(tmp_path):
    rc, _, err = shell("train_base.py", *LONG, "--steps", "50", "--save_every", "100", "--lr", "1",
                       "--warmup", "0", "--grad_clip", "0", "--lr_decay", "none", "--out", str(tmp_path / "nan"))
    assert rc == 1
    one_error_line(err, "no checkpoint was saved yet")


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(trained, tmp_path):
    import fcntl
    stale = trained / (safety.TMP_PREFIX + "killed")
    stale.write_bytes(b"half a checkpoint")
    live = trained / (safety.TMP_PREFIX + "live")
    live.write_bytes(b"being written")
    old = time.time() - 60
    for p in (stale, live):
        os.utime(p, (old, old))
    holder = os.open(live, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)                               # its writer is still at it
    try:
        run("train_base.py", *TINY, "--res", "8", "--attn", "4", "--steps", "4", "--out", str(trained), "--resume")
        assert not stale.exists() and live.exists()
    finally:
        os.close(holder)
    # data.py glyphs: its temporary folder from a killed run goes at the next run
    leftover = tmp_path / (safety.TMP_PREFIX + "glyphs-abc")
    (leftover / "0").mkdir(parents=True)
    os.utime(leftover, (old, old))
    data.main(["glyphs", str(tmp_path / "g"), "--n", "2", "--res", "8"])
    assert not leftover.exists() and len(list((tmp_path / "g").rglob("*.png"))) == 28


def test_glyphs_on_a_full_disk_leave_nothing_behind(tmp_path, monkeypatch):
    calls = []
    def save(self, *a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    real = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save)
    refused(lambda argv: safety.run_script(lambda: data.main(argv)), ["glyphs", str(tmp_path / "g"), "--n", "2"],
            "No space left on device")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_loading_or_preparing_is_one_line(tmp_path):
    for args, ready in (
            ([*TINY, "--n_train", "200000", "--out", str(tmp_path / "t")], tmp_path / "t" / ".lock"),
            (["prepare", str(tmp_path / "src"), "--res", "8", "--out", str(tmp_path / "p")],
             tmp_path / "p.partial" / ".lock")):
        if args[0] == "prepare":
            small_folder(tmp_path / "src", per_class=1000)
        script = "data.py" if args[0] == "prepare" else "train_base.py"
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), *args], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # as in a terminal: a shell's background job would ignore SIGINT
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("interrupted"), err
        if args[0] == "prepare":             # where the work so far is kept, how much, what to do
            assert f"{tmp_path / 'p.partial'} keeps the" in err and "the same command resumes it" in err, err
    # the same Ctrl-C, delivered at a known moment: while prepare is locking its folder (the lock
    # file exists, nothing is kept yet). A signal sent on seeing the lock may land there.
    hit = ("import os, signal, sys, data, safety\n"
           "safety.remove_stale_temporaries = lambda folder: os.kill(os.getpid(), signal.SIGINT)\n"
           "sys.argv = ['data.py', *sys.argv[1:]]\n"
           "safety.run_script(data.main)\n")
    p = subprocess.run([sys.executable, "-c", hit, "prepare", str(tmp_path / "src"), "--res", "8",
                        "--out", str(tmp_path / "q")], cwd=HERE, capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as above
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    assert f"{tmp_path / 'q.partial'} keeps the 0 bytes prepared so far" in p.stderr, p.stderr


# --- images as a person sees them -------------------------------------------------------------

def png_16bit_rgb(path, array):
    """Write a 16-bit RGB PNG by hand (Pillow writes 16-bit gray only): signature, IHDR, IDAT, IEND."""
    import struct
    import zlib
    h, w, _ = array.shape
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\0" + array[r].astype(">u2").tobytes() for r in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_images_are_read_as_a_person_sees_them(tmp_path):
    """16-bit gray scaled, not clipped; 16-bit RGB; EXIF orientation applied; transparency over
    white; hidden files, AppleDouble twins and __MACOSX skipped; a decompression bomb refused."""
    import struct
    import zlib
    d = tmp_path / "imgs" / "a"
    d.mkdir(parents=True)
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)   # 0..63000
    Image.fromarray(ramp).save(d / "gray16.png")
    assert Image.open(d / "gray16.png").mode.startswith("I;16")
    png_16bit_rgb(d / "rgb16.png", np.stack([ramp, ramp // 2, 65535 - ramp], -1))
    # upright: a bright top-left corner. Stored as a sensor would, turned, with the tag that says so
    upright = np.zeros((16, 16, 3), np.uint8)
    upright[:4, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 clockwise to view"
    Image.fromarray(np.rot90(upright, 1).copy()).save(d / "phone.png", exif=exif)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255                                 # red where opaque, red-but-invisible elsewhere
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "cutout.png")
    (d / "._gray16.png").write_bytes(b"\0\5\26\7 AppleDouble")   # macOS's resource-fork twin
    (d / ".DS_Store").write_bytes(b"Bud1")
    (d / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (tmp_path / "imgs" / "__MACOSX" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "__MACOSX" / "a" / "._x.png").write_bytes(b"\0\5\26\7")
    ds = data.load_dataset(str(tmp_path / "imgs"), 8)
    assert ds.class_names == ["a"] and len(ds) == 4
    x = {name: ds.x[i] for i, name in enumerate(["cutout", "gray16", "phone", "rgb16"])}   # sorted names
    expect = torch.from_numpy(np.rint(ramp / 257).astype(np.uint8))
    assert torch.equal(x["gray16"][0], expect) and torch.equal(x["gray16"][1], expect)
    assert (x["rgb16"][0].int() - expect.int()).abs().max() <= 1   # Pillow keeps the high byte
    assert (x["rgb16"][2].int() - (255 - expect.int())).abs().max() <= 1
    want = data._center_crop_resize(Image.fromarray(upright), 8)
    assert torch.equal(x["phone"], want) and x["phone"][:, 0, 0].tolist() != [0, 0, 0]
    assert x["cutout"][:, 0, 0].tolist() == [255, 0, 0] and x["cutout"][:, 7, 0].tolist() == [255, 255, 255]
    # A decompression bomb: a valid header promising 30000 x 30000 pixels, refused before decoding.
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                                 + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="bomb.png: it has more than 178 megapixels"):
        data.load_dataset(str(tmp_path / "imgs"), 8)


def test_a_class_folder_of_unsupported_photos_says_what_to_do(tmp_path):
    (tmp_path / "f" / "cat").mkdir(parents=True)
    (tmp_path / "f" / "cat" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    with pytest.raises(ValueError, match="only .heic files: convert them to PNG or JPEG"):
        data.load_dataset(str(tmp_path / "f"), 8)


# --- data.py prepare: exactly what the last command asked for, or a refusal -------------------

def small_folder(root, per_class=6):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _save(root / name / f"{i}.png", rng.integers(0, 256, (16, 16, 3)))
    return str(root)


def test_prepare_with_other_options_refuses_instead_of_mixing_arrays(tmp_path):
    src = small_folder(tmp_path / "src")
    out, partial = str(tmp_path / "prep"), tmp_path / "prep.partial"
    (tmp_path / "src" / "b" / "5.png").write_bytes(b"broken")          # stops the first run part-way
    with pytest.raises(ValueError, match="could not read"):
        data.prepare_folder(src, [8, 16], out, progress=False, workers=1, chunk=2)
    assert json.loads((partial / "progress.json").read_text())["done"] == 10
    # asked for other resolutions while that one is unfinished: refused, nothing touched
    rc, _, err = shell("data.py", "prepare", src, "--res", "16", "--out", out)
    assert rc == 1
    one_error_line(err, "holds an unfinished preparation of 12 images of")
    small_folder(tmp_path / "fix", 6)
    (tmp_path / "src" / "b" / "5.png").write_bytes((tmp_path / "fix" / "b" / "5.png").read_bytes())
    assert data.prepare_folder(src, [16, 8], out, progress=False, workers=1, chunk=2) == out   # resumed
    assert sorted(os.listdir(out)) == [".lock", "classes.json", "images_16.npy", "images_8.npy", "labels.npy",
                                       "prepare.json"]
    for res in (8, 16):
        assert torch.equal(data.load_dataset(out, res).x[:], data.load_dataset(src, res).x)
    before = files_of(out)
    rc, stdout, _ = shell("data.py", "prepare", src, "--res", "8,16", "--out", out)   # the same command
    assert rc == 0 and "already prepared" in stdout and files_of(out) == before
    rc, _, err = shell("data.py", "prepare", src, "--res", "32", "--out", out)         # another one
    assert rc == 1 and files_of(out) == before
    one_error_line(err, "is already prepared (12 images of")


def test_prepare_checks_and_reserves_the_disk_first(tmp_path, monkeypatch):
    src = small_folder(tmp_path / "src")
    monkeypatch.setattr(safety, "free_disk", lambda folder: 1000)
    with pytest.raises(SystemExit, match="preparing 12 images at 8 will write about"):
        data.prepare_folder(src, [8], str(tmp_path / "p"), progress=False, workers=1)
    assert not (tmp_path / "p.partial").exists()
    monkeypatch.undo()
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ValueError, match=r"No space left.*p\.partial keeps the .* prepared so far"):   # not SIGBUS, later
        data.prepare_folder(src, [8], str(tmp_path / "p"), progress=False, workers=1)


def test_a_prepared_file_truncated_while_training_is_one_line(tmp_path):
    src = small_folder(tmp_path / "src", per_class=20)
    out = data.prepare_folder(src, [8], str(tmp_path / "prep"), progress=False, workers=1)
    images = data.load_dataset(out, 8).x
    path = os.path.join(out, "images_8.npy")
    os.truncate(path, os.path.getsize(path) - 10 * 192)
    with pytest.raises(OSError, match="truncated"):
        images[torch.arange(40)]
    rc, _, err = shell("train_base.py", *TINY, "--data", out, "--res", "8", "--attn", "4",
                       "--out", str(tmp_path / "run"))
    assert rc == 1
    one_error_line(err, "is truncated: it holds 30 of its 40 images")

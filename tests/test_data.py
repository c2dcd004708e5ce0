"""data.py: the embedded datasets, conversions and flips, CIFAR-10, image folders (and their
prepared copies), low-res inputs, .npz files.

Run:   python -m pytest -q tests/test_data.py
"""
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import HERE, TINY, _save  # (it puts the repository's root on sys.path)
import data
import safety


# --- the embedded shapes dataset --------------------------------------------------------------

def test_make_shapes_deterministic_and_seeded():
    x1, y1 = data.make_shapes(64, seed=1)
    x2, y2 = data.make_shapes(64, seed=1)
    x3, y3 = data.make_shapes(64, seed=2)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (64, 64, 64, 3) and x1.dtype == np.uint8
    assert y1.shape == (64,) and y1.dtype == np.int64


def test_make_shapes_chunking_does_not_change_images():
    # All random parameters are drawn up front, so the chunk size is only a memory knob.
    a, _ = data.make_shapes(40, seed=5, chunk=7)
    b, _ = data.make_shapes(40, seed=5, chunk=512)
    assert np.array_equal(a, b)


def test_make_shapes_balanced_and_not_constant():
    x, y = data.make_shapes(80, seed=0)
    assert np.bincount(y, minlength=8).tolist() == [10] * 8
    per_image_std = x.reshape(80, -1).astype(np.float32).std(axis=1)
    assert per_image_std.min() > 10  # every image has a visible shape on its background


def test_make_shapes_class_hue():
    # Each class has its own base hue k/8: the brightest pixels of class k point at that hue.
    x, y = data.make_shapes(64, seed=4)
    for img, k in zip(x.astype(np.float32) / 255, y):
        bright = img[img.max(-1) >= np.quantile(img.max(-1), 0.97)].mean(0)  # mean fg colour
        r, g, b = bright
        hue = (np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) / 360) % 1
        assert min(abs(hue - k / 8), 1 - abs(hue - k / 8)) < 0.06, (k, hue)


def test_make_shapes_stripe_angle_per_class():
    # Inside the shape the brightness varies along (cos k*22.5deg, sin k*22.5deg). The structure
    # tensor's dominant gradient direction recovers that angle (central differences bias it a few
    # degrees, well under the 22.5 degrees between classes).
    x, y = data.make_shapes(32, seed=6)
    for img, k in zip(x.astype(np.float32), y):
        bright = img.max(-1) > 100  # foreground value >= 0.42*255, background <= 0.35*255
        inner = bright.copy()
        for sy in range(-2, 3):  # erode by 2 px so the shape's edges add no gradient
            for sx in range(-2, 3):
                inner &= np.roll(bright, (sy, sx), (0, 1))
        L = img.mean(-1)
        gx = (np.roll(L, -1, 1) - np.roll(L, 1, 1))[inner]
        gy = (np.roll(L, -1, 0) - np.roll(L, 1, 0))[inner]
        angle = np.degrees(0.5 * np.arctan2(2 * (gx * gy).sum(), (gx * gx - gy * gy).sum())) % 180
        error = abs(angle - 22.5 * k)
        assert inner.sum() > 50 and min(error, 180 - error) < 10, (k, angle)


def test_shapes_texture_is_lost_at_low_res():
    # An 8x8 area downsample (64 -> 8) keeps each 8x8 block's mean and discards its within-block
    # variation. Inside the shapes (bright blocks) that variation is the stripe texture and is large;
    # on the smooth background (dark blocks) it is ~0. So the 8x8 copy really lacks the detail.
    x, _ = data.make_shapes(128, seed=3)
    blocks = x.astype(np.float32).reshape(128, 8, 8, 8, 8, 3)
    within_std = blocks.std(axis=(2, 4)).mean(-1)  # (N, 8, 8)
    brightness = blocks.mean(axis=(2, 4)).max(-1)  # foreground value >= 0.42*255 > background 0.35*255
    fg, bg = brightness > 110, brightness < 85
    assert np.median(within_std[fg]) > 12
    assert np.median(within_std[bg]) < 2.5


def test_load_shapes_low_res_is_area_downsample():
    hi = data.load_dataset("shapes", 64, n=48, seed=7)
    lo = data.load_dataset("shapes", 16, n=48, seed=7)
    expected = F.avg_pool2d(hi.x.float(), 4).round().to(torch.uint8)
    assert lo.x.shape == (48, 3, 16, 16) and lo.x.dtype == torch.uint8
    assert torch.equal(lo.x, expected) and torch.equal(lo.y, hi.y)
    assert hi.num_classes == 8 and hi.class_names == data.SHAPE_NAMES and len(hi) == 48


def test_load_shapes_splits_differ_and_bad_res():
    train = data.load_dataset("shapes", 16, "train", n=32)
    test = data.load_dataset("shapes", 16, "test", n=32)
    assert not torch.equal(train.x, test.x)
    for res in (128, 48):
        with pytest.raises(ValueError, match="res must divide 64"):
            data.load_dataset("shapes", res, n=8)


# --- conversions and flips --------------------------------------------------------------------

def test_to_float_to_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = data.to_float(x)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(data.to_uint8(f), x)
    assert data.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped


def test_random_flip_flips_about_half():
    x = torch.randn(2000, 3, 4, 5)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    out = data.random_flip(x, u)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()  # each example is untouched or exactly mirrored
    assert 900 < mirrored.sum() < 1100  # p = 0.5, std 22
    assert torch.equal(mirrored, u < 0.5)


def test_flips_default_per_source_and_off_means_off(tmp_path):
    import train_base
    import train_sr
    import trainer
    flip = lambda script, *a: script.parse_args(list(a)).flip
    assert flip(train_base, "--data", "cifar10") and flip(train_base, "--preset", "imagenet32")
    assert flip(train_sr, "--preset", "imagenet64") and flip(train_sr, "--preset", "imagenet256")
    assert not flip(train_base, "--data", "shapes") and not flip(train_sr, "--preset", "demo32")
    assert not flip(train_base, "--data", str(tmp_path)) and not flip(train_base, "--data", "x.npz")
    assert flip(train_base, "--data", str(tmp_path), "--flip")
    assert not flip(train_base, "--preset", "imagenet32", "--no_flip")
    # Off means off: every batch the model is trained on is unmirrored. The images are
    # left-to-right ramps (dark left edge), so a mirrored one has a bright left edge.
    ramp = torch.linspace(0, 255, 8).round().to(torch.uint8).expand(64, 3, 8, 8).clone()
    dataset = data.ImageData(ramp, torch.arange(64) % 2, 2, ["a", "b"])
    for on in (False, True):
        args = train_base.parse_args([*TINY, "--res", "8", "--attn", "", "--batch_size", "16",
                                      "--steps", "4", "--out", str(tmp_path / str(on)),
                                      "--flip" if on else "--no_flip"])
        seen = []

        def spy(x0, c, train, rng):
            if train:
                seen.append(x0[:, 0, 0, 0] > x0[:, 0, 0, -1])  # mirrored?
            return {"c": c}
        trainer.train(args, trainer.make_config(args, dataset), dataset, spy)
        mirrored = torch.cat(seen)
        assert len(mirrored) == 64
        assert (mirrored.sum() == 0) if not on else (16 <= mirrored.sum() <= 48)
        assert safety.load_checkpoint(str(tmp_path / str(on) / "ckpt.pt"))["config"]["flip"] == on


# --- CIFAR-10 (a tiny archive in the official format) -----------------------------------------

def _make_fake_cifar(root, per_batch=3):
    """cifar-10-python.tar.gz layout: pickled dicts with bytes keys, data (N, 3072) channel-major."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(os.path.join(root, data.CIFAR10_FILE), "w:gz") as tar:
        def add(name, obj):
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [b"x.png"] * per_batch}
            batches[name] = d
            add(name, d)
        add("batches.meta", {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES],
                             b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    path = os.path.join(root, data.CIFAR10_FILE)
    return path, batches, hashlib.md5(open(path, "rb").read()).hexdigest()


def test_cifar10_round_trip(tmp_path, monkeypatch):
    path, batches, md5 = _make_fake_cifar(tmp_path)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    train = data.load_dataset("cifar10", 32, "train", root=str(tmp_path))
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.x.shape == (15, 3, 32, 32) and train.x.dtype == torch.uint8
    assert torch.equal(train.x, torch.from_numpy(raw.reshape(15, 3, 32, 32)))
    # channel-major layout: the first 1024 bytes are the red plane, row by row
    assert train.x[0, 0, 0, 1] == raw[0, 1] and train.x[0, 1, 0, 0] == raw[0, 1024]
    assert train.y.tolist() == labels and train.num_classes == 10
    assert train.class_names == data.CIFAR10_CLASSES
    test = data.load_dataset("cifar10", 16, "test", root=str(tmp_path), n=2)
    expected = F.avg_pool2d(torch.from_numpy(batches["test_batch"][b"data"][:2].reshape(2, 3, 32, 32)).float(), 2)
    assert torch.equal(test.x, expected.round().to(torch.uint8))
    assert test.y.tolist() == batches["test_batch"][b"labels"][:2]


def test_cifar10_checksum_and_missing_archive(tmp_path, monkeypatch):
    _make_fake_cifar(tmp_path)
    # the real MD5 (module default) does not match the fake archive
    with pytest.raises(ValueError, match="checksum"):
        data.load_dataset("cifar10", 32, root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--download"):
        data.load_dataset("cifar10", 32, root=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="res must divide 32"):
        data.load_dataset("cifar10", 64, root=str(tmp_path))


def test_cifar10_download_path(tmp_path, monkeypatch):
    # No network in tests: "download" the fake archive from a file:// URL.
    src, batches, md5 = _make_fake_cifar(tmp_path)
    monkeypatch.setattr(data, "CIFAR10_URL", "file://" + os.path.abspath(src))
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    root = tmp_path / "dl"
    d = data.load_dataset("cifar10", 32, "test", root=str(root), download=True)
    assert len(d) == 3 and os.listdir(root) == [data.CIFAR10_FILE]  # no temp file left behind


# --- image folders ----------------------------------------------------------------------------

def test_image_folder(tmp_path):
    red, green = [255, 0, 0], [0, 255, 0]
    (tmp_path / "b_dogs").mkdir()
    (tmp_path / "a_cats").mkdir()
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:] = red
    wide[:, 20:40] = green  # the centre square is all green, the left/right thirds red
    _save(tmp_path / "a_cats" / "wide.png", wide)
    _save(tmp_path / "a_cats" / "tall.PNG", np.full((50, 20, 3), 200))  # extension case-insensitive
    _save(tmp_path / "b_dogs" / "small.bmp", np.full((5, 5, 3), 30))     # smaller than res: upsampled
    (tmp_path / "b_dogs" / "notes.txt").write_text("not an image")        # ignored
    d = data.load_dataset(str(tmp_path), 8)  # fewer than 10 images a class: none held out
    assert d.x.shape == (3, 3, 8, 8) and d.x.dtype == torch.uint8
    assert d.class_names == ["a_cats", "b_dogs"] and d.num_classes == 2
    # round-robin order: cats/tall, dogs/small, cats/wide (files sorted within a class)
    assert d.y.tolist() == [0, 1, 0]
    assert (d.x[2] == torch.tensor(green, dtype=torch.uint8)[:, None, None]).all()
    assert (d.x[0] == 200).all() and (d.x[1] == 30).all()
    assert data.load_dataset(str(tmp_path), 8, n=2).y.tolist() == [0, 1]  # n keeps both classes
    assert data.class_names_for(str(tmp_path)) == ["a_cats", "b_dogs"]


def test_prepare_folder_writes_the_arrays_a_run_loads(tmp_path):
    """`python data.py prepare` decodes each image once into memory-mapped arrays, one per
    resolution; a training run on that folder sees exactly what it would read from the images."""
    rng = np.random.default_rng(0)
    src = tmp_path / "train"
    for k, name in enumerate(["n01", "n02"]):
        (src / name).mkdir(parents=True)
        for i in range(3):
            _save(src / name / f"{i}.jpg", rng.integers(0, 256, (40 + 8 * i, 64 - 4 * i, 3)))
    p = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "prepare", str(src), "--res", "8,16",
                        "--out", str(tmp_path / "imnet")], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr
    assert "prepared 6 images at 8, 16" in p.stdout and "images/s" in p.stdout
    for res in (8, 16):
        prepared = data.load_dataset(str(tmp_path / "imnet"), res)
        direct = data.load_dataset(str(src), res)
        assert torch.equal(prepared.x[:], direct.x) and torch.equal(prepared.y, direct.y)
        assert torch.equal(prepared.x[torch.tensor([4, 1])], direct.x[[4, 1]])   # read by index
        assert prepared.num_classes == 2 and prepared.x.shape == (6, 3, res, res)
        assert prepared.class_names == ["n01", "n02"] == data.class_names_for(str(tmp_path / "imnet"))
    with pytest.raises(ValueError, match="prepared at 8, 16, not 32"):
        data.load_dataset(str(tmp_path / "imnet"), 32)
    p = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "prepare", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode != 0 and "not a folder" in p.stderr and "Traceback" not in p.stderr


def test_prepare_resumes_after_an_interruption(tmp_path):
    """A prepare stopped part-way (here: a corrupt file in the last chunk) keeps what it finished;
    run again, it decodes only the rest and ends with the arrays an uninterrupted run writes."""
    rng = np.random.default_rng(1)
    src = tmp_path / "train"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        for i in range(5):
            _save(src / name / f"{i}.png", rng.integers(0, 256, (24, 24, 3)))
    whole = data.prepare_folder(str(src), [8], str(tmp_path / "whole"), progress=False, workers=2, chunk=3)
    good = (src / "b" / "4.png").read_bytes()
    (src / "b" / "4.png").write_bytes(b"not a png")                  # item 9 of 10: the last chunk
    with pytest.raises(ValueError, match="could not read image"):
        data.prepare_folder(str(src), [8], str(tmp_path / "out"), progress=False, workers=2, chunk=3)
    assert not (tmp_path / "out").exists()                           # only complete folders appear
    progress = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert progress["done"] == 9
    (src / "b" / "4.png").write_bytes(good)
    done = data.prepare_folder(str(src), [8], str(tmp_path / "out"), progress=False, workers=2, chunk=3)
    assert not (tmp_path / "out.partial").exists()
    a, b = data.load_dataset(whole, 8), data.load_dataset(done, 8)
    assert torch.equal(a.x[:], b.x[:]) and torch.equal(a.y, b.y) and len(a.y) == 10


def test_prepared_data_is_read_by_index_not_loaded(tmp_path):
    """Training memory does not grow with the dataset: a 240 MB prepared set stays on disk, and
    drawing 100 batches from it raises the resident set by a few MB, not 240."""
    folder = tmp_path / "big"
    folder.mkdir()
    N = 20_000
    x = np.lib.format.open_memmap(folder / "images_64.npy", mode="w+", dtype=np.uint8, shape=(N, 64, 64, 3))
    for i in range(0, N, 2000):
        x[i:i + 2000] = np.random.default_rng(i).integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8)
    x.flush()
    del x
    np.save(folder / "labels.npy", np.arange(N) % 10)
    (folder / "classes.json").write_text(json.dumps([str(k) for k in range(10)]))
    code = f"""
import resource, torch, data
d = data.load_dataset({str(folder)!r}, 64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
g = torch.Generator().manual_seed(0)
for _ in range(100):
    batch = data.to_float(d.x[torch.randint(0, len(d.y), (32,), generator=g)])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(d.y), tuple(batch.shape), grown)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 0, p.stderr
    n, grown_kb = p.stdout.split(" ", 1)[0], int(p.stdout.split()[-1])
    assert n == str(N) and "(32, 3, 64, 64)" in p.stdout
    assert grown_kb < 20_000, f"resident set grew by {grown_kb / 1024:.0f} MB"


def test_image_folder_holds_out_every_tenth_image_of_each_class(tmp_path):
    # The "test" split of a folder is what evaluate.py scores against: every 10th image of each
    # class (sorted names), never seen in training; "train" is the rest, None (prepare) is all.
    for name, count in (("a", 25), ("b", 12)):
        (tmp_path / name).mkdir()
        for i in range(count):
            _save(tmp_path / name / f"{i:03d}.png", np.full((4, 4, 3), 100 * (name == "b") + i))
    train = data.load_dataset(str(tmp_path), 4, "train")
    test = data.load_dataset(str(tmp_path), 4, "test")
    codes = lambda d: sorted((int(k), int(v)) for k, v in zip(d.y, d.x[:, 0, 0, 0]))
    assert codes(test) == [(0, 9), (0, 19), (1, 109)]
    assert len(train) == 25 + 12 - 3 and not set(codes(train)) & set(codes(test))
    assert test.num_classes == train.num_classes == 2
    items, _ = data._folder_items(str(tmp_path), None)
    assert len(items) == 37
    (tmp_path / "c").mkdir()  # a class too small to hold anything out still trains
    _save(tmp_path / "c" / "0.png", np.zeros((4, 4, 3)))
    assert (data.load_dataset(str(tmp_path), 4, "train").y == 2).sum() == 1
    small = tmp_path / "small"
    (small / "x").mkdir(parents=True)
    _save(small / "x" / "0.png", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="no held-out images"):
        data.load_dataset(str(small), 4, "test")


def test_glyphs_are_deterministic_gray_on_black_and_handed(tmp_path):
    x, y = data.make_glyphs(6, 32, seed=0)
    x2, _ = data.make_glyphs(6, 32, seed=0)
    assert np.array_equal(x, x2) and not np.array_equal(x, data.make_glyphs(6, 32, seed=1)[0])
    assert x.shape == (6 * 14, 32, 32) and np.bincount(y).tolist() == [6] * 14
    border = np.concatenate([x[:, :2].ravel(), x[:, -2:].ravel(), x[:, :, :2].ravel(), x[:, :, -2:].ravel()])
    assert (border == 0).mean() > 0.95                # flat black backgrounds
    assert all(x[i].max() >= 150 for i in range(len(x)))  # every image holds a bright glyph
    # handedness: the stem of a 'b' (ascender) and a 'p' (descender) is on the left, of a 'd' and
    # a 'q' on the right: where the ink of the top (b, d) or bottom (p, q) third of each glyph's
    # box lies, left (< 0) or right (> 0) of the box's centre, in units of its width
    def lean(img, part):
        ys, xs = np.nonzero(img > 64)
        third = (ys.max() - ys.min() + 1) / 3
        sel = ys < ys.min() + third if part == "top" else ys > ys.max() - third
        return (xs[sel].mean() - (xs.min() + xs.max()) / 2) / (xs.max() - xs.min() + 1)
    xg, yg = data.make_glyphs(20, 32, seed=0)
    side = {ch: np.mean([lean(im, "top" if ch in "bd" else "bottom")
                         for im in xg[yg == data.GLYPH_CLASSES.index(ch)]]) for ch in "bdpq"}
    assert max(side["b"], side["p"]) < -0.05 and min(side["d"], side["q"]) > 0.05, side
    # written as an image folder that the loaders read as 14 gray classes
    folder = tmp_path / "glyphs"
    assert data.write_glyphs(str(folder), 10, 16) == 140
    assert Image.open(folder / "b" / "0000.png").mode == "L"
    loaded = data.load_dataset(str(folder), 16, "test")
    assert loaded.class_names == sorted(data.GLYPH_CLASSES) and len(loaded) == 14
    assert loaded.channels == 1 and loaded.rgb().shape[1] == 3  # gray: a 1-channel dataset
    with pytest.raises(ValueError, match="not empty"):  # never writes over a user's folder
        data.write_glyphs(str(folder), 10, 16)


def test_gray_sources_become_one_channel_and_colour_ones_stay_rgb(tmp_path):
    for name, colour in (("gray", False), ("colour", True)):
        for k in ("a", "b"):
            (tmp_path / name / k).mkdir(parents=True)
            img = np.random.default_rng(0).integers(0, 256, (8, 8, 3))
            if not colour:
                img[..., 1] = img[..., 2] = img[..., 0]
            _save(tmp_path / name / k / "0.png", img)
        d = data.load_dataset(str(tmp_path / name), 8)
        assert d.channels == (3 if colour else 1) and d.rgb().shape == (2, 3, 8, 8)
    gray = data.load_dataset(str(tmp_path / "gray"), 8)
    assert torch.equal(gray.rgb()[:, 1], gray.x[:, 0])           # R = G = B when expanded
    assert data.load_dataset("shapes", 8, n=16).channels == 3


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load_dataset(str(tmp_path), 8)
    (tmp_path / "cats").mkdir()
    _save(tmp_path / "cats" / "a.png", np.zeros((8, 8, 3)))
    (tmp_path / "dogs").mkdir()
    with pytest.raises(ValueError, match="dogs contains no images"):
        data.load_dataset(str(tmp_path), 8)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_dataset(str(tmp_path), 8)


def test_low_res_folders_are_refused_at_their_first_wrong_image(tmp_path, monkeypatch):
    """data.load_low_res checks each image as it reads it: a folder of the wrong size is refused
    after one image (check_size sees the first), of mixed sizes at the first odd one, by name."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        _save(folder / f"{i}.png", np.full((8 if i != 3 else 12, 8 if i != 3 else 12, 3), 40 * i))
    reads = []
    real = data._read_native
    monkeypatch.setattr(data, "_read_native", lambda p: reads.append(p) or real(p))
    def wrong(size):
        raise ValueError(f"{size}x{size} is not 16x16")
    with pytest.raises(ValueError, match="8x8 is not 16x16"):
        data.load_low_res(str(folder), check_size=wrong)
    assert len(reads) == 1
    reads.clear()
    with pytest.raises(ValueError, match=r"different sizes \(.*3.png is 12x12, .*0.png 8x8\)"):
        data.load_low_res(str(folder), check_size=lambda size: None)
    assert len(reads) == 4
    x, labels, names = data.load_low_res(str(folder), n_max=3)
    assert x.shape == (3, 3, 8, 8) and labels is None and names is None
    assert x[:, 0, 0, 0].tolist() == [0, 40, 80]                    # sorted order


# --- .npz (ADM convention) --------------------------------------------------------------------

def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 3, 1, 3, 2])
    path = str(tmp_path / "samples.npz")
    data.save_npz(path, x, y)
    assert os.listdir(tmp_path) == ["samples.npz"]  # the atomic write left no temp file
    with np.load(path) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_1"].dtype == np.int64
    d = data.load_dataset(path, 16)
    assert torch.equal(d.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert d.y.tolist() == y.tolist() and d.num_classes == 4
    d8 = data.load_dataset(path, 8, n=2)
    assert torch.equal(d8.x, F.avg_pool2d(d.x[:2].float(), 2).round().to(torch.uint8))
    assert len(data.load_dataset(path, 6)) == 5  # non-integer factor goes through PIL's BOX filter
    with pytest.raises(ValueError, match="upsampling"):
        data.load_dataset(path, 32)


def test_npz_center_crop(tmp_path):
    x = np.zeros((1, 4, 12, 3), np.uint8)
    x[:, :, 4:8] = 255  # only the centre 4x4 square is white
    path = str(tmp_path / "wide.npz")
    data.save_npz(path, x, [0])
    assert (data.load_dataset(path, 4).x == 255).all()


def test_npz_errors(tmp_path):
    good = np.zeros((2, 8, 8, 3), np.uint8)
    cases = {"dtype.npz": dict(arr_0=good.astype(np.float32), arr_1=[0, 1]),
             "noarr0.npz": dict(images=good, arr_1=[0, 1]),
             "labels.npz": dict(arr_0=good, arr_1=[0, 1, 1]),
             "nhwc.npz": dict(arr_0=good.transpose(0, 3, 1, 2), arr_1=[0, 1])}
    messages = {"dtype.npz": "uint8", "noarr0.npz": "no arr_0", "labels.npz": "2 non-negative integer labels",
                "nhwc.npz": r"\(N, H, W, 3\)"}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=messages[name]):
            data.load_dataset(str(tmp_path / name), 8)
    with pytest.raises(ValueError, match="uint8"):
        data.save_npz(str(tmp_path / "x.npz"), good.astype(np.float32), [0, 1])


def test_unknown_source():
    for source in ("imagenet", "/no/such/dir", "missing.npz"):
        with pytest.raises(ValueError, match="accepted: 'shapes', 'cifar10'"):
            data.load_dataset(source, 32)

"""Datasets for the cascade: one loader, five sources, one format.

    load_dataset("shapes", 16)                   embedded procedural dataset, no download
    load_dataset("cifar10", 32, download=True)   official python archive, MD5-checked
    load_dataset("path/to/train_dir", 64)        image folder, one sub-folder per class
    load_dataset("data/imagenet_train", 64)      a folder `python data.py prepare` wrote (on disk)
    load_dataset("samples.npz", 64)              ADM convention: arr_0 uint8 NHWC, arr_1 labels

Everything comes back as an ImageData holding uint8 (N, C, res, res) images and int64 labels: C = 3
(RGB), or C = 1 when a folder or .npz holds only grayscale images (keep_gray_as_one_channel).
Images stay uint8 in memory (4x smaller than float32) and are converted per batch with to_float;
a prepared folder's images stay on disk (DiskImages) and are read per batch by index.

Low-res copies are always *area* (box) downsamples of the high-res images, never re-renders: this is
exactly how a cascade's SR training pairs (x0, z0) are made, so `load_dataset("shapes", 16)` is the
conditioning a 16->32 stage sees for `load_dataset("shapes", 32)` [our choice: the paper does not
name the filter; anti-aliased area downsampling is the usual one].
"""
import errno
import hashlib
import json
import os
import pickle
import sys
import tarfile
import urllib.request
from dataclasses import dataclass

import numpy as np
import numpy.random  # noqa: F401 -- now, not lazily mid-run: a Ctrl-C inside numpy's lazy import of it was seen lost
import torch
import torch.nn.functional as F

import cdm
import safety

SHAPE_NAMES = ["circle", "square", "triangle", "plus", "ring", "diamond", "h-bar", "v-bar"]
SHAPES_RES = 64  # native resolution of the embedded dataset
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # tests monkeypatch this for a tiny fake archive
CIFAR10_FILE = "cifar-10-python.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# Never images, whatever their extension: hidden files (macOS's ._* AppleDouble twins and
# .DS_Store, editors' .swp) and the folder macOS's zip tool adds (__MACOSX, full of ._* files).
SKIPPED_FOLDERS = {"__MACOSX"}
MAX_IMAGE_PIXELS = 2 * 89_478_485  # Pillow's own limit for a decompression bomb: ~179 megapixels
ACCEPTED = ("'shapes', 'cifar10', a directory with one sub-folder per class, a folder written by "
            "'python data.py prepare', or an .npz file")


@dataclass
class ImageData:
    x: torch.Tensor  # uint8 (N, C, res, res): C = 3 (RGB), or 1 for grayscale sources; DiskImages
    #                  (indexable the same way) for a prepared folder
    y: torch.Tensor  # int64 (N,), class labels in [0, num_classes)
    num_classes: int
    class_names: list[str]

    def __len__(self):
        return len(self.y)

    @property
    def channels(self):
        return self.x.shape[1]

    def rgb(self):
        """The images as 3 channels (gray repeated), e.g. for an RGB classifier or .npz files."""
        return to_rgb(self.x)


def to_rgb(x):
    """(N, 1 or 3, H, W) -> (N, 3, H, W): gray images become R = G = B."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def keep_gray_as_one_channel(x):
    """(N, 3, H, W) uint8 whose every pixel has R = G = B -> (N, 1, H, W); else unchanged.

    A grayscale source (scans, handwriting, X-rays, our glyphs) gets 1-channel models [choice]:
    their samples are gray by construction, where a 3-channel model of gray data spends capacity
    on keeping R, G and B equal and, imperfectly trained, tints its samples (measured: a mean
    |R - G| of 6/255 after the 16->32 stage; docs/choices.md)."""
    if x.shape[1] == 3 and len(x) and bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all()):
        return x[:, :1].contiguous()
    return x


# --- the embedded dataset --------------------------------------------------------------------
def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, all in [0, 1], any broadcastable shapes; returns (..., 3).
    Closed form: channel n in (R, G, B) = (5, 3, 1) is v - v*s*clip(min(k, 4-k), 0, 1), k = (n + 6h) mod 6.
    """
    k = [(n + 6 * h) % 6 for n in (5, 3, 1)]
    return np.stack([v - v * s * np.clip(np.minimum(k_n, 4 - k_n), 0, 1) for k_n in k], axis=-1)


def _shape_mask(k, dx, dy):
    """Inside-test for class k. dx (C,1,W), dy (C,H,1): pixel coordinates relative to the shape's
    centre in units of its half-size, so every shape fits the box [-1, 1]^2. Returns bool (C,H,W).
    Thick strokes (>= ~0.3 of the half-size) keep the 8 shapes distinguishable at 16x16."""
    ax, ay = np.abs(dx), np.abs(dy)
    r2 = dx * dx + dy * dy
    if k == 0: return r2 <= 1.0                                                # circle
    if k == 1: return np.maximum(ax, ay) <= 0.85                               # square
    if k == 2: return (dy <= 0.9) & (ax <= (dy + 1.0) / 1.9)                   # triangle, apex up
    if k == 3: return ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0))  # plus
    if k == 4: return (r2 <= 1.0) & (r2 >= 0.36)                               # ring, inner radius 0.6
    if k == 5: return ax + ay <= 1.0                                           # diamond
    if k == 6: return (ax <= 1.0) & (ay <= 0.4)                                # horizontal bar
    return (ax <= 0.4) & (ay <= 1.0)                                           # vertical bar


def make_shapes(n, res=SHAPES_RES, seed=0, chunk=512):
    """The embedded class-conditional dataset [choice, ours; not from the paper].

    Each of the 8 classes is a distinct shape, a distinct base hue (k/8 around the colour wheel,
    jittered by +-0.03) and a distinct stripe texture inside the shape (angle k * 22.5 degrees,
    period 8 px at 64x64 -- 4 px at 32x32 -- brightness modulated by +-25% around its mean). The
    stripes average away under an 8x8 area downsample and are faint at 16x16, so an 8x8 copy keeps
    position, size and colour but has lost the texture: the SR stages have real detail to add.
    Backgrounds are smooth gradients between two dark, low-saturation colours. Returns uint8
    (n, res, res, 3) NHWC and balanced int64 labels (n,).

    Anti-aliasing: the shape's coverage is rendered at 2x and average-pooled by 2 (2x2 supersampling
    of the edge); the colour fields are smooth and are evaluated at the pixel centres directly,
    which is 4x cheaper and indistinguishable from pooling them.
    """
    if res != SHAPES_RES:
        raise ValueError(f"make_shapes renders at {SHAPES_RES}x{SHAPES_RES} only (got res={res}); "
                         f"use load_dataset('shapes', res) for area-downsampled copies")
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 8).astype(np.int64)  # balanced classes
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    # Per-image parameters, all drawn up front so the images do not depend on `chunk`.
    # Coordinates are in [-1, 1] across the image, so 10% of the image is 0.2 and a size of 45-70%
    # of the image is a half-size of 0.45-0.70 (centre + half-size <= 0.9: never clipped by the border).
    centre = f32(rng.uniform(-0.2, 0.2, (n, 2)))
    half = f32(rng.uniform(0.45, 0.70, n))
    hue = f32(y / 8 + rng.uniform(-0.03, 0.03, n)) % 1.0
    fg = 255 * _hsv_to_rgb(hue, f32(rng.uniform(0.6, 0.9, n)), f32(rng.uniform(0.7, 1.0, n)))  # (n, 3)
    phase = f32(rng.uniform(0, 2 * np.pi, n))
    bg = 255 * _hsv_to_rgb(f32(rng.uniform(0, 1, (n, 2))), f32(rng.uniform(0, 0.3, (n, 2))),
                           f32(rng.uniform(0.1, 0.35, (n, 2))))  # (n, 2, 3): the gradient's end colours
    bg_angle = f32(rng.uniform(0, 2 * np.pi, n))

    u2 = f32((np.arange(2 * res) + 0.5) / res - 1)  # pixel centres of the 2x grid
    u = f32((np.arange(res) + 0.5) / (res / 2) - 1)  # pixel centres of the output grid
    omega = 2 * np.pi / (8 * 2 / res)                # 8 px period, in [-1, 1] units
    theta = f32(y * np.pi / 8)                       # class-specific stripe angle (22.5 deg steps)
    out = np.empty((n, res, res, 3), dtype=np.uint8)
    for a in range(0, n, chunk):  # chunks bound memory to a few MB per array
        b = min(a + chunk, n)
        yc = y[a:b]
        # Coverage in [0, 1], (C, res, res): binary mask at 2x, then 2x2 average pool.
        dx = (u2[None, None, :] - centre[a:b, 0, None, None]) / half[a:b, None, None]  # (C,1,2res)
        dy = (u2[None, :, None] - centre[a:b, 1, None, None]) / half[a:b, None, None]  # (C,2res,1)
        mask = np.zeros((b - a, 2 * res, 2 * res), dtype=bool)
        for k in range(8):
            i = np.nonzero(yc == k)[0]
            if len(i):
                mask[i] = _shape_mask(k, dx[i], dy[i])
        m = mask.view(np.uint8)
        m = m[:, 0::2] + m[:, 1::2]  # 2x2 sum as strided adds: ~10x faster than a bool .sum(axis)
        cov = (m[:, :, 0::2] + m[:, :, 1::2]).astype(np.float32)[..., None] / 4  # (C, res, res, 1)

        # Stripes sin(omega * (u cos(theta) + v sin(theta)) + phase), made separable with
        # sin(A + B) = sin A cos B + cos A sin B so no sin() runs over the full (C, res, res) grid.
        A = omega * np.cos(theta[a:b, None, None]) * u[None, None, :] + phase[a:b, None, None]
        B = omega * np.sin(theta[a:b, None, None]) * u[None, :, None]
        stripes = np.sin(A) * np.cos(B) + np.cos(A) * np.sin(B)          # (C, res, res)
        texture = (0.8 + 0.2 * stripes)[..., None]  # +-25% around 0.8: never above 1, no clipping
        fg_img = fg[a:b, None, None, :] * texture                        # (C, res, res, 3)
        # Background: linear ramp t in [0, 1] along a random direction (|u cos + v sin| <= sqrt 2).
        t = 0.5 + (np.cos(bg_angle[a:b, None, None]) * u[None, None, :]
                   + np.sin(bg_angle[a:b, None, None]) * u[None, :, None]) / (2 * 2 ** 0.5)
        c0, c1 = bg[a:b, 0, None, None, :], bg[a:b, 1, None, None, :]
        bg_img = c0 + (c1 - c0) * t[..., None]
        img = bg_img + cov * (fg_img - bg_img)  # a convex mix of colours in [0, 255]: no clip needed
        assert img.dtype == np.float32  # a float64 scalar anywhere above would double the cost
        out[a:b] = np.rint(img).astype(np.uint8)
    return out, y


# --- a second, real-looking dataset: glyphs with handedness ----------------------------------
GLYPH_CLASSES = list("0123456789bdpq")
# The DejaVu fonts that ship inside matplotlib (so no download): sans, mono and serif, each
# regular, bold, oblique/italic and bold oblique/italic.
GLYPH_FONTS = ["DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
               "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique",
               "DejaVuSansMono-BoldOblique", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic",
               "DejaVuSerif-BoldItalic"]


def make_glyphs(n_per_class, res=32, seed=0):
    """Digits 0-9 and the letters b, d, p, q, drawn in white-ish on black [choice, ours].

    Stand-in for a user's own folder of real grayscale images (handwriting, scans): flat black
    backgrounds, one channel, and classes defined by their *handedness* -- b/d and p/q are each
    other's mirror images, and a mirrored 2, 3, 4, 5, 7 or 9 is no digit. Every image varies in
    font (12 DejaVu faces: sans, serif, mono; bold, oblique), glyph height (60-85% of the image,
    size-normalised as in MNIST), width (x0.85-1.15), position, rotation (+-10 degrees), stroke
    (0-4 px wider at 4x) and brightness (180-255). Rendered at 4x and area-downsampled
    (anti-aliased). Deterministic in (n_per_class, res, seed).
    Returns uint8 (N, res, res) grayscale and int64 labels (N,), classes interleaved.
    """
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    big = 4 * res
    fonts = {}
    rng = np.random.default_rng(seed)
    n = n_per_class * len(GLYPH_CLASSES)
    y = np.arange(n) % len(GLYPH_CLASSES)
    out = np.empty((n, res, res), dtype=np.uint8)
    for i in range(n):
        name = GLYPH_FONTS[rng.integers(len(GLYPH_FONTS))]
        height, width = rng.uniform(0.6, 0.85), rng.uniform(0.85, 1.15)
        angle, stroke = rng.uniform(-10, 10), int(rng.integers(0, 3))
        shift, level = rng.uniform(-1, 1, 2), rng.uniform(180, 255)
        if name not in fonts:
            fonts[name] = ImageFont.truetype(os.path.join(folder, name + ".ttf"), big)
        font, char = fonts[name], GLYPH_CLASSES[y[i]]
        # Draw the glyph large, crop it to its ink, scale it to the drawn height and width.
        left, top, right, bottom = font.getbbox(char, stroke_width=2 * stroke)
        ink = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(ink).text((-left, -top), char, fill=255, font=font,
                                 stroke_width=2 * stroke, stroke_fill=255)
        ink = ink.crop(ink.getbbox())
        h = max(1, round(height * big))
        w = max(1, min(big, round(ink.width * h / ink.height * width)))
        ink = ink.resize((w, h), Image.LANCZOS)
        # Paste it at a random offset that keeps it inside, then rotate about the centre.
        canvas = Image.new("L", (big, big), 0)
        cx, cy = (big - w) / 2 * (1 + 0.8 * shift[0]), (big - h) / 2 * (1 + 0.8 * shift[1])
        canvas.paste(ink, (round(cx), round(cy)))
        canvas = canvas.rotate(angle, resample=Image.BICUBIC)
        img = np.asarray(canvas.resize((res, res), Image.BOX), dtype=np.float32) * (level / 255)
        out[i] = np.rint(img).astype(np.uint8)
    return out, y.astype(np.int64)


def write_glyphs(folder, n_per_class=700, res=32, seed=0):
    """Write make_glyphs as an image folder, one sub-folder per class (folder/<class>/NNNN.png,
    grayscale PNG): exactly what a user's own data looks like to --data. Built in a temporary
    folder beside `folder` (locked while it is written, like safety.atomic_write's files) and renamed
    into place, so an interrupted run leaves nothing half written, and the next run removes what a
    killed one left; an existing non-empty folder is never touched."""
    from PIL import Image
    import shutil
    import tempfile
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ValueError(f"{folder} already exists and is not empty; delete it or choose another folder")
    parent = safety.writable_folder(os.path.dirname(os.path.abspath(folder)), "the glyphs folder")
    safety.remove_stale_temporaries(parent)
    safety.check_disk(parent, 4096 * n_per_class * len(GLYPH_CLASSES), "the glyphs folder")  # a block per PNG
    x, y = make_glyphs(n_per_class, res, seed)
    tmp = tempfile.mkdtemp(dir=parent, prefix=safety.TMP_PREFIX + "glyphs-")
    lock = os.open(os.path.join(tmp, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        safety.try_lock(lock)
        os.chmod(tmp, safety.default_mode(directory=True))   # mkdtemp's 0o700 -> what mkdir gives
        counts = [0] * len(GLYPH_CLASSES)
        for im, k in zip(x, y):
            d = os.path.join(tmp, GLYPH_CLASSES[k])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(im, mode="L").save(os.path.join(d, f"{counts[k]:04d}.png"))
            counts[k] += 1
        os.remove(os.path.join(tmp, ".lock"))
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above (another run filling it since: an OSError)
        os.replace(tmp, folder)
    finally:
        os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)       # gone already once renamed
    return len(y)


# --- conversions and helpers -----------------------------------------------------------------
def to_float(x_uint8):
    """uint8 [0, 255] -> float32 [-1, 1], the range the diffusion model works in (DDPM §3.3)."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x):
    """float [-1, 1] -> uint8, clamped (samples overshoot) and rounded (not truncated: to_float's inverse)."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def default_flip(source):
    """Should training flip `source`'s images left-right at random? Only where a mirror image is
    still an image of its class [choice]. ADM's loader flips always, right for ImageNet and CIFAR-10
    (a mirrored dog is a dog), wrong for anything with handedness (digits, letters, text, 'b'/'d').
    shapes: no -- its stripe angle is class-specific, and a flip turns class k's angle into class
    (8 - k)'s. Image folders and .npz files: no, unless asked (--flip), since we cannot know."""
    return source == "cifar10"


def random_flip(x, u):
    """Flip each example of a (B, C, H, W) batch left-right with probability 0.5, independently:
    those whose uniform u (B,) in [0, 1) is below 0.5."""
    return torch.where((u < 0.5)[:, None, None, None], x.flip(-1), x)


def _area_resize(x, res, chunk=1024):
    """uint8 (N, 3, H, H) -> uint8 (N, 3, res, res) by exact box averaging; H must be a multiple of
    res. Done in float32 chunks (a float copy of all of CIFAR-10 would be 600 MB)."""
    H = x.shape[-1]
    if H == res:
        return x
    f = H // res
    return torch.cat([F.avg_pool2d(x[i:i + chunk].float(), f).round().to(torch.uint8)
                      for i in range(0, len(x), chunk)])


def _to_srgb(img):
    """The image's colours converted from its embedded ICC profile (Adobe RGB, Display P3, a
    camera's CMYK, ...) to sRGB, as a colour-managed viewer shows them; alpha kept. A profile that
    cannot be read is ignored, as viewers ignore it."""
    import io as _io
    from PIL import Image, ImageCms
    alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else None
    base = img.convert("RGB" if img.mode == "RGBA" else "L" if img.mode == "LA" else img.mode)
    try:
        source = ImageCms.ImageCmsProfile(_io.BytesIO(img.info["icc_profile"]))
        out = ImageCms.profileToProfile(base, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img
    if alpha is not None:
        out.putalpha(alpha)
    return out


def as_seen(img):
    """A PIL image as RGB, the way a person sees it in an image viewer [choice, each a common
    surprise]:
      * converted to sRGB from the colour profile embedded in it (Adobe RGB photographs, say);
      * turned upright by its EXIF orientation tag: phone cameras store the pixels as the sensor
        read them and only tag how to turn them;
      * 16-bit images (scans, microscopy, some PNGs) scaled to 8 bits, not clipped at 255, which
        would turn almost every pixel white;
      * transparent pixels over white, as a browser shows them (dropping the alpha channel would
        show whatever colour the transparent pixels happen to hold).
    """
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)
    if img.info.get("icc_profile") and img.mode in ("RGB", "RGBA", "L", "LA", "CMYK"):
        img = _to_srgb(img)
    if img.mode.startswith("I;16") or img.mode == "I":   # 16-bit gray; "I" read as 16-bit too
        a = np.asarray(img, dtype=np.float64) * (255 / 65535)
        img = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), "L")
    elif img.mode == "F":                                # float gray: [0, 1], or else [0, 255]
        a = np.asarray(img, dtype=np.float64)
        a = a * 255 if np.nanmax(a) <= 1 else a
        img = Image.fromarray(np.rint(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def _center_crop_resize(img, res):
    """PIL image -> RGB uint8 (3, res, res): crop the central square (short side), then BOX
    (area) resize; BICUBIC when the crop is smaller than res (upsampling, rare)."""
    from PIL import Image
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != res:
        img = img.resize((res, res), Image.BOX if s > res else Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _check_native(res, native, name):
    if not (isinstance(res, int) and 0 < res <= native and native % res == 0):
        raise ValueError(f"{name} is {native}x{native}; res must divide {native} "
                         f"(e.g. {native}, {native // 2}, {native // 4}), got res={res!r}")


def save_npz(path, images_uint8_nhwc, labels=None):
    """Write images (and labels) in the ADM convention: arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,).
    Atomic (temporary file + os.replace). labels=None writes arr_0 only (unconditional samples)."""
    safety.atomic_write(path, lambda tmp: write_npz(tmp, images_uint8_nhwc, labels))


def write_npz(path, images_uint8_nhwc, labels=None):
    """save_npz's file, written in place (for safety.atomic_write and atomic_write_many)."""
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"save_npz expects uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    arrays = [images]
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"save_npz: {len(images)} images but labels of shape {labels.shape}")
        arrays.append(labels)
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, *arrays)     # positional arrays are stored as arr_0, arr_1


# --- the four sources ------------------------------------------------------------------------
def _load_cifar10(root, split, download, md5):
    """CIFAR-10 straight from the official python archive (no extraction). Each batch is a pickled
    dict: b"data" uint8 (N, 3072), channel-major (1024 R, then G, then B, each row-major 32x32)."""
    path = os.path.join(root, CIFAR10_FILE)
    if not os.path.exists(path):
        if not download:
            raise FileNotFoundError(f"CIFAR-10 archive not found at {path}: put {CIFAR10_FILE} "
                                    f"there (from {CIFAR10_URL}) or pass --download")
        safety.remove_stale_temporaries(safety.writable_folder(root, "--data_root"))   # a killed download's
        print(f"downloading {CIFAR10_URL} -> {path}")
        try:
            safety.atomic_write(path, lambda tmp: urllib.request.urlretrieve(CIFAR10_URL, tmp))
        except OSError as e:  # includes urllib's URLError (no network, bad URL)
            raise OSError(f"downloading {CIFAR10_URL} failed ({e}); download it by hand and put it "
                          f"at {path}") from e
    with open(path, "rb") as f:
        digest = hashlib.md5()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError(f"MD5 checksum mismatch for {path} (expected {md5}): the file is "
                             f"corrupted or incomplete; delete it and retry (e.g. with --download)")
    # pickle can run code: safe here only because the archive's checksum was verified above.
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    with tarfile.open(path, "r:gz") as tar:
        load = lambda name: pickle.load(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")
        batches = [load(name) for name in names]
        class_names = [s.decode() for s in load("batches.meta")[b"label_names"]]
    x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    y = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
    return torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y), class_names


def _class_folders(root):
    """The class sub-folders of an image folder, sorted. An entry that is a link leading nowhere
    (broken, or a loop) is refused by name: skipping it would train on fewer classes, silently."""
    names = sorted(d for d in os.listdir(root) if not d.startswith(".") and d not in SKIPPED_FOLDERS)
    for d in names:
        path = os.path.join(root, d)
        if os.path.islink(path) and not os.path.exists(path):
            raise ValueError(f"{path} is a link that leads nowhere (broken, or a loop): fix it, or move it "
                             "out of the image folder")
    return [d for d in names if os.path.isdir(os.path.join(root, d))]


HOLDOUT = 10  # image folders: every 10th image of each class is held out as the "test" split


def _folder_items(root, n, split=None):
    """(path, class index) of an image folder, one sub-folder per class (ImageNet's train layout);
    class index = sorted folder order. Taken round-robin across classes so that the first `n`
    stay class-balanced. split "test": every HOLDOUT-th image of each class in sorted order (the
    10th, 20th, ...), the images evaluate.py scores against; "train": all the others, what the
    training scripts see, so a held-out image is never trained on [choice]; None: all images."""
    classes = _class_folders(root)
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders: expected one sub-folder "
                         f"per class (e.g. {root}/cat/*.png, {root}/dog/*.png)")
    per_class = []
    for c in classes:
        d = os.path.join(root, c)
        names = [f for f in os.listdir(d) if not f.startswith(".")]
        files = sorted(f for f in names if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        if not files:
            other = sorted({os.path.splitext(f)[1].lower() or f for f in names})
            raise ValueError(f"class folder {d} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                             + (f", only {', '.join(other[:5])} files: convert them to PNG or JPEG"
                                if other else "; add images or remove the folder"))
        paths = [os.path.join(d, f) for f in files]
        if split is not None:
            paths = [p for i, p in enumerate(paths) if (i % HOLDOUT == HOLDOUT - 1) == (split == "test")]
        per_class.append(paths)
    if not any(per_class):
        raise ValueError(f"image folder {root} has no held-out images: every {HOLDOUT}th image of "
                         f"a class is held out for evaluation, so each class needs {HOLDOUT} or more")
    items = [(per_class[k][i], k) for i in range(max(map(len, per_class)))
             for k in range(len(classes)) if i < len(per_class[k])]
    return (items[:n] if n is not None else items), classes


def open_as_seen(path, max_pixels=MAX_IMAGE_PIXELS, what="a scan too large"):
    """One image file, decoded and as a person sees it (as_seen): the one guarded path every
    image reader takes. Images of more than max_pixels are refused before decoding (a small file
    can unpack to gigabytes: a "decompression bomb"); unreadable files are one ValueError."""
    import warnings
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels // 2
            try:
                with Image.open(path) as img:
                    if img.width * img.height > max_pixels:
                        raise Image.DecompressionBombError("too many pixels")
                    img.load()
                    return as_seen(img)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except Image.DecompressionBombError:
        raise ValueError(f"refusing image {path}: it has more than {max_pixels // 10**6} megapixels "
                         f"(a decompression bomb, or {what}); shrink it or remove it") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL.UnidentifiedImageError is an OSError; bad PNG chunks: SyntaxError; a text chunk
        # that unpacks past Pillow's limit: ValueError, whose message names no file
        raise ValueError(f"could not read image {path}: {e}; fix or delete the file") from None


def _read_image(path, resolutions):
    """One image file -> {res: uint8 (3, res, res)}, as a person sees it (open_as_seen),
    centre-cropped and area-resized per res."""
    img = open_as_seen(path)
    return {r: _center_crop_resize(img, r) for r in resolutions}


def _load_folder(root, res, n, split):
    items, classes = _folder_items(root, n, split)
    x = torch.stack([_read_image(path, [res])[res] for path, _ in items])
    return x, torch.tensor([k for _, k in items], dtype=torch.int64), classes


PREPARED_FILES = ("labels.npy", "classes.json")  # with images_<res>.npy: a prepared folder
MANIFEST = "prepare.json"   # what a prepared folder was made from: root, n, resolutions, classes


def _decode_chunk(task):
    """Worker of prepare_folder: decode and resize a chunk of image files (in a child process)."""
    paths, resolutions = task
    out = {r: np.empty((len(paths), r, r, 3), dtype=np.uint8) for r in resolutions}
    for i, path in enumerate(paths):
        for r, im in _read_image(path, resolutions).items():
            out[r][i] = im.permute(1, 2, 0).numpy()
    return out


def _ignore_interrupts():
    """Pool workers leave Ctrl-C to the parent, which stops them (SIGTERM): one message, not one
    traceback per worker."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _is_prepared(folder):
    return all(os.path.isfile(os.path.join(folder, f)) for f in PREPARED_FILES)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _describe_manifest(m):
    return f"{m['n']} images of {m['root']} at {','.join(map(str, m['resolutions']))}"


def _prepared_arrays(folder):
    """The resolutions of the images_<res>.npy arrays in a folder."""
    return sorted(int(f[7:-4]) for f in os.listdir(folder)
                  if f.startswith("images_") and f.endswith(".npy") and f[7:-4].isdigit())


def prepare_folder(root, resolutions, out, n=None, progress=True, workers=None, chunk=256):
    """One-off preparation of a large image folder such as ImageNet's train set: decode every image
    once, in parallel on all cores, and stream it into memory-mapped uint8 arrays, one per
    resolution: OUT/images_<res>.npy (N, res, res, 3), OUT/labels.npy, OUT/classes.json, and
    OUT/prepare.json saying what they were made from. Each image is the centre square (as
    BigGAN/ADM take), area-resized; ADM resizes before cropping, which differs only in rounding.
    Training reads batches from the arrays by index, so its memory does not grow with the dataset
    (ImageNet: 3.9 GB at 32, 15.7 GB at 64, 63 GB at 128 on disk).

    Memory here: one chunk per worker. The arrays fill OUT.partial/ (locked while one process
    works there), whose progress.json says how many images are done, written after they are
    flushed to disk; a finished folder is renamed into place, so OUT exists only when complete.
    Re-running the same command resumes an interrupted one, or finds it done. Asked for anything
    else -- other resolutions, another root or n -- where a preparation is done or under way, it
    refuses (ValueError) rather than mix the arrays of two commands. The disk space is checked
    and reserved (posix_fallocate) before the first image is decoded: a memory map of a sparse
    file on a full disk would end in SIGBUS instead of an error."""
    resolutions = sorted({int(r) for r in resolutions})
    items, classes = _folder_items(root, n)
    N = len(items)
    manifest = {"root": os.path.abspath(root), "n": N, "resolutions": resolutions, "classes": classes}
    if _is_prepared(out):
        have = _read_json(os.path.join(out, MANIFEST))
        same = (have == manifest if have is not None     # folders of older versions: no manifest
                else _prepared_arrays(out) == resolutions and _prepared_classes(out) == classes)
        if same:
            return out
        what = _describe_manifest(have) if have else "at " + ",".join(map(str, _prepared_arrays(out)))
        raise ValueError(f"{out} is already prepared ({what}), not as asked ({_describe_manifest(manifest)}): "
                         f"choose another --out, or delete {out} to prepare it again")
    if os.path.exists(out):
        raise ValueError(f"{out} exists but is not a prepared folder; delete it or choose another --out")
    partial = out.rstrip("/") + ".partial"
    def check_room(folder):                           # before a fresh start
        safety.check_disk(folder, sum(N * 3 * r * r for r in resolutions) + 8 * N,
                          f"preparing {N} images at {','.join(map(str, resolutions))}")
    if not os.path.isdir(partial):
        check_room(safety.writable_folder(os.path.dirname(os.path.abspath(partial)), "--out"))
    try:
        with safety.deferred_interrupts():            # a Ctrl-C while locking is raised here, where
            safety.prepare_output_folder(partial, "--out")   # it is told what the folder keeps
        return _prepare_locked(items, classes, manifest, partial, out, check_room, progress, workers, chunk)
    except (KeyboardInterrupt, OSError) as e:           # say where the work so far is, and how much
        kept = sum(os.path.getsize(os.path.join(partial, f)) for f in safety.visible_entries(partial)
                   if os.path.isfile(os.path.join(partial, f)))
        where = (f"{partial} keeps the {safety.size(kept)} prepared so far: the same command resumes it, "
                 f"or delete the folder")
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted: stopped before finishing; {where}", file=sys.stderr)
            raise SystemExit(130) from None
        hint = "free some space, then " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise ValueError(f"{safety.describe(e)}; {where} ({hint}run it again)") from None
    finally:
        safety.unlock_folder(partial)                   # (its lock file moves with the folder)


def _prepare_locked(items, classes, manifest, partial, out, check_room, progress, workers, chunk):
    """prepare_folder's work, in the locked folder `partial`: resume or start, decode, rename."""
    import multiprocessing
    N, resolutions = len(items), manifest["resolutions"]
    progress_path = os.path.join(partial, "progress.json")
    saved = _read_json(progress_path) or _read_json(os.path.join(partial, MANIFEST))
    compared = [k for k in manifest if saved is not None and (k in saved or k != "classes")]  # older: no classes
    if saved is not None and any(saved.get(k) != manifest[k] for k in compared):
        raise ValueError(f"{partial} holds an unfinished preparation of {_describe_manifest(saved)}, "
                         f"not of {_describe_manifest(manifest)}: finish it by running that command "
                         f"again, or delete {partial} to start this one")
    mine = {*PREPARED_FILES, MANIFEST, "progress.json", *(f"images_{r}.npy" for r in _prepared_arrays(partial))}
    foreign = [f for f in safety.visible_entries(partial) if f not in mine]
    if foreign:
        raise ValueError(f"{partial} holds files that prepare did not write ({', '.join(foreign[:3])}); "
                         "delete it or choose another --out")
    done = saved.get("done", N) if saved is not None else 0
    if saved is None:                                  # a fresh start: nothing of ours to keep
        for f in safety.visible_entries(partial):
            os.remove(os.path.join(partial, f))
        check_room(partial)
        np.save(os.path.join(partial, "labels.npy"), np.array([k for _, k in items], dtype=np.int64))
        for r in resolutions:
            path = os.path.join(partial, f"images_{r}.npy")
            a = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(N, r, r, 3))
            end = a.offset + a.nbytes
            del a
            if hasattr(os, "posix_fallocate"):           # (Linux; not on macOS)
                with open(path, "rb+") as f:             # reserve the blocks now: ENOSPC here,
                    os.posix_fallocate(f.fileno(), 0, end)   # never SIGBUS in the middle
    arrays = {r: np.load(os.path.join(partial, f"images_{r}.npy"), mmap_mode="r+") for r in resolutions}
    if any(a.shape != (N, r, r, 3) for r, a in arrays.items()):
        raise ValueError(f"{partial} is damaged (arrays of the wrong shape); delete it and run again")
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    per_image = sum(3 * r * r for r in resolutions)
    chunk = max(1, min(chunk, (64 << 20) // per_image))    # at most ~64 MB of images per task
    workers = workers or os.cpu_count()
    safety.check_memory(2 * workers * chunk * per_image, f"decoding at {','.join(map(str, resolutions))}")
    tasks = [([p for p, _ in items[i:i + chunk]], resolutions) for i in range(done, N, chunk)]
    # A Ctrl-C while the workers are forked would be raised inside the fork's own handlers, which
    # swallow it (and the work would go on), or inside tqdm's constructor, which it breaks.
    bar = pool = None
    try:
        with safety.deferred_interrupts():
            bar = tqdm(total=N, initial=done, desc="preparing", disable=not progress) if tqdm else None
            pool = multiprocessing.get_context("fork").Pool(workers, _ignore_interrupts)
        with pool:
            for decoded in pool.imap(_decode_chunk, tasks):    # in order, decoded in parallel
                k = len(next(iter(decoded.values())))
                for r, a in decoded.items():
                    arrays[r][done:done + k] = a
                for a in arrays.values():
                    a.flush()
                done += k
                safety.write_json(progress_path, {**manifest, "done": done})
                if bar:
                    bar.update(k)
    finally:
        if pool:
            pool.terminate()
        if bar:
            bar.close()
    del arrays
    safety.write_json(os.path.join(partial, "classes.json"), classes)
    safety.write_json(os.path.join(partial, MANIFEST), manifest)
    if os.path.exists(progress_path):                   # from here on prepare.json says "done"
        os.remove(progress_path)
    os.replace(partial, out)
    return out


class DiskImages:
    """uint8 images (N, 3, res, res) kept on disk in a prepared folder's images_<res>.npy and read
    by index, one pread per image: memory holds a batch, never the dataset, and neither does the
    page cache count against the process (a memory map's touched pages would). Indexing with a
    tensor, list or slice returns a uint8 tensor, like the in-memory sources' x."""

    def __init__(self, path, n=None):
        with open(path, "rb") as f:                # the header only
            shape, _, dtype = _read_npy_header(f)
            offset = f.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise ValueError(f"{path}: expected uint8 (N, res, res, 3), got {dtype} {shape}")
        N, H, W, C = shape
        self.path, self.offset, self.image_bytes = path, offset, H * W * C
        self.shape = (N if n is None else min(n, N), C, H, W)
        self.fd = None
        have = (os.path.getsize(path) - self.offset) // self.image_bytes
        if have < N:
            raise ValueError(f"{path} is truncated: it holds {have} of its {N} images")

    def __len__(self):
        return self.shape[0]

    def __getstate__(self):                         # picklable (DataLoader workers, spawn)
        return {**self.__dict__, "fd": None}

    def __getitem__(self, idx):
        one = isinstance(idx, int)
        idx = torch.arange(len(self))[idx] if isinstance(idx, slice) else torch.as_tensor(idx).reshape(-1)
        if len(idx) and not (0 <= int(idx.min()) and int(idx.max()) < len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        b = self.image_bytes
        buf = bytearray(len(idx) * b)
        for j, i in enumerate(idx.tolist()):
            image = os.pread(self.fd, b, self.offset + i * b)
            if len(image) != b:        # the file shrank since it was opened
                raise OSError(errno.EIO, f"image {i} cannot be read: the file was truncated; "
                                         "prepare the folder again", self.path)
            buf[j * b:(j + 1) * b] = image
        _, C, H, W = self.shape
        x = torch.frombuffer(buf, dtype=torch.uint8).reshape(len(idx), H, W, C).permute(0, 3, 1, 2)
        return x[0] if one else x


def _prepared_classes(folder):
    """The class names a prepared folder was written with."""
    with open(os.path.join(folder, "classes.json")) as f:
        return json.load(f)


def _load_prepared(folder, res, n):
    """A folder written by prepare_folder: the images at `res`, left on disk (DiskImages) and read
    per batch by index."""
    path = os.path.join(folder, f"images_{res}.npy")
    if not os.path.isfile(path):
        have = sorted(int(f[7:-4]) for f in os.listdir(folder) if f.startswith("images_") and f.endswith(".npy"))
        raise ValueError(f"{folder} was prepared at {', '.join(map(str, have))}, not {res}; run "
                         f"`python data.py prepare ... --res {res}` into a new --out")
    try:
        x = DiskImages(path, n)
        y = np.load(os.path.join(folder, "labels.npy"))
        classes = _prepared_classes(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder} is damaged ({e}); prepare it again") from None
    if x.shape[2:] != (res, res) or len(y) < len(x) or (len(y) and y.max() >= len(classes)):
        raise ValueError(f"{folder}: images {x.shape}, labels {y.shape} and {len(classes)} classes "
                         "do not match; prepare it again")
    return x, torch.from_numpy(y[:len(x)].astype(np.int64)), classes


MAX_SPARSE_CLASSES = 1000  # more classes than images is refused above this many (_load_npz)


def _npy_header(path, key):
    """(shape, dtype) of array `key` in an .npz, read from its header without loading it."""
    import zipfile
    with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
        shape, _, dtype = _read_npy_header(f)
    return shape, dtype


def _read_npy_header(f):
    """(shape, fortran_order, dtype) of the .npy file open at `f`, which is left at its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def load_size(source, res, split="train", n=None):
    """(images, bytes of memory) that load_dataset(source, res, split, n=n) will take, from the
    file listing or the array headers alone, decoding nothing: so that a source too large for this
    machine is refused before it is read. A prepared folder stays on disk (DiskImages): 0 bytes.
    A lower estimate: each image's final copy and the copy it is made from."""
    per = 3 * res * res
    if source == "shapes":
        k = n or (8192 if split == "train" else 2048)
        return k, k * (2 * 3 * SHAPES_RES ** 2 + per)      # rendered NHWC and its NCHW copy
    if source == "cifar10":
        k = min(n or 50_000, 50_000 if split == "train" else 10_000)
        return k, (50_000 if split == "train" else 10_000) * 3072 * 2 + k * per
    if os.path.isdir(source) and _is_prepared(source):
        return len(np.load(os.path.join(source, "labels.npy"), mmap_mode="r")), 0
    if os.path.isdir(source):
        k = len(_folder_items(source, n, split)[0])
        return k, 2 * k * per                                # the decoded images and their stack
    if os.path.isfile(source) and source.lower().endswith(".npz"):
        try:
            check_npz_headers(source)                        # a header that lies: not a memory story
            shape, dtype = _npy_header(source, "arr_0")
        except (KeyError, ValueError, OSError):
            return 0, 0                                      # load_dataset says what is wrong
        N = shape[0] if shape else 0
        k = min(n or N, N)
        return k, int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize + 2 * k * per
    return 0, 0


def check_npz_headers(path):
    """Read each array's header of an .npz before anything is loaded: a header whose shape does
    not fit the bytes stored after it (a corrupt or crafted file: a few KB that claim terabytes),
    or an array larger than the memory left, is one error naming the array, instead of an
    out-of-memory hint about --batch_size. A file that is no zip is left to np.load to refuse."""
    import zipfile
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            try:
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                    header = f.tell()
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise ValueError(f"{path}: {name} cannot be read ({str(e)[:100]}); the file is corrupt: re-create it") from None
            if dtype.hasobject:                           # never unpickled: it could run code
                raise ValueError(f"{path}: {name} holds Python objects (a pickle), which are never loaded: "
                                 "save plain arrays (uint8 images, integer labels) with np.savez")
            need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            stored = info.file_size - header
            if need != stored:
                raise ValueError(f"{path}: {name}'s header says {dtype} {tuple(shape)} ({safety.size(need)}), but "
                                 f"{safety.size(stored)} are stored: the file is corrupt or was crafted; re-create it")
            have = safety.available_memory()
            if have is not None and need > have:
                raise ValueError(f"{path}: {name} is {safety.size(need)}, more than the {safety.size(have)} of memory "
                                 "left: use a smaller file")


def _read_adm_npz(path):
    """An ADM-convention .npz's arr_0 and its arr_1 (None where absent), or one clear error."""
    check_npz_headers(path)
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path} has no arr_0 (keys: {f.files}); expected arr_0 = uint8 images "
                             f"(N, H, W, 3) and arr_1 = labels, as written by save_npz")
        return f["arr_0"], (f["arr_1"] if "arr_1" in f.files else None)


def _check_adm_images(path, x, channels):
    """arr_0 must be uint8 (N, H, W, C) with C in `channels`; else one error saying how to fix it."""
    if x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] in channels:
        return
    if x.ndim == 4 and x.shape[1] in channels and x.shape[-1] not in channels:
        fix = "it looks channels-first (N, C, H, W): save np.transpose(x, (0, 2, 3, 1))"
    elif np.issubdtype(x.dtype, np.floating):
        fix = ("save uint8 values 0..255, e.g. np.clip(np.round(x * 255), 0, 255).astype(np.uint8) "
               "for x in [0, 1] (data.to_uint8 for x in [-1, 1])")
    elif x.dtype != np.uint8:
        fix = "save uint8 values 0..255 (x.astype(np.uint8) if they lie in 0..255)"
    else:
        fix = f"give the images a last axis of {' or '.join(map(str, channels))} channels"
    raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, {' or '.join(map(str, channels))}) images, "
                     f"got {x.dtype} {x.shape}; {fix}")


def _load_npz(path, res, n):
    """ADM-convention .npz: arr_0 uint8 (N, H, W, 3), arr_1 labels (optional: absent = one class)."""
    x, y = _read_adm_npz(path)
    y = np.zeros(len(x), dtype=np.int64) if y is None else y
    _check_adm_images(path, x, (3,))
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise ValueError(f"{path}: arr_1 must hold {len(x)} non-negative integer labels, got "
                         f"{y.dtype} {y.shape}")
    num_classes = int(y.max()) + 1 if len(y) else 1  # from all labels: n must not change it
    if num_classes > max(len(y), MAX_SPARSE_CLASSES):   # a class embedding row per label value
        raise ValueError(f"{path}: arr_1's labels go up to {num_classes - 1} for {len(y)} images; "
                         f"labels are class indices 0, 1, 2, ...: renumber them")
    if n is not None:
        x, y = x[:n], y[:n]
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    H, W = x.shape[-2:]
    s = min(H, W)
    if s < res:
        raise ValueError(f"{path}: images are {H}x{W}, smaller than res={res}; upsampling is not "
                         f"supported, use a lower res")
    top, left = (H - s) // 2, (W - s) // 2
    x = x[:, :, top:top + s, left:left + s]  # centre crop to a square (no-op for square images)
    if s % res == 0:
        x = _area_resize(x.contiguous(), res)
    else:  # non-integer factor: PIL's BOX filter is exact area averaging
        from PIL import Image
        x = torch.stack([_center_crop_resize(Image.fromarray(im.permute(1, 2, 0).numpy()), res) for im in x])
    return x.contiguous(), torch.from_numpy(y.astype(np.int64)), [str(k) for k in range(num_classes)]


def load_dataset(source, res, split="train", *, n=None, seed=0, download=False, root="data"):
    """Load `source` as uint8 (N, C, res, res) images and int64 labels (see the module docstring):
    C = 3, or 1 for an image folder or .npz whose images are all grayscale.

    split: "train" or "test" for shapes, cifar10 and image folders (whose "test" split is every
    HOLDOUT-th image of each class); ignored for .npz files (point at another file).
    n: how many images to generate (shapes; default 8192 train -- 3 s to render, more than a demo
    stage draws -- and 2048 test) or keep (the first n, other sources). seed: shapes only; the
    test split uses seed + 1_000_003 so it never overlaps the train split. download/root: cifar10.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n is not None and n <= 0:
        raise ValueError(f"n must be a positive number of images, got {n}")
    if source == "shapes":
        _check_native(res, SHAPES_RES, "the shapes dataset")
        n = n if n is not None else (8192 if split == "train" else 2048)
        x, y = make_shapes(n, SHAPES_RES, seed if split == "train" else seed + 1_000_003)
        x = _area_resize(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), res)
        return ImageData(x, torch.from_numpy(y), 8, list(SHAPE_NAMES))
    if source == "cifar10":
        _check_native(res, 32, "CIFAR-10")
        x, y, names = _load_cifar10(root, split, download, CIFAR10_MD5)  # MD5 read now: patchable
        x, y = (x[:n], y[:n]) if n is not None else (x, y)
        return ImageData(_area_resize(x, res), y, len(names), names)
    if not isinstance(res, int) or res <= 0:
        raise ValueError(f"res must be a positive integer, got {res!r}")
    if os.path.isdir(source) and _is_prepared(source):
        x, y, names = _load_prepared(source, res, n)      # RGB by construction; not scanned
        return ImageData(x, y, len(names), names)
    if os.path.isdir(source):
        x, y, names = _load_folder(source, res, n, split)
        return ImageData(keep_gray_as_one_channel(x), y, len(names), names)
    if os.path.isfile(source) and source.lower().endswith(".npz"):
        x, y, names = _load_npz(source, res, n)
        return ImageData(keep_gray_as_one_channel(x), y, len(names), names)
    why = "no such file or directory" if not os.path.exists(source) else "not a directory or .npz file"
    raise ValueError(f"unknown dataset source {source!r} ({why}); accepted: {ACCEPTED}")


def load_low_res(path, n_max=None, check_size=None):
    """Images to super-resolve (sample.py --low_res), at their own size -- nothing is resized,
    since an SR stage takes exactly the resolution it was trained on:
      an image file                    one image, no label
      a folder of images               its images in sorted order, no labels
      a folder of class sub-folders    their images, labelled by sub-folder name
      an ADM .npz                      arr_0 uint8 (N, H, W, 3) (or 1, or (N, H, W): gray), arr_1
                                       labels if present
    Returns (uint8 (N, 3, H, W), int64 labels (N,) or None, class names of the labels or None).
    Images are read as a person sees them (as_seen: EXIF orientation, 16-bit, transparency);
    every image must be square and all of one size (one clear error otherwise). n_max: read only the
    first n_max (class sub-folders: taken in turn, so that they stay class-balanced). check_size:
    called with the first image's size before any other is read, so that a folder of the wrong
    size is refused at once, not after reading all of it."""
    labels = names = None

    def square(size, what):
        H, W = size
        if H != W:
            raise ValueError(f"{what}: the images are {W}x{H}, not square; crop them to a square first")
        if check_size is not None:
            check_size(H)

    if os.path.isfile(path) and path.lower().endswith(".npz"):
        x, y = _read_adm_npz(path)
        if x.dtype == np.uint8 and x.ndim == 3:             # (N, H, W): grayscale
            x = x[..., None]
        _check_adm_images(path, x, (1, 3))
        if not len(x):
            raise ValueError(f"{path} holds no images")
        if y is not None and (y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer)):
            raise ValueError(f"{path}: arr_1 must hold {len(x)} integer labels, got {y.dtype} {y.shape}")
        square(x.shape[1:3], path)
        x = to_rgb(torch.from_numpy(np.ascontiguousarray(x[:n_max])).permute(0, 3, 1, 2))
        labels = torch.from_numpy(y[:n_max].astype(np.int64)) if y is not None else None
        return x.contiguous(), labels, names
    if os.path.isfile(path):
        if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{path} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) nor an .npz")
        items = [(path, None)]
    elif os.path.isdir(path):
        classes = _class_folders(path)
        flat = sorted(f for f in os.listdir(path) if not f.startswith(".")
                      and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                      and os.path.isfile(os.path.join(path, f)))
        if classes and flat:
            raise ValueError(f"{path} holds both images and sub-folders: put the images into class "
                             "sub-folders, or point --low_res at a folder of images only")
        if classes:
            items, names = _folder_items(path, n_max)
            names = list(names)
            labels = torch.tensor([k for _, k in items], dtype=torch.int64)
        else:
            items = [(os.path.join(path, f), None) for f in flat[:n_max]]
        if not items:
            raise ValueError(f"{path} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    else:
        raise ValueError(f"{path}: no such file or folder")
    images = []
    for p, _ in items:                                   # each checked as it is read
        image = _read_native(p)[None]
        if not images:
            square(image.shape[-2:], path if len(items) == 1 else p)
        elif image.shape[-2:] != images[0].shape[-2:]:
            (h, w), (h0, w0) = image.shape[-2:], images[0].shape[-2:]
            raise ValueError(f"{path}: the images have different sizes ({p} is {w}x{h}, {items[0][0]} "
                             f"{w0}x{h0}); an SR stage takes one resolution: resize them first")
        images.append(image)
    return torch.cat(images).contiguous(), labels, names


def _read_native(path):
    """One image file -> uint8 (3, H, W) at its own size, as a person sees it (open_as_seen)."""
    img = open_as_seen(path, MAX_IMAGE_PIXELS // 2, "too large for an SR stage, which takes small images")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def class_names_for(source):
    """Class names without loading the images (for labelling sample grids)."""
    if source == "shapes":
        return list(SHAPE_NAMES)
    if source == "cifar10":
        return list(CIFAR10_CLASSES)
    if os.path.isdir(source) and _is_prepared(source):
        return _prepared_classes(source)
    if os.path.isdir(source):
        return _class_folders(source)
    raise ValueError(f"class_names_for knows 'shapes', 'cifar10' and image folders, not {source!r}; "
                     f"use load_dataset(...).class_names")


def main(argv=None):
    import argparse
    import time
    p = argparse.ArgumentParser(description="Data preparation, once: 'prepare' an image folder (one "
                                "sub-folder per class, e.g. ImageNet's train set) as pre-resized "
                                "memory-mapped arrays, or render the 'glyphs' image folder.",
                                epilog="python data.py glyphs data/glyphs   |   python data.py prepare "
                                       "/data/imagenet/train --res 32,64 --out data/imagenet_train")
    p.add_argument("command", choices=["prepare", "glyphs"])
    p.add_argument("folder", help="prepare: the image folder to read; glyphs: the folder to write")
    p.add_argument("--res", default=None, help="prepare: comma-separated resolutions to write "
                   "(default 32,64); glyphs: the image size (default 32)")
    p.add_argument("--out", default="data/imagenet_train", help="prepare: the folder to write "
                   "(images_<res>.npy, labels.npy, classes.json); rerun the same command to resume")
    p.add_argument("--n", type=int, default=None, help="prepare: only the first N images "
                   "(class-balanced); glyphs: images per class (default 700)")
    p.add_argument("--seed", type=int, default=0, help="glyphs: the seed of the renderer")
    a = p.parse_args(argv)
    try:
        res = [int(r) for r in (a.res or ("32" if a.command == "glyphs" else "32,64")).split(",")]
    except ValueError:
        raise SystemExit(f"error: --res {a.res!r}: expected comma-separated integers") from None
    if min(res) < 1 or (a.n is not None and a.n < 1):
        raise SystemExit("error: --res and --n must be positive")
    try:
        if a.command == "glyphs":
            if len(res) != 1:
                raise ValueError("glyphs: give one --res")
            safety.check_memory(2 * (a.n or 700) * len(GLYPH_CLASSES) * res[0] ** 2,
                                f"glyphs at --res {res[0]}", "use a smaller --res or --n")
            count = write_glyphs(a.folder, a.n or 700, res[0], a.seed)
            print(f"wrote {count} images of {len(GLYPH_CLASSES)} classes to {a.folder}/")
        else:
            if not os.path.isdir(a.folder):
                raise ValueError(f"{a.folder} is not a folder; expected one sub-folder per class")
            t0, was_done = time.time(), _is_prepared(a.out)
            done = prepare_folder(a.folder, res, a.out, a.n)
            count = len(np.load(os.path.join(done, "labels.npy"), mmap_mode="r"))
            print(f"{done}/ was already prepared ({count} images at {', '.join(map(str, res))}); nothing to do"
                  if was_done else
                  f"prepared {count} images at {', '.join(map(str, res))} in {done}/ "
                  f"({count / (time.time() - t0):.0f} images/s); train with --data {done}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    safety.run_script(main)

"""fingerprint.py -- what a refactor must leave bitwise unchanged, as SHA-256 hashes of tensors.

  python tests/fingerprint.py OUT.json                 # in the repository to fingerprint
  python tests/fingerprint.py OUT.json --keep DIR      # ... and keep its checkpoints in DIR
  python tests/fingerprint.py OUT.json --from DIR      # sample checkpoints another commit kept

Trains each demo stage for 20 steps from a fixed seed (train_base.py, train_sr.py, train_sr.py
--preset demo32, and a base with dropout and a null class for guidance), hashes every tensor of
each checkpoint (weights, EMA, optimizer state), then samples the 3-stage cascade of those
checkpoints with every sampler, truncated and not, and the guided base, from fixed seeds, and
hashes every stage's float output. It fingerprints the repository it is run in (the current
folder), so it can be run on any commit, even one without it; two commits are bitwise the same
where their files are equal:

  cp tests/fingerprint.py /tmp/ && python /tmp/fingerprint.py /tmp/a.json --keep /tmp/ck
  git worktree add /tmp/old OLD && cd /tmp/old && python /tmp/fingerprint.py /tmp/b.json
  cmp /tmp/a.json /tmp/b.json

--from DIR samples the checkpoints another commit wrote (--keep) instead of training: its sample
hashes equal that commit's exactly when old checkpoints load and sample unchanged.

Runs on the CPU with 2 threads (about 2 minutes on 2 cores); the hashes hold for one machine and
one torch build, which is what a before/after comparison needs.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.getcwd()
sys.path.insert(0, HERE)


def digest(obj):
    """SHA-256 over every tensor in obj (nested dicts / lists), in sorted key order."""
    h = hashlib.sha256()
    def walk(o, name):
        if torch.is_tensor(o):
            t = o.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{name}.{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}[{i}]")
    walk(obj, "")
    return h.hexdigest()


def main(out, keep=None, source=None):
    torch.set_num_threads(2)
    import cdm
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = source or keep or tmp
        common = ["--steps", "20", "--seed", "0", "--device", "cpu", "--no_progress", "--sample_every", "0"]
        runs = {"base": ["train_base.py"], "sr16": ["train_sr.py"], "sr32": ["train_sr.py", "--preset", "demo32"],
                "guided": ["train_base.py", "--p_uncond", "0.1", "--dropout", "0.1"]}
        for name, cmd in ({} if source else runs).items():
            subprocess.run([sys.executable, *cmd, *common, "--out", os.path.join(tmp, name)], check=True,
                           stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="2"))
            ckpt = torch.load(os.path.join(tmp, name, "ckpt.pt"), map_location="cpu", weights_only=True)
            for part in ("model", "ema", "opt", "optimizer"):
                if part in ckpt:
                    result[f"train/{name}/{part}"] = digest(ckpt[part])
        import safety
        load_stage = getattr(cdm, "load_stage", None) or safety.load_stage     # (it moved to safety.py)
        load = lambda name: load_stage(os.path.join(tmp, name, "ckpt.pt"), "cpu", ema=True)
        stages = [load("base"), load("sr16"), load("sr32")]
        c = torch.tensor([0, 1, 2, 3])
        for sampler in cdm.SAMPLERS:
            for truncated in (False, True):
                for eta in ((0.0, 1.0) if sampler == "ddim" else (0.0,)):
                    g = torch.Generator().manual_seed(7)
                    xs = cdm.sample_cascade(stages, c, steps=[6, 4, 3], sampler=sampler, s=[None, 30, None],
                                            truncated=truncated, eta=eta, generator=g, progress=False)
                    for k, x in enumerate(xs):
                        result[f"sample/{sampler}/truncated={truncated}/eta={eta}/stage{k + 1}"] = digest(x)
        guided = [load("guided"), stages[1]]
        for sampler in cdm.SAMPLERS:
            g = torch.Generator().manual_seed(8)
            xs = cdm.sample_cascade(guided, c, steps=[5, 3], sampler=sampler, s=[None, 30], guidance=[2.0, 0.0],
                                    generator=g, progress=False)
            for k, x in enumerate(xs):
                result[f"guided/{sampler}/stage{k + 1}"] = digest(x)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"{len(result)} hashes written to {out}")


if __name__ == "__main__":
    flags = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    main(sys.argv[1], keep=flags.get("--keep"), source=flags.get("--from"))

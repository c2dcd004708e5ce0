"""train_sr.py -- train a class-conditional super-resolution (SR) stage of the cascade (CDM §3).

What SR adds to train_base.py, and nothing else:
  * training pairs: z0 = downsample(x0), the low-res copy of each high-res training image;
  * conditioning augmentation of z0 (CDM §3, §3.1): Gaussian noise z_s ~ q(z_s | z0) with the *base
    model's* schedule and a random s per example (the model is told s), or Gaussian blur on half
    the examples (the model is not told);
  * the extra inputs: z (upsampled and concatenated with x_t) and s, to eps_theta(x_t, t, c, z, s).

  python train_sr.py                          # demo stage 2: 8->16, noise augmentation (~1.5 min)
  python train_sr.py --preset demo32          # demo stage 3: 16->32, blur augmentation (~3 min)
"""
import cdm
import safety
import trainer

# Each value beside where it comes from (trainer.preset), as in train_base.py; docs/paper.md
# tabulates them.
PRESETS = {
    # 8->16 like the paper's 32->64 stage: learned variance, cosine schedule, noise augmentation.
    # Deviations for short CPU runs, each measured (docs/choices.md): the network predicts the
    # velocity, not eps (low-res consistency 28 dB instead of 25 dB); s_max = T/10 and s = T/20
    # at sampling (+1.9 dB over T/4 and T/10; fractions of --aug_T, so a smaller T scales them);
    # lr 2e-3; mult 1,1,2 (as good as 1,2,2, faster).
    "demo16": trainer.preset(
        paper=dict(aug="noise"),
        iddpm=dict(schedule="cosine", variance="learned"),
        ours=dict(data="shapes", flip=None, res=16, low_res=8, aug_T=1000, s_max_frac=1 / 10,
                  sample_s_frac=1 / 20, ch=32, mult=(1, 1, 2), res_blocks=1, attn=(4,), heads=2,
                  dropout=0.0, skip_rescale=False, T=1000, prediction="velocity", sampler="dpm++2m-sde",
                  sample_steps=20, steps=450, batch_size=32, lr=2e-3, warmup=50, lr_decay="cosine",
                  grad_clip=1.0, ema=0.999, ema_warmup=True, save_every=500, keep_every=0, out="runs/sr16")),
    # 16->32 like the paper's 64->256 stage: blur augmentation on half the examples. The paper's
    # high-res stages follow SR3 (fixed variance, linear schedule: --variance fixed --schedule
    # linear); in our short CPU runs that left residual noise (18 dB low-res consistency vs 24 dB),
    # so the demo keeps the learned variance and cosine schedule of the other stages. Velocity
    # prediction instead of eps (deviation) removed the brightening and speckle of this stage:
    # 22 dB -> 32 dB.
    "demo32": trainer.preset(
        paper=dict(aug="blur", blur_p=0.5),
        secondary=dict(blur_sigma=(0.4, 0.6)),
        iddpm=dict(schedule="cosine", variance="learned"),
        ours=dict(data="shapes", flip=None, res=32, low_res=16, ch=32, mult=(1, 1, 2), res_blocks=1,
                  attn=(8,), heads=2, dropout=0.0, skip_rescale=False, T=1000, prediction="velocity",
                  sampler="dpm++2m-sde", sample_steps=20, steps=220, batch_size=32, lr=2e-3, warmup=50,
                  lr_decay="cosine", grad_clip=1.0, ema=0.999, ema_warmup=True, save_every=500,
                  keep_every=0, out="runs/sr32")),
    # The paper's 32->64 stage, Gaussian noise augmentation with the base's schedule (T = 4000).
    # The paper trains one model over all s and picks s after training by FID; the best reported
    # for 32->64 are s = 501-751 (truncated) and 751-1251 (non-truncated), a secondary source
    # (named in docs/paper.md). No
    # range of s is given: s ~ U{0..2000} (T/2) covers those with room for the search, and s = 1000
    # (T/4, non-truncated) lies inside the reported best range (ours). Warm-up, clipping and the
    # EMA warm-up off, as in train_base.py's imagenet32; all 4000 sampling steps, as reported.
    "imagenet64": trainer.preset(
        paper=dict(res=64, low_res=32, aug="noise"),
        secondary=dict(flip=True, ch=256, mult=(1, 2, 3, 4), res_blocks=5, attn=(16, 8), heads=4,
                       dropout=0.1, schedule="cosine", T=4000, aug_T=4000, variance="learned",
                       prediction="eps", sampler="ancestral", sample_steps=4000, steps=400_000,
                       batch_size=2048, lr=1e-4, lr_decay="none", ema=0.9999),
        ours=dict(data="data/imagenet_train", s_max_frac=1 / 2, sample_s_frac=1 / 4, skip_rescale=False,
                  warmup=0, grad_clip=0.0, ema_warmup=False, save_every=5000, keep_every=50_000,
                  out="runs/imagenet64_sr")),
    # 64->128 and 64->256 follow SR3, as the paper says: fixed variance, T = 2000, ~100 sampling
    # steps, blur augmentation (a secondary source gives the numbers: docs/paper.md), with SR3's
    # 10k-step linear warm-up and residual sums scaled by 1/sqrt(2). Deviations (docs/paper.md): we condition on the
    # discrete t of a linear schedule, not on SR3's continuous noise level, and resample with a
    # strided conv / nearest + conv, not BigGAN residual blocks.
    "imagenet128": trainer.preset(
        paper=dict(res=128, low_res=64, aug="blur", blur_p=0.5),
        secondary=dict(flip=True, ch=128, mult=(1, 2, 4, 8, 8), res_blocks=3, attn=(16,), heads=1,
                       dropout=0.0, T=2000, variance="fixed", prediction="eps", sampler="ancestral",
                       sample_steps=100, steps=500_000, batch_size=1024, lr=1e-4, lr_decay="none",
                       ema=0.9999, blur_sigma=(0.4, 0.6)),
        sr3=dict(warmup=10_000, skip_rescale=True),
        ours=dict(data="data/imagenet_train", schedule="linear", grad_clip=0.0, ema_warmup=False,
                  save_every=5000, keep_every=50_000, out="runs/imagenet128_sr")),
    "imagenet256": trainer.preset(
        paper=dict(res=256, low_res=64, aug="blur", blur_p=0.5),
        secondary=dict(flip=True, ch=128, mult=(1, 2, 4, 4, 8, 8), res_blocks=3, attn=(16,), heads=1,
                       dropout=0.0, T=2000, variance="fixed", prediction="eps", sampler="ancestral",
                       sample_steps=100, steps=500_000, batch_size=1024, lr=1e-4, lr_decay="none",
                       ema=0.9999, blur_sigma=(0.4, 0.6)),
        sr3=dict(warmup=10_000, skip_rescale=True),
        ours=dict(data="data/imagenet_train", schedule="linear", grad_clip=0.0, ema_warmup=False,
                  save_every=5000, keep_every=50_000, out="runs/imagenet256_sr")),
}


def parse_args(argv=None):
    """The flags, with the preset's values as defaults, every one checked; adds args.augment,
    the augmentation config stored in the checkpoint."""
    p, d = trainer.preset_parser(__doc__, PRESETS, "demo16", argv)
    p.add_argument("--res", type=int, default=d["res"], help="output resolution of this SR stage")
    p.add_argument("--low_res", type=int, default=d["low_res"], help="resolution of its input z")
    g = p.add_argument_group("conditioning augmentation (CDM §3: noise; §3.1: blur)")
    g.add_argument("--aug", choices=["noise", "blur", "none"], default=d["aug"],
                   help="noise: z_s = q(z_s|z0), s given to the model; blur: 3x3 Gaussian; none")
    g.add_argument("--aug_schedule", choices=sorted(cdm.SCHEDULES), default="cosine",
                   help="noise aug: the low-res (base) model's schedule")
    g.add_argument("--aug_T", type=int, default=d.get("aug_T", 1000), help="noise aug: the low-res model's T")
    s_max_frac, sample_s_frac = d.get("s_max_frac", 1 / 4), d.get("sample_s_frac", 1 / 10)  # blur presets: ours
    g.add_argument("--s_max", type=int, default=None,
                   help=f"noise aug: train on s ~ U{{0..s_max}} (default aug_T * {s_max_frac:g}, "
                        "our choice)")
    g.add_argument("--sample_s", type=int, default=None,
                   help=f"noise aug: s for the preview grids and sample.py's default (default aug_T * "
                        f"{sample_s_frac:g}); the paper picks it after training, by FID (sample.py --s_sweep)")
    g.add_argument("--blur_sigma", type=float, nargs=2, default=d.get("blur_sigma", (0.4, 0.6)),
                   help="blur aug: sigma ~ U(lo, hi) (0.4 0.6 at 256x256, as a secondary source reports "
                        "for the paper)")
    g.add_argument("--blur_p", type=float, default=d.get("blur_p", 0.5),
                   help="blur aug: fraction of examples blurred (the paper: half)")
    args = trainer.check_args(trainer.add_common_args(p, d).parse_args(argv))
    if args.low_res < 1 or args.low_res >= args.res or args.res % args.low_res:
        raise SystemExit(f"error: --low_res {args.low_res} must divide --res {args.res} and be smaller")
    if args.aug_T < 1:
        raise SystemExit(f"error: --aug_T {args.aug_T}: must be positive")
    safety.check_memory(trainer.SCHEDULE_BYTES * (args.aug_T + 1), f"--aug_T {args.aug_T}",
                        "the paper's base models use T = 4000")
    args.sample_s = round(args.aug_T * sample_s_frac) if args.sample_s is None else args.sample_s
    if not 0 <= args.sample_s <= args.aug_T:
        raise SystemExit(f"error: --sample_s must lie in 0..{args.aug_T}, got {args.sample_s}")
    lo, hi = args.blur_sigma
    if not 0 < lo <= hi:
        raise SystemExit(f"error: --blur_sigma {lo} {hi}: need 0 < lo <= hi (the paper: 0.4 0.6)")
    if not 0 <= args.blur_p <= 1:
        raise SystemExit(f"error: --blur_p {args.blur_p}: a fraction in [0, 1]")
    if args.aug == "noise":
        s_max = round(args.aug_T * s_max_frac) if args.s_max is None else args.s_max
        if not 0 <= s_max <= args.aug_T:
            raise SystemExit(f"error: --s_max must lie in 0..{args.aug_T}, got {s_max}")
        augment = {"type": "noise", "schedule": args.aug_schedule, "T": args.aug_T, "s_max": s_max,
                   "sample_s": args.sample_s}
    elif args.aug == "blur":
        augment = {"type": "blur", "sigma": list(args.blur_sigma), "p": args.blur_p}
    else:
        augment = {"type": "none"}
    args.augment = augment
    return args


def conditioning(low_res, augment):
    """make_kwargs(x0, c, train, rng) for an SR stage (trainer.train; distill.py's rounds too):
    the class, the low-res z made from each batch's x0, augmented, and s if noise-augmented."""
    low_res_diffusion = cdm.aug_diffusion(augment)
    sample_s = augment.get("sample_s", augment.get("T", 0) // 10)   # as cdm.Stage.sample_s

    def make_kwargs(x0, c, train, rng):
        z0 = cdm.downsample(x0, low_res)                 # training pair (x0, z0), area filter
        if not train:                                    # previews: as sample.py hands z0 over
            return {"c": c, **cdm.handover(z0, augment, sample_s, truncated=False)}
        z, s = cdm.augment_for_training(z0, augment, low_res_diffusion, rng)
        return {"c": c, "z": z} if s is None else {"c": c, "z": z, "s": s}
    return make_kwargs


def main(argv=None):
    args = parse_args(argv)
    trainer.claim_out(args)    # before any work: --out writable, locked, no run replaced unasked
    dataset = trainer.load_training_data(args, args.res)
    config = trainer.make_config(args, dataset, low_res=args.low_res, augment=args.augment)
    trainer.train(args, config, dataset, conditioning(args.low_res, args.augment))


if __name__ == "__main__":
    safety.run_script(main)

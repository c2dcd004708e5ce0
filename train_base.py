"""train_base.py -- train the class-conditional base model of the cascade (CDM §3.1, §4.1).

The base model is an ordinary class-conditional diffusion model at the lowest resolution:
eps_theta(x_t, t, c). Defaults are the CPU demo: 8x8 images of the embedded 'shapes' dataset,
learned variances with the hybrid loss and the cosine schedule, as for the paper's 32x32 base.

  python train_base.py                        # CPU demo, ~1 minute on 2 cores
  python train_base.py --data cifar10 --download --res 32 --ch 128 --mult 1,2,2,2 --res_blocks 3 \\
      --attn 16,8 --batch_size 128 --steps 500000 --lr 1e-4 --ema 0.9999 --T 4000 --out runs/cifar_base
"""
import argparse

import torch

import trainer

DEMO = dict(ch=48, mult=(1, 2), res_blocks=1, attn=(4,), heads=2, dropout=0.0, schedule="cosine",
            T=1000, variance="learned", sample_steps=50, steps=1000, batch_size=32, lr=1e-3,
            warmup=50, ema=0.999, lr_decay="cosine", out="runs/base")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=8, help="image resolution of the base model")
    args = trainer.add_common_args(p, DEMO).parse_args(argv)
    dataset = trainer.load_training_data(args, args.res)
    config = trainer.make_config(args, dataset)

    def make_kwargs(x0, c, train):
        return {"c": c}  # the base model sees only the class

    trainer.train(args, config, dataset, make_kwargs)


if __name__ == "__main__":
    main()

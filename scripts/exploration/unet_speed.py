"""Training images/s of the Fashion-MNIST recipe's U-Net (channels 32, one block per level, no attention, no dropout)
for several channel_mult and batch sizes: forward, backward and Adam step of the `UNet` alone, on random data.

    python scripts/exploration/unet_speed.py --threads 1 --batch 32 --mults 1222 1122 1124   # SPEED of ablation.py
    python scripts/exploration/unet_speed.py --threads 2 --batch 32 16 8                      # the batch on 2 threads
    python scripts/exploration/unet_speed.py --threads 2 --mults 1222 122 --sizes 32 28       # data.crop 2: 28x28
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from unet import UNet  # noqa: E402


def recipe_unet(mult: tuple[int, ...], size: int) -> UNet:
    return UNet(in_channels=1, channels=32, channel_mult=mult, num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                image_size=size)


def images_per_sec(mult: tuple[int, ...], batch: int, steps: int, size: int = 32) -> float:
    torch.manual_seed(0)
    model = recipe_unet(mult, size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t = torch.randn(batch, 1, size, size), torch.randint(0, 1000, (batch,))

    def step() -> None:
        loss = (model(x, t) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--mults", nargs="+", default=["1222"], help="channel_mult as digits: 1222 is [1, 2, 2, 2]")
    p.add_argument("--images", type=int, default=384, help="images timed per cell (after 3 warm-up steps)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32],
                   help="image sizes, one per --mults entry or one for all (28: data.crop 2)")
    args = p.parse_args()
    if len(args.sizes) not in (1, len(args.mults)):
        p.error("--sizes takes one size, or one per --mults entry")
    torch.set_num_threads(args.threads)
    for digits, size in zip(args.mults, args.sizes * len(args.mults) if len(args.sizes) == 1 else args.sizes):
        mult = tuple(int(c) for c in digits)
        for batch in args.batch:
            n = sum(p.numel() for p in recipe_unet(mult, size).parameters())
            ips = images_per_sec(mult, batch, max(1, args.images // batch), size)
            print(f"{size}x{size}  channel_mult {list(mult)} ({n / 1e6:.2f}M)  batch {batch:3d}  "
                  f"{args.threads} thread(s)  {ips:6.1f} images/s", flush=True)


if __name__ == "__main__":
    main()

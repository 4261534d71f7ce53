"""Training images/s of the Fashion-MNIST recipe's U-Net (channels 32, one block per level, no attention, no dropout)
for several channel_mult and batch sizes: forward, backward and Adam step of the `UNet` alone, on random data.

    python scripts/exploration/unet_speed.py --threads 1 --batch 32 --mults 1222 1122 1124   # SPEED of ablation.py
    python scripts/exploration/unet_speed.py --threads 2 --batch 32 16 8                      # the batch on 2 threads
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from unet import UNet  # noqa: E402


def images_per_sec(mult: tuple[int, ...], batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = UNet(in_channels=1, channels=32, channel_mult=mult, num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t = torch.randn(batch, 1, 32, 32), torch.randint(0, 1000, (batch,))

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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for digits in args.mults:
        mult = tuple(int(c) for c in digits)
        for batch in args.batch:
            n = sum(p.numel() for p in UNet(in_channels=1, channels=32, channel_mult=mult, num_res_blocks=1,
                                            attn_resolutions=(), dropout=0.0).parameters())
            ips = images_per_sec(mult, batch, max(1, args.images // batch))
            print(f"channel_mult {list(mult)} ({n / 1e6:.2f}M)  batch {batch:3d}  {args.threads} thread(s)  "
                  f"{ips:6.1f} images/s", flush=True)


if __name__ == "__main__":
    main()

"""Regional compilation on the CPU: every ResBlock and AttnBlock compiled (nn.Module.compile, static shapes), the
rest eager; against the eager step, fp32, paper model, batch 16, one thread, interleaved rounds (bench.race).

    python scripts/regional_compile.py        # docs/benchmarks.md, "torch.compile on CPU"
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench, config, ddpm, train  # noqa: E402,E401
from unet import AttnBlock, ResBlock  # noqa: E402

torch.set_num_threads(1)
dev = torch.device('cpu')


def step_fn(regional: bool):
    cfg = config.Config(train=config.Train(lr=bench.LR, grad_clip=1.0, ema_decay=0.9999, precision="fp32"))
    torch.manual_seed(0)
    parts = train.build(cfg, bench.PAPER, dev)
    if regional:
        for m in parts.model.modules():
            if isinstance(m, (ResBlock, AttnBlock)):
                m.compile(dynamic=False)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    def step():
        t, noise = ddpm.draw_t_noise(parts.schedule, x.shape, generator=gen, device=dev)
        return train.train_step(parts, x, t, noise, lr=bench.LR)
    return step


res = bench.race({"eager": step_fn(False), "regional compile": step_fn(True)}, 1, 3, dev)
for k, v in res.items():
    print(f"{k}: first step {v['warmup_s'][0]:.1f} s, steps {[round(s, 2) for s in v['times_s']]} s, {16 / v['median_s']:.2f} img/s")
print(f"regional vs eager: {bench.ratio(res, 'eager', 'regional compile'):.2f}x (median per-round ratio)")

"""What random horizontal flips cost on Fashion-MNIST under the project's metric: the FID (Fashion-MNIST classifier
features, against the test set, as `evaluate.py --features fashion-mnist`) of N real training images as they are
(the floor), with every image flipped, and with each flipped with probability 1/2 (what a model trained with
`data.random_flip: true` learns to sample, at best). Fashion-MNIST's shoes and boots all point the same way, so
a flip makes images the data never has:

    python scripts/flip_floor.py --num-images 2000 --out docs/quality/flip-floor.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import evaluate  # noqa: E402


def flip_variants(images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The images as they are, all flipped left-right, and each flipped with probability 1/2 (data.py's rule)."""
    half = torch.rand(len(images), generator=generator) < 0.5
    return {"as is": images, "all flipped": images.flip(-1),
            "half flipped": torch.where(half[:, None, None, None], images.flip(-1), images)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="which training images, and which are flipped")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per row here")
    args = p.parse_args(argv)
    extractor = evaluate.feature_extractor("fashion-mnist", torch.device("cpu"), "data/fid_stats", progress=False)
    ref = evaluate.reference_stats(evaluate.default_ref("fashion-mnist", "fashion-mnist"), extractor,
                                   cache_dir="data/fid_stats")
    train = data.load_dataset(Path("data") / "fashion-mnist" / "train.npy")
    g = torch.Generator().manual_seed(args.seed)
    images = train[torch.randperm(len(train), generator=g)[:args.num_images]]
    for name, x in flip_variants(images, g).items():
        scores = evaluate.image_scores(x, ref, extractor, classes=True)
        row = {"images": name, "num_images": len(x), "seed": args.seed, "fid": round(scores["fid"], 3),
               "class_coverage": round(scores["class_coverage"], 3)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

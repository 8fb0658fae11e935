"""Build a DyHead, run it on a random P3-P7 pyramid and print the output shapes and the time taken."""

import argparse
import time

import torch

from dyhead import DyHead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 384), help="padded image height and width")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--backend", default="auto", help="torchvision, sampled, triton or auto")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DyHead(args.channels, args.channels, args.blocks, backend=args.backend).to(device).eval()
    levels = []
    for stride in (8, 16, 32, 64, 128):
        h, w = (-(-args.size[0] // stride), -(-args.size[1] // stride))
        levels.append(torch.randn(1, args.channels, h, w, device=device))
    with torch.no_grad():
        start = time.perf_counter()
        out = model(levels)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    for name, t in zip(("P3", "P4", "P5", "P6", "P7"), out):
        print(f"{name}: {tuple(t.shape)}")
    print(f"DyHead({args.blocks} blocks, backend={model.backend}) forward on {device}: {elapsed * 1000:.1f} ms")


if __name__ == "__main__":
    main()

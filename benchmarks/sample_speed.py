"""Names per second: the seed-style loop (one name at a time, a full forward pass per token) against
the batched, key/value-cached ``microgpt.model.sampling.generate``, on the same checkpoint, in the same process.

    python benchmarks/sample_speed.py --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
"""

import argparse
import time

import torch
import torch.nn.functional as F

from microgpt.checkpoints.loading import load_model
from microgpt.model.names import sample_names


@torch.no_grad()
def seed_style(gpt, bos, num_samples, temperature, generator):
    names = []
    for _ in range(num_samples):
        idx = [bos]
        for _ in range(gpt.block_size):
            logits = gpt(torch.tensor([idx[-gpt.block_size :]]))[0, -1]
            token = int(torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator))
            if token == bos:
                break
            idx.append(token)
        names.append(idx[1:])
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gpt, tokenizer = load_model(args.ckpt_path)
    gpt.eval()
    params = sum(p.numel() for p in gpt.parameters())
    print(f"checkpoint: {args.ckpt_path} ({params} parameters, block_size {gpt.block_size}); "
          f"{args.num_samples} names at temperature {args.temperature}; torch threads {torch.get_num_threads()}")
    best = {"seed-style loop": float("inf"), "batched + kv cache": float("inf")}
    for r in range(args.repeats):
        g = torch.Generator().manual_seed(r)
        t = time.perf_counter()
        seed_style(gpt, tokenizer.bos, args.num_samples, args.temperature, g)
        best["seed-style loop"] = min(best["seed-style loop"], time.perf_counter() - t)
        t = time.perf_counter()
        sample_names(gpt, tokenizer, args.num_samples, args.temperature, generator=g)
        best["batched + kv cache"] = min(best["batched + kv cache"], time.perf_counter() - t)
    for name, seconds in best.items():
        print(f"{name:>20}: {args.num_samples / seconds:10.0f} names/s ({seconds:.3f} s, best of {args.repeats})")
    print(f"{'speed-up':>20}: {best['seed-style loop'] / best['batched + kv cache']:10.1f}x")


if __name__ == "__main__":
    main()

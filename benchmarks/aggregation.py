"""Time every aggregation function on SmolLM2-135M's adapted layers.

Shapes: q_proj (576×576) and v_proj (192×576) in each of 30 blocks, global rank 64,
10 clients with ranks drawn from {4, 8, 16, 32, 64}.  Prints milliseconds per
method for one full aggregation (all 60 layers) and FlexLoRA's speed-up over a
dense-SVD implementation measured in the same run.

    python benchmarks/aggregation.py [--repeats 5] [--seed 0] [--ranks 4 8 16 32 64] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from fedrank import aggregation as agg

LAYER_SHAPES = [(576, 576), (192, 576)] * 30  # (m, n) for q_proj, v_proj per block
RANK_CHOICES = [4, 8, 16, 32, 64]
GLOBAL_RANK = 64
CLIENTS = 10


def flexlora_dense(As, Bs, weights, ranks):
    """Reference FlexLoRA: form ΔW = Σ p_k B_k A_k densely, then a full SVD."""
    p = torch.as_tensor(weights, dtype=As[0].dtype)
    p = p / p.sum()
    delta = sum(pk * B @ A for pk, A, B in zip(p, As, Bs))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return [(Vh[:r], U[:, :r] * S[:r]) for r in ranks]


def make_layers(seed: int, rank_choices: list[int]) -> tuple[list[int], list[tuple[list[torch.Tensor], list[torch.Tensor]]]]:
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(rank_choices), (CLIENTS,), generator=gen)
    ranks = [rank_choices[i] for i in pick]
    layers = []
    for m, n in LAYER_SHAPES:
        As = [torch.randn(r, n, generator=gen) for r in ranks]
        Bs = [torch.randn(m, r, generator=gen) * 0.01 for r in ranks]
        layers.append((As, Bs))
    return ranks, layers


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, nargs="+", default=RANK_CHOICES, help="client ranks to draw from")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ranks, layers = make_layers(args.seed, args.ranks)
    weights = [float(i + 1) for i in range(CLIENTS)]
    slots = [list(range(GLOBAL_RANK))[-r:] for r in ranks]
    methods: dict[str, Callable] = {
        "fedavg (rank 64 for all)": lambda As, Bs: agg.fedavg(As, Bs, weights),
        "zero_pad": lambda As, Bs: agg.zero_pad(As, Bs, weights, GLOBAL_RANK),
        "replicate_pad": lambda As, Bs: agg.replicate_pad(As, Bs, weights, GLOBAL_RANK),
        "hetlora": lambda As, Bs: agg.hetlora(As, Bs, weights, GLOBAL_RANK),
        "flora_stack": lambda As, Bs: agg.flora_stack(As, Bs, weights),
        "flexlora (QR)": lambda As, Bs: agg.flexlora(As, Bs, weights, ranks),
        "flexlora (dense SVD)": lambda As, Bs: flexlora_dense(As, Bs, weights, ranks),
        "plora": lambda As, Bs: agg.plora(As, Bs, weights, slots, GLOBAL_RANK),
    }
    print(f"{len(LAYER_SHAPES)} layers (q_proj 576x576, v_proj 192x576), global rank {GLOBAL_RANK}, "
          f"{CLIENTS} clients with ranks {ranks} (sum {sum(ranks)}), torch threads {torch.get_num_threads()}")
    print(f"{'method':<26}{'ms / aggregation':>18}{'ms / layer':>12}")
    results = {}
    full_rank_layers = [
        ([torch.randn(GLOBAL_RANK, A.shape[1]) for A in As], [torch.randn(B.shape[0], GLOBAL_RANK) for B in Bs])
        for As, Bs in layers
    ]
    for name, fn in methods.items():
        inputs = full_rank_layers if name.startswith("fedavg") else layers
        ms = time_ms(lambda: [fn(As, Bs) for As, Bs in inputs], args.repeats)
        results[name] = ms
        print(f"{name:<26}{ms:>18.1f}{ms / len(layers):>12.2f}")
    speedup = results["flexlora (dense SVD)"] / results["flexlora (QR)"]
    print(f"FlexLoRA speed-up of the QR path over dense SVD: {speedup:.1f}x")


if __name__ == "__main__":
    main()

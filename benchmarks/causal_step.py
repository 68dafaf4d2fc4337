"""Causal-LM training step: loss on selected positions only vs full-vocabulary logits everywhere.

One LoRA training step (forward + backward) of SmolLM2-135M on a generate-label batch from BBC News:
``answer_loss`` applies ``lm_head`` only where the next token is an answer token; the reference computes
the logits of every position (49k-word vocabulary) and then masks.  Prints the best of ``--repeats``.

    python benchmarks/causal_step.py [--batch 16] [--max-length 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from fedrank.config import load_config
from fedrank.experiment import build
from fedrank.tasks import answer_loss, collate


def full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["loss_mask"][:, 1:]
    return F.cross_entropy(logits[:, :-1][target], batch["input_ids"][:, 1:][target])


def best_step_s(loss_fn, model, batch, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config("configs/smollm2_bbc_hetero.toml", ["clients.count=2", "clients.per_round=2",
                                                          "data.max_train_examples=64",
                                                          f"train.max_length={args.max_length}"])
    exp = build(cfg)
    model = exp.model
    model.use_rank(16)
    model.trainable(True)
    model.peft.train()
    batch = collate(exp.client.data[0].train, list(range(args.batch)), exp.client.pad_id)
    selected = best_step_s(answer_loss, model.peft, batch, args.repeats)
    full = best_step_s(full_logits_loss, model.peft, batch, args.repeats)
    torch.testing.assert_close(answer_loss(model.peft, batch), full_logits_loss(model.peft, batch))
    print(f"batch {tuple(batch['input_ids'].shape)}, {int(batch['loss_mask'].sum())} answer tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"full-vocabulary logits   {full:7.2f} s / step")
    print(f"selected positions only  {selected:7.2f} s / step   speed-up {full / selected:.2f}x")


if __name__ == "__main__":
    main()

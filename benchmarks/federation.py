"""Federation overhead and local-training throughput (prints figures; no pass/fail).

1. Overhead: wall time of a federated run vs the same optimizer steps on the same batches in a
   bare PyTorch loop (same model, adapter rank, optimizer), as a ratio: the steps alone, and the
   whole run (model load to exported adapter) against the bare loop plus its model load and one
   evaluation, with the global model evaluated only at the end and after every round.
2. Throughput: fedrank's local training loop vs Hugging Face ``Trainer`` + PEFT on the same model,
   batch size and steps (steps/s ratio), and achieved FLOP/s vs this machine's measured fp32
   matmul FLOP/s.  FLOPs per step are estimated from the Linear layers' weights (embedding lookups do no
   matmuls) as ``4 · N_frozen · tokens`` (forward plus the input-gradient half of backward; frozen weights
   get no weight gradient) plus ``6 · N_trainable · tokens``; attention's score products are left out.
3. Hardware and precision: the device, the CPU and its flags that matter for low precision (AMX,
   AVX-512 bf16/fp16), the matmul peak per dtype, and one training step of MiniLM (the default job's
   batch) and of SmolLM2-135M (8 × 64) per ``--precisions``, a low precision both as autocast over the
   fp32 base and with the frozen base stored in that dtype; FLOPs counted by torch's FlopCounterMode,
   as a share of the same dtype's peak.

    python benchmarks/federation.py [--rounds 3] [--steps 10] [--per-round 2] [--repeats 2]
    python benchmarks/federation.py --parts hardware --precisions fp32,bf16,fp16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedrank.client import batch_order, evaluate
from fedrank.compute import PRECISIONS, Compute
from fedrank.job import execute
from fedrank.tasks import collate
from fedrank.config import load_config
from fedrank.experiment import build
from fedrank.methods import Task
from fedrank.methods.base import task_generator
from fedrank.server import sample_clients


CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_fp16", "avx512f", "avx512_bf16", "avx512_fp16")


def best_seconds(fn, repeats: int, trials: int = 5) -> float:
    """The best of ``trials`` timings of ``repeats`` calls of ``fn`` (after one warm-up call), per call."""
    fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / repeats


def matmul_flops(n: int = 2048, repeats: int = 5, trials: int = 5, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu")) -> float:
    """The best of ``trials`` timings of ``repeats`` n×n matmuls in ``dtype``, in FLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def matmul() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / best_seconds(matmul, repeats, trials)


def cpu_description() -> tuple[str, list[str]]:
    """(model name, the flags of ``CPU_FLAGS`` it has) from /proc/cpuinfo (empty where there is none)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU", []
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", "unknown CPU"), [f for f in CPU_FLAGS if f in flags]


def training_step(exp, compute: Compute) -> tuple[Callable[[], None], int]:
    """(one fedrank training step on a fixed batch under ``compute``'s autocast, tokens per step)."""
    model, cfg = exp.model, exp.cfg
    model.use_rank(8)
    lora, head = model.trainable()
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.train.lr}, {"params": head, "lr": cfg.train.head_lr}])
    data = exp.client.data[0].train
    batch = compute.to(collate(data, list(range(cfg.train.batch_size)), exp.loaded.tokenizer.pad_token_id))
    model.peft.train()

    def step() -> None:
        with compute.autocast():
            loss = exp.client.task.loss(model.peft, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if compute.device.type == "cuda":
            torch.cuda.synchronize()

    return step, int(batch["attention_mask"].sum())


def step_flops(step: Callable[[], None]) -> int:
    """The FLOPs of one call of ``step``, counted by torch's FlopCounterMode (every matmul, attention included)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# Part 3's models: (label, config file, overrides). SmolLM2 at the batch of the issue's measurement (8 × 64).
STEP_MODELS = [
    ("MiniLM-L6 classify", None, ["eval.final_full=false"]),
    ("SmolLM2-135M generate-label", "configs/smollm2_bbc_hetero.toml",
     ["clients.count=2", "clients.per_round=2", "data.max_train_examples=64", "train.batch_size=8",
      "train.max_length=64", "eval.final_full=false"]),
]


def hardware_and_precision(precisions: list[str], steps: int) -> None:
    """Part 3: device, CPU flags, matmul peak per dtype, and one training step per model and precision.

    A low precision is timed twice: autocast over the fp32 base (every Linear weight cast at every matmul) and
    with the frozen base stored in that dtype, as fedrank builds it for ``precision = bf16 | fp16``.
    """
    name, flags = cpu_description()
    device = Compute.of("auto", "fp32").device
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"3. hardware and precision: device {device}{gpu}; CPU {name}, {torch.get_num_threads()} threads; "
          f"flags: {', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}")
    peaks = {p: matmul_flops(dtype=PRECISIONS[p] or torch.float32, device=device) for p in precisions}
    print("   2048² matmul peak: " + ", ".join(f"{p} {peak / 1e9:.1f} GFLOP/s" for p, peak in peaks.items()))
    for label, config, overrides in STEP_MODELS:
        fp32 = build(load_config(config, overrides))
        for precision in precisions:
            variants = [("", fp32)] if precision == "fp32" else [
                (" autocast, fp32 base", fp32),
                (f" autocast, {precision} base", build(load_config(config, overrides + [f"precision={precision}"])))]
            for variant, exp in variants:
                step, tokens = training_step(exp, Compute(device, precision))
                flops = step_flops(step)
                seconds = best_seconds(step, steps, trials=3)
                exp.model.peft.eval()
                print(f"   {label} ({exp.cfg.train.batch_size} × {tokens // exp.cfg.train.batch_size} tokens), "
                      f"{precision}{variant}: {1e3 * seconds:7.1f} ms/step, {flops / seconds / 1e9:6.1f} GFLOP/s "
                      f"= {100 * flops / seconds / peaks[precision]:.0f}% of the {precision} peak")


def linear_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weight counts of the matmuls a token goes through: the Linear layers, without the
    embedding tables (lookups, no FLOPs) and without PEFT's frozen copy of a fully trained head."""
    frozen = trainable = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "original_module" not in name:
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return frozen, trainable


def bare_loop(exp, tasks: list[Task]) -> tuple[float, int]:
    """The same steps on the same batches, with no federation around them; returns (seconds, tokens)."""
    cfg, model = exp.cfg, exp.model
    tokens = 0
    start = time.perf_counter()
    for task in tasks:
        model.use_rank(task.rank)
        lora, head = model.trainable()
        opt = torch.optim.AdamW([{"params": lora, "lr": cfg.train.lr}, {"params": head, "lr": cfg.train.head_lr}])
        data = exp.client.data[task.client].train
        order = batch_order(len(data), cfg.train.batch_size, task_generator(cfg.seed, task, "batches"))
        model.peft.train()
        for _ in range(cfg.train.local_steps):
            batch = collate(data, next(order), exp.loaded.tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            loss = exp.client.task.loss(model.peft, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, tokens


def trainer_steps_per_s(exp, client: int, steps: int, rank: int) -> float:
    """Hugging Face Trainer + PEFT on the same model, client data, batch size and steps."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from fedrank.adapters import lora_config

    cfg = exp.cfg
    data = exp.client.data[client].train
    ds = Dataset.from_dict({"input_ids": data.ids, "labels": data.labels})
    model = get_peft_model(exp.fresh_base(), lora_config(rank, cfg.model.scale, exp.model.target_modules, 0.0,
                                                        modules_to_save=exp.model.head_modules))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.train.batch_size, max_steps=steps,
                                 learning_rate=cfg.train.lr, report_to=[], logging_strategy="no", save_strategy="no",
                                 disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, seed=cfg.seed)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          data_collator=DataCollatorWithPadding(exp.loaded.tokenizer))
        start = time.perf_counter()
        trainer.train()
        return steps / (time.perf_counter() - start)


def timed_run(cfg) -> tuple[float, list[dict]]:
    """Wall time of ``fedrank run`` (model load to exported adapter) and its metrics rows."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        execute(cfg, Path(tmp) / "run")
        seconds = time.perf_counter() - start
        return seconds, [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="local steps per client per round")
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the best time of each is shown")
    parser.add_argument("--parts", default="federation,hardware",
                        help="comma-separated: federation (parts 1-2), hardware (part 3)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help=f"part 3: comma-separated precisions to time ({', '.join(PRECISIONS)})")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    if "federation" in parts:
        federation(args)
    if "hardware" in parts:
        hardware_and_precision([p.strip() for p in args.precisions.split(",")], args.steps)


def federation(args: argparse.Namespace) -> None:
    """Parts 1 and 2: federation overhead and local-training throughput."""
    overrides = [f"rounds={args.rounds}", f"train.local_steps={args.steps}", f"clients.per_round={args.per_round}",
                 "ranks.values=[8]", "eval.final_full=false"]
    cfg = load_config(None, overrides)
    end_only_cfg = load_config(None, overrides + [f"eval.every={args.rounds}"])
    tasks = [Task(c, 8, rnd) for rnd in range(1, cfg.rounds + 1)
             for c in sample_clients(cfg.seed, rnd, cfg.clients.count, cfg.clients.per_round)]
    times: dict[str, list[float]] = {k: [] for k in ("every", "end", "train", "bare", "bare_whole")}
    for _ in range(args.repeats):  # interleaved, best of each: drifts in machine speed hit both sides alike
        seconds, rows = timed_run(cfg)
        times["every"].append(seconds)
        times["train"].append(sum(r["train_s"] + r["aggregate_s"] for r in rows))
        times["end"].append(timed_run(end_only_cfg)[0])
        start = time.perf_counter()
        exp = build(cfg)
        load = time.perf_counter() - start
        bare_s, tokens = bare_loop(exp, tasks)
        start = time.perf_counter()
        evaluate(exp.model.peft, exp.test_round, exp.num_labels, cfg.eval.batch_size,
                 exp.loaded.tokenizer.pad_token_id)
        times["bare"].append(bare_s)
        times["bare_whole"].append(load + bare_s + time.perf_counter() - start)
    every_round, end_only, train_and_aggregate, bare, bare_whole = (
        min(times[k]) for k in ("every", "end", "train", "bare", "bare_whole"))
    steps = len(tasks) * cfg.train.local_steps
    print(f"1. federation overhead ({steps} optimizer steps, batch {cfg.train.batch_size}, rank 8, "
          f"{torch.get_num_threads()} threads)")
    print(f"   bare PyTorch loop, steps only             {bare:8.1f} s")
    print(f"   federated, train + aggregate              {train_and_aggregate:8.1f} s   ratio "
          f"{train_and_aggregate / bare:.3f}")
    print(f"   bare loop + model load + one evaluation   {bare_whole:8.1f} s")
    print(f"   federated whole run, evaluated at the end {end_only:8.1f} s   ratio {end_only / bare_whole:.3f}")
    print(f"   federated whole run, evaluated per round  {every_round:8.1f} s   ratio {every_round / bare_whole:.3f}"
          f"   ({args.rounds} evaluations instead of 1)")

    ours = steps / bare
    theirs = trainer_steps_per_s(exp, tasks[0].client, steps, 8)
    frozen, trainable = linear_weights(exp.model.peft)
    flops_per_token = 4 * frozen + 6 * trainable
    achieved = flops_per_token * tokens / bare
    peak = matmul_flops()
    print("2. local-training throughput")
    print(f"   fedrank loop                      {ours:8.2f} steps/s")
    print(f"   HF Trainer + PEFT                 {theirs:8.2f} steps/s   fedrank/Trainer {ours / theirs:.2f}")
    print(f"   achieved {achieved / 1e9:.1f} GFLOP/s vs measured fp32 matmul {peak / 1e9:.1f} GFLOP/s "
          f"({100 * achieved / peak:.0f}%; {tokens / steps:.0f} tokens/step)")


if __name__ == "__main__":
    main()

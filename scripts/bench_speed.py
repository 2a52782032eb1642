"""Step time and peak memory of every method against `peft`, side by side, at one model shape.

    python scripts/bench_speed.py                                  # MiniLM-L6, an SST-2 batch of 32 x 64 tokens
    python scripts/bench_speed.py --shape deberta-v3-base          # DeBERTaV3-base (random weights), 32 x 128
    python scripts/bench_speed.py --shape deberta-v3-base --device cuda --precision bf16 --steps 50
    python scripts/bench_speed.py --tiny                           # a seconds-long smoke run (used by the tests)

A step is what training repeats: forward (with the method's regulariser) under the precision's autocast,
backward, optimizer step, the method's allocation (our allocator / peft's `update_and_allocate`, every step)
and zero_grad. The AdaLoRA variants follow a realistic schedule: importance averages every step, a new mask
every `--delta-t` steps (the paper's GLUE settings use 10 to 100), so timed steps mix both as training does.
Every variant starts from the same weights and the same initial rank. `--shape deberta-v3-base` builds
microsoft/deberta-v3-base's configuration locally (12 layers, hidden 768, FFN 3072, 72 targets, vocabulary
128,100) with random weights and random tokens: no download, same shapes and kernels. Times are medians over
`--steps` steps after `--warmup` steps, measured in one process with the variants interleaved round by round, so
that machine load affects them alike. Peak memory is what one step adds on top of the built model: on CUDA
`max_memory_allocated`; on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) of a
child process that runs only that variant, since a process's freed memory is not handed back reliably.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adalora_cli import devices, models  # noqa: E402
from adalora_cli.inject import find_targets, inject_adapters, mark_trainable  # noqa: E402
from adalora_cli.methods import get_method  # noqa: E402
from adalora_cli.tasks import get_task  # noqa: E402

VARIANTS = ["head-only", "lora", "adalora", "prilora", "dylora", "full", "peft-lora", "peft-adalora"]
PEFT_TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)(_proj)?|attention\.output\.dense|"
                r"intermediate\.dense|output\.dense)")
# (ours, reference, target ratio of step times) on a GPU and on a CPU
TARGETS = {
    "cuda": [("adalora", "lora", 1.05), ("lora", "peft-lora", 1.0), ("adalora", "peft-adalora", 0.6),
             ("lora", "full", 1.0)],
    "cpu": [("adalora", "lora", 1.03), ("lora", "peft-lora", 1.0), ("adalora", "peft-adalora", 1.0)],
}
TOTAL_STEPS = 10_000  # the schedule the allocators are built for; the timed steps lie in AdaLoRA's decay phase


def deberta_v3_base_config(num_labels: int = 2):
    """microsoft/deberta-v3-base's config.json, built locally."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128_100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", max_position_embeddings=512, relative_attention=True, position_buckets=256,
        norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7,
        max_relative_positions=-1, position_biased_input=False, type_vocab_size=0, pooler_hidden_size=768,
        num_labels=num_labels)


def load_batch(args) -> dict[str, torch.Tensor]:
    """The first `batch_size` SST-2 training sentences padded to `seq_len` tokens, or (DeBERTa shape) random
    tokens filling every position."""
    if args.shape == "deberta-v3-base":
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 128_000, (args.batch_size, args.seq_len), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, 2, (args.batch_size,), generator=generator)}
        return {k: v.to(args.device) for k, v in batch.items()}
    tokenizer = models.load_tokenizer("minilm-l6" if args.tiny else args.model)
    task = get_task("sst2")
    raw = task.load("train", Path(args.data_dir), {}).select(range(args.batch_size))
    batch = tokenizer(list(raw["sentence"]), padding="max_length", truncation=True, max_length=args.seq_len,
                      return_tensors="pt")
    batch["labels"] = torch.tensor(list(raw["label"]))
    return {k: v.to(args.device) for k, v in batch.items()}


def base_model(args):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    if args.tiny:
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            num_labels=2)
        return AutoModelForSequenceClassification.from_config(config), {"classifier.weight", "classifier.bias"}
    if args.shape == "deberta-v3-base":
        model = AutoModelForSequenceClassification.from_config(deberta_v3_base_config())
        return model, {n for n, _ in model.named_parameters() if n.startswith(("classifier.", "pooler."))}
    config = models.load_config(args.model, 2)
    return models.load_model(args.model, config, "AutoModelForSequenceClassification")


def adalora_schedule(args) -> dict:
    """Importance every step and a mask every delta_t steps: the decay phase of a long run."""
    return {"t_init": 0, "t_final": TOTAL_STEPS // 5, "delta_t": args.delta_t}


def ours(name: str, args) -> tuple[torch.nn.Module, Callable[[int], torch.Tensor | None], Callable[[int], None]]:
    """Our method `name` at initial rank `args.rank`: (model, regulariser, allocation)."""
    model, head = base_model(args)
    method = get_method(name)
    settings = {
        "lora": {"r": args.rank},
        "adalora": {"init_r": args.rank, "target_r": max(1, 2 * args.rank // 3), **adalora_schedule(args)},
        "prilora": {"r_first": args.rank / 2, "r_last": 1.5 * args.rank},
        "dylora": {"r_max": args.rank},
        "full": {},
    }[name]
    cfg = method.config_cls(**settings)
    layers, allocator, regulariser = {}, None, None
    if method.adapter:
        targets = find_targets(model, model.config.model_type)
        plan = method.plan(targets, None, cfg)
        layers = inject_adapters(model, method, cfg, plan)
    mark_trainable(model, method, head)
    model.to(args.device)
    if method.make_allocator is not None:
        allocator = method.make_allocator(layers, cfg, plan, TOTAL_STEPS)
    if method.regulariser is not None:
        regulariser = method.regulariser(list(layers.values()), cfg)
    return model, regulariser, (allocator.after_optimizer_step if allocator else None)


def head_only(args):
    model, head = base_model(args)
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
    return model.to(args.device), None, None


def peft_variant(kind: str, args):
    import peft

    model, _ = base_model(args)
    common = dict(task_type="SEQ_CLS", target_modules=PEFT_TARGETS, lora_alpha=16)
    if kind == "lora":
        config = peft.LoraConfig(r=args.rank, **common)
    else:
        schedule = adalora_schedule(args)
        config = peft.AdaLoraConfig(init_r=args.rank, target_r=max(1, 2 * args.rank // 3), tinit=schedule["t_init"],
                                    tfinal=schedule["t_final"], deltaT=schedule["delta_t"], orth_reg_weight=0.1,
                                    total_step=TOTAL_STEPS, **common)
    model = peft.get_peft_model(model, config).to(args.device)
    allocate = (lambda t: model.base_model.update_and_allocate(t)) if kind == "adalora" else None
    return model, None, allocate  # peft's AdaLoRA adds its regulariser to the loss inside forward


def build(name: str, args):
    if name == "head-only":
        return head_only(args)
    if name.startswith("peft-"):
        return peft_variant(name.removeprefix("peft-"), args)
    return ours(name, args)


class Runner:
    """One variant's model and optimizer, stepping on the shared batch."""

    def __init__(self, name, args, batch):
        torch.manual_seed(0)
        self.name, self.batch, self.device = name, batch, args.device
        self.precision = args.precision
        self.model, self.regulariser, self.allocate = build(name, args)
        self.model.train()
        lr = 5e-5 if name == "full" else 1e-3
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.t = 0
        self.times: list[float] = []
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self, timed: bool) -> None:
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        with devices.autocast(self.precision, torch.device(self.device)):
            loss = self.model(**self.batch).loss
            if self.regulariser is not None:
                loss = loss + self.regulariser()
        loss.backward()
        self.optimizer.step()
        if self.allocate is not None:
            self.allocate(self.t)
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        if timed:
            self.times.append(time.perf_counter() - start)
        self.t += 1


def vm_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_memory_here(name, args, batch) -> float:
    """MiB one step adds on top of the built model, measured in this process (CUDA, or a CPU child)."""
    runner = Runner(name, args, batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            runner.step(timed=False)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    base = vm_kb("VmRSS")
    for _ in range(3):
        runner.step(timed=False)
    return (vm_kb("VmHWM") - base) / 1024


def measure_memory_cpu(name, argv) -> float:
    """Run one variant in a child process (fresh heap) and read the step's peak RSS increase."""
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", name], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` minus `option VALUE` / `option=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--shape", choices=["model", "deberta-v3-base"], default="model",
                        help="deberta-v3-base: that model's configuration with random weights (no download)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the forward")
    parser.add_argument("--delta-t", type=int, default=10, help="AdaLoRA: steps between masks")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, help="tokens per example (default 64; 128 for deberta-v3-base)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, for a smoke test")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raw_argv = list(argv if argv is not None else sys.argv[1:])
    args.seq_len = args.seq_len or (128 if args.shape == "deberta-v3-base" else 64)
    batch = load_batch(args)
    if args.memory_of:
        print(measure_memory_here(args.memory_of, args, batch))
        return {}

    runners = [Runner(name, args, batch) for name in args.variants]
    for _ in range(args.warmup):
        for runner in runners:
            runner.step(timed=False)
    for _ in range(args.steps):  # round-robin: load changes hit every variant alike
        for runner in runners:
            runner.step(timed=True)
    results = {}
    for runner in runners:
        results[runner.name] = {"ms": 1000 * statistics.median(runner.times), "trainable": runner.trainable}
    del runners
    for name in args.variants:
        if args.device.startswith("cuda"):
            results[name]["peak_mib"] = measure_memory_here(name, args, batch)
        else:
            results[name]["peak_mib"] = measure_memory_cpu(name, without_option(raw_argv, "--json"))
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    return results


def report(results: dict, args) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} threads)"
    shape = "tiny BERT" if args.tiny else ("DeBERTaV3-base shape" if args.shape == "deberta-v3-base" else args.model)
    print(f"\n{shape}, batch {args.batch_size} x {args.seq_len} tokens, initial rank {args.rank}, {args.precision}, "
          f"{device}, median of {args.steps} steps after {args.warmup}")
    print(f"{'variant':14s} {'ms/step':>9s} {'peak MiB':>9s} {'trainable':>11s}")
    for name, r in results.items():
        print(f"{name:14s} {r['ms']:9.1f} {r['peak_mib']:9.1f} {r['trainable']:11,d}")
    print()
    for ours_name, theirs, target in TARGETS["cuda" if args.device.startswith("cuda") else "cpu"]:
        if ours_name in results and theirs in results:
            ratio = results[ours_name]["ms"] / results[theirs]["ms"]
            memory = results[ours_name]["peak_mib"] / max(results[theirs]["peak_mib"], 1e-9)
            verdict = "ok" if ratio <= target else "MISSED"
            print(f"{ours_name} / {theirs}: time {ratio:.3f} (target <= {target}: {verdict}), memory {memory:.3f}")


if __name__ == "__main__":
    main()

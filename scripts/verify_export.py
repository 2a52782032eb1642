"""Check the `peft` and `merged` exports of a run against the run itself, with the real clients.

    python scripts/verify_export.py RUN_DIR [--data-dir DIR] [--first 64] [--keep DIR]

Exports RUN_DIR both ways into a temporary folder, then compares logits over the task's first evaluation set:
- ours:   the run reloaded by `adalora_cli.rundir.load_run` (what `adalora eval` evaluates);
- peft:   `peft.PeftModel.from_pretrained(AutoModelFor*.from_pretrained(BASE, num_labels=N, dtype=float32), DIR)`,
          and the rank PEFT built for every module against rank_pattern.json;
- merged: `AutoModelFor*.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` in a child Python
          process that imports neither adalora_cli nor peft.
Prints the largest |logit difference| on the first N examples and on the whole set, and the accuracy of each.
Exits 1 when a difference exceeds 1e-4 or a rank differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4

# Runs in a fresh interpreter: only Transformers and torch, the way a user of the merged model would load it.
MERGED_CHILD = r"""
import json, sys
import numpy as np, torch, transformers
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
folder, texts_file, out_file, max_length, batch_size = sys.argv[1:6]
texts = json.load(open(texts_file))
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
assert "adalora_cli" not in sys.modules and "peft" not in sys.modules
logits = []
with torch.no_grad():
    for start in range(0, len(texts), int(batch_size)):
        rows = texts[start:start + int(batch_size)]
        columns = [list(c) for c in zip(*rows)]
        batch = tokenizer(*columns, truncation=True, max_length=int(max_length), padding=True, return_tensors="pt")
        logits.append(model(**batch).logits.float().numpy())
np.save(out_file, np.concatenate(logits))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data-dir", help="GLUE folder, if the run's recorded one is not reachable from here")
    parser.add_argument("--first", type=int, default=64, help="size of the first slice compared (default 64)")
    parser.add_argument("--keep", type=Path, help="write the exports here instead of a temporary folder")
    args = parser.parse_args()

    import torch
    import transformers
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from adalora_cli import models, rundir
    from adalora_cli.export import run_export
    from adalora_cli.inference import model_outputs
    from adalora_cli.rundata import max_length, read_data

    import datasets

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg, saved, ours, tokenizer, *_ = rundir.load_run(args.run, args.data_dir)
    cfg.max_eval_samples = None  # the whole evaluation set
    task, _, evals = read_data(cfg, training=False)
    raw = evals[0].raw
    length = max_length(cfg, task, tokenizer)
    features = task.preprocess(raw, tokenizer, length, training=False)
    labels = np.asarray(raw["label"])
    first, second = task.spec.keys
    texts = [[t] for t in raw[first]] if second is None else [list(p) for p in zip(raw[first], raw[second])]

    logits = {"ours": model_outputs(ours, features, tokenizer, cfg.eval_batch_size)[0]}
    pattern = json.loads((args.run / rundir.RANK_PATTERN).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        if saved.method != "full":
            peft_dir = run_export(args.run, "peft", folder / "peft", overwrite=True)
            base = models.resolve_model(cfg.model)
            auto = getattr(transformers, task.auto_model)
            # float32 as training loaded it: a float16 checkpoint (microsoft/deberta-v3-base) otherwise loads in float16
            base_model = auto.from_pretrained(base, num_labels=task.num_labels, dtype=torch.float32)
            peft_model = PeftModel.from_pretrained(base_model, peft_dir)
            logits["peft"] = model_outputs(peft_model.eval(), features, tokenizer, cfg.eval_batch_size)[0]
            peft_ranks = {name.removeprefix("base_model.model."): module.r["default"]
                          for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
            expected = {name: r for name, r in pattern.items() if r > 0}
            print(f"peft ranks equal rank_pattern.json: {peft_ranks == expected} "
                  f"({len(peft_ranks)} modules, total rank {sum(peft_ranks.values())}, "
                  f"{sum(1 for r in pattern.values() if r == 0)} pruned to 0)")
            ranks_ok = peft_ranks == expected
        else:
            ranks_ok = True
        merged_dir = run_export(args.run, "merged", folder / "merged", overwrite=True)
        (Path(scratch) / "texts.json").write_text(json.dumps(texts))
        subprocess.run([sys.executable, "-c", MERGED_CHILD, str(merged_dir), str(Path(scratch) / "texts.json"),
                        str(Path(scratch) / "merged.npy"), str(length), str(cfg.eval_batch_size)], check=True)
        logits["merged"] = np.load(Path(scratch) / "merged.npy")

    ok = ranks_ok
    print(f"{task.name} {task.eval_splits[0].split}: {len(labels)} examples")
    print(f"ours   accuracy {np.mean(logits['ours'].argmax(-1) == labels):.6f}")
    for name in ("peft", "merged"):
        if name not in logits:
            continue
        head = np.abs(logits[name][:args.first] - logits["ours"][:args.first]).max()
        whole = np.abs(logits[name] - logits["ours"]).max()
        accuracy = np.mean(logits[name].argmax(-1) == labels)
        same = bool((logits[name].argmax(-1) == logits["ours"].argmax(-1)).all())
        print(f"{name:6s} accuracy {accuracy:.6f}   max |logit diff| first {args.first}: {head:.2e}, "
              f"all: {whole:.2e}   same predictions: {same}")
        ok = ok and whole <= TOLERANCE
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

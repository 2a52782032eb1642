"""The user's own data, made from the real GLUE files in the shapes users bring: other column names, string labels,
CSV / JSONL, three classes from binned scores, regression targets.

    python tests/own_data.py GLUE_DIR OUT_DIR      # writes every file below into OUT_DIR
    python tests/own_data.py --question-generation SQUAD_JSON OUT_DIR [--causal]

- reviews-{train,dev}.jsonl: SST-2 sentences as {"review": ..., "sentiment": "negative" | "positive"}
- similarity-{train,dev}.csv: STS-B pairs as first,second,similarity with similarity low (< 2), mid, high (>= 3.5)
- relatedness-{train,dev}.csv: STS-B pairs as premise,hypothesis,relatedness (the 0-5 score)
- qg-{train,dev}.jsonl (with --question-generation): questions of SQuAD articles 1-38 / 39-48 as
  {"source": "answer: ... context: ...", "target": question} (with --causal: prompt / completion); and
  denoise.jsonl, passages of the training articles to reconstruct (a pretraining task; see write_denoising)
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path


def glue_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def write_reviews(glue: Path, out: Path, split: str, limit: int | None = None) -> Path:
    names = {"0": "negative", "1": "positive"}
    rows = glue_rows(glue / "SST-2" / f"{split}.tsv")[:limit]
    path = out / f"reviews-{split}.jsonl"
    path.write_text("".join(json.dumps({"review": r["sentence"], "sentiment": names[r["label"]]}) + "\n" for r in rows))
    return path


def similarity_class(score: float) -> str:
    return "low" if score < 2.0 else "high" if score >= 3.5 else "mid"


def write_sts(glue: Path, out: Path, split: str, kind: str, limit: int | None = None) -> Path:
    """STS-B pairs as CSV: kind "similarity" (three classes) or "relatedness" (the score)."""
    rows = glue_rows(glue / "STS-B" / f"{split}.tsv")[:limit]
    path = out / f"{kind}-{split}.csv"
    columns = ["first", "second", "similarity"] if kind == "similarity" else ["premise", "hypothesis", "relatedness"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            score = float(r["score"])
            writer.writerow([r["sentence1"], r["sentence2"], similarity_class(score) if kind == "similarity" else score])
    return path


def write_all(glue: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [write_reviews(glue, out, "train"), write_reviews(glue, out, "dev"),
            *(write_sts(glue, out, split, kind) for kind in ("similarity", "relatedness") for split in ("train", "dev"))]


def squad_questions(path: Path) -> list[dict[str, str]]:
    """Every question of an official SQuAD file with its article title, context and first answer."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    return [{"title": article["title"], "context": paragraph["context"], "answer": qa["answers"][0]["text"],
             "question": qa["question"]}
            for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"] if qa["answers"]]


def write_question_generation(squad_file: Path, out: Path, name: str, articles: slice, kind: str = "seq2seq",
                              limit: int | None = None, context_chars: int = 400) -> Path:
    """Question generation from SQuAD as JSONL: the answer and its context (cut to `context_chars` around the
    answer) as `source` and the question as `target` (kind "seq2seq"), or as `prompt` / `completion` ("causal")."""
    titles = list(dict.fromkeys(q["title"] for q in squad_questions(squad_file)))[articles]
    rows = []
    for q in squad_questions(squad_file):
        if q["title"] not in titles:
            continue
        at = max(0, q["context"].find(q["answer"]) - context_chars // 2)
        source = f"answer: {q['answer']} context: {q['context'][at:at + context_chars]}"
        rows.append({"source": source, "target": q["question"]} if kind == "seq2seq"
                    else {"prompt": source, "completion": q["question"]})
    path = Path(out) / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:limit]))
    return path


def write_denoising(question_generation_train: Path, out: Path, drop: float = 0.15, seed: int = 0) -> Path:
    """A pretraining task for a tiny generator made from the training articles only: windows of 60 words of each
    context (every 20 words) with `drop` of the words removed as `source`, the window's first 25 words as `target`.
    A model trained on it knows the articles' language but has never seen a question."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in Path(question_generation_train).read_text().splitlines()]
    contexts = sorted({row["source"].split(" context: ", 1)[1] for row in rows})
    examples = []
    for context in contexts:
        words = context.split()
        for start in range(0, max(1, len(words) - 40), 20):
            window = words[start:start + 60]
            examples.append({"source": " ".join(w for w in window if rng.random() > drop),
                             "target": " ".join(window[:25])})
    rng.shuffle(examples)
    path = Path(out) / "denoise.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


if __name__ == "__main__":
    if sys.argv[1] == "--question-generation":
        kind = "causal" if "--causal" in sys.argv else "seq2seq"
        squad, out = Path(sys.argv[2]), Path(sys.argv[3])
        out.mkdir(parents=True, exist_ok=True)
        for name, articles in (("qg-train", slice(0, 38)), ("qg-dev", slice(38, 48))):
            print(write_question_generation(squad, out, name, articles, kind))
        if kind == "seq2seq":
            print(write_denoising(out / "qg-train.jsonl", out))
    else:
        for written in write_all(Path(sys.argv[1]), Path(sys.argv[2])):
            print(written)

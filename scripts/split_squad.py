"""Split an official-format SQuAD JSON file by article into a training part and a held-out part.

Only the SQuAD dev sets are on these machines, so a model is trained on some of the dev articles and
evaluated on the others. Articles are never shared between the two parts (a question's context, and the
other questions on it, stay on one side), and the split is deterministic: the first N articles, in file
order, go to training, the rest are held out.

    python scripts/split_squad.py ../shared/data/squad/dev-v1.1.json --train-articles 38 \
        --out-train /tmp/squad/train-38.json --out-eval /tmp/squad/eval-10.json

Both outputs keep the input's `version` and the articles unchanged. Write them outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def split_articles(data: dict, train_articles: int) -> tuple[dict, dict]:
    """(first `train_articles` articles, the rest), each a SQuAD document with the input's version."""
    articles = data["data"]
    if not 0 < train_articles < len(articles):
        raise ValueError(f"--train-articles must be between 1 and {len(articles) - 1} (the file has {len(articles)} articles)")
    version = data.get("version", "")
    return ({"version": version, "data": articles[:train_articles]},
            {"version": version, "data": articles[train_articles:]})


def count_questions(data: dict) -> int:
    return sum(len(p["qas"]) for article in data["data"] for p in article["paragraphs"])


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename: an interrupted run leaves no half-written split."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="official-format SQuAD JSON (e.g. dev-v1.1.json)")
    parser.add_argument("--train-articles", type=int, required=True, help="articles (from the start) for training")
    parser.add_argument("--out-train", type=Path, required=True)
    parser.add_argument("--out-eval", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.input.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"{args.input} has no 'data' list of articles; it is not an official-format SQuAD file")
        train, held_out = split_articles(data, args.train_articles)
        counts = [count_questions(train), count_questions(held_out)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"split_squad: error: {exc}", file=sys.stderr)
        return 2
    write_json(args.out_train, train)
    write_json(args.out_eval, held_out)
    print(f"{args.out_train}: {len(train['data'])} articles, {counts[0]} questions")
    print(f"{args.out_eval}: {len(held_out['data'])} articles, {counts[1]} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())

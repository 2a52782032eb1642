"""Generation on non-Latin own data, end to end: a tiny BART with a byte-level BPE trained here learns a small
Russian and a small Chinese data-to-text task (templates over names and cities). ROUGE and chrF are scored on
every script (not 0 as with rouge-score's ASCII tokenizer), and `predict` -> the predictions as references ->
`eval --input` scores rougeL 100: the metrics see identical text as identical in any script, and eval and predict
feed and decode the same way."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from adalora_cli import rundir
from adalora_cli.cli import app
from conftest import train_tiny

runner = CliRunner()

LANGUAGES = {
    "ru": {
        "names": ["Анна", "Борис", "Вера", "Глеб", "Дарья", "Егор", "Жанна", "Зоя", "Игорь", "Кира"],
        "cities": ["Москве", "Казани", "Самаре", "Перми", "Твери", "Омске", "Туле", "Уфе"],
        "source": "имя: {name}; город: {city}",
        "target": "{name} живёт в {city}. Это красивый город.",
    },
    "zh": {
        "names": ["小明", "小红", "王芳", "李伟", "张敏", "刘洋", "陈静", "杨帆", "赵磊", "周婷"],
        "cities": ["北京", "上海", "广州", "深圳", "成都", "杭州", "南京", "武汉"],
        "source": "名字：{name}；城市：{city}",
        "target": "{name}住在{city}。那是一个美丽的城市。",
    },
}


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def language_data(folder, language: str):
    spec = LANGUAGES[language]
    pairs = [(n, c) for n in spec["names"] for c in spec["cities"]]
    random.Random(0).shuffle(pairs)
    rows = [{"source": spec["source"].format(name=n, city=c), "target": spec["target"].format(name=n, city=c)}
            for n, c in pairs]
    train, dev = folder / f"{language}-train.jsonl", folder / f"{language}-dev.jsonl"
    write_rows(train, rows[:64])
    write_rows(dev, rows[64:80])
    return train, dev, [r["source"] + " " + r["target"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("language", ["ru", "zh"])
def test_non_latin_seq2seq_scores_and_predict_then_eval_input(tmp_path, language):
    from model_folders import generator_folder

    train, dev, sentences = language_data(tmp_path, language)
    model = generator_folder("bart", tmp_path / "bart", sentences * 4)
    run = tmp_path / "run"
    train_tiny("full", "--task", "seq2seq", "--model", model, "--train-file", train, "--validation-file", dev,
               "--output-dir", run, "--max-steps", "400", "--batch-size", "16", "--lr", "3e-3",
               "--set", "max_new_tokens=24", "--set", "min_new_tokens=2")
    scores = json.loads((run / rundir.METRICS).read_text())["eval"]
    for name in ("rouge1", "rougeL", "rougeLsum", "chrf", "bleu"):
        assert scores[name] > 0, (name, scores)

    predicted = tmp_path / "predicted.jsonl"
    result = runner.invoke(app, ["predict", str(run), "--input", str(dev), "--output", str(predicted)])
    assert result.exit_code == 0, result.stderr
    texts = [json.loads(line)["text"] for line in predicted.read_text(encoding="utf-8").splitlines()]
    assert all(texts)
    sources = [json.loads(line)["source"] for line in dev.read_text(encoding="utf-8").splitlines()]
    as_references = tmp_path / "as-references.jsonl"
    write_rows(as_references, [{"source": s, "target": t} for s, t in zip(sources, texts)])
    result = runner.invoke(app, ["eval", str(run), "--input", str(as_references)])
    assert result.exit_code == 0, result.stderr
    again = json.loads((run / "eval-as-references.json").read_text())["eval"]
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum", "chrf", "bleu"):
        assert again[name] == pytest.approx(100.0), (name, again)

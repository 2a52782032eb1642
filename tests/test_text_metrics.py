"""Text metrics of the generation tasks on every script (adalora_cli/tasks/text_metrics.py): ROUGE with a Unicode
tokenizer (CJK and Thai per character, other scripts per word, Porter stemming for English only), BLEU with a
tokenisation chosen by script, chrF; ROUGE-Lsum's sentence splitter. Reference values are computed by hand in the
comments, or (English) by rouge-score's own default scorer on real SQuAD text."""

from __future__ import annotations

import json
import logging

import pytest

from adalora_cli.tasks import get_task
from adalora_cli.tasks import text_metrics as tm
from conftest import SQUAD_DIR

ROUGE = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
RUSSIAN = ["Кошка сидит на ковре.", "Сегодня в Москве идёт сильный снег, и дороги закрыты.",
           "Мы читали книгу весь вечер. Потом легли спать."]
CHINESE = ["猫坐在垫子上。", "今天北京下了很大的雪，道路都关闭了。", "我们整个晚上都在读书。然后去睡觉了。"]
OTHER_SCRIPTS = {
    "japanese": ["猫がマットの上に座っている。", "今日は東京で大雪が降り、道路が閉鎖された。"],
    "korean": ["고양이가 매트 위에 앉아 있다.", "오늘 서울에 많은 눈이 내려서 도로가 폐쇄되었다."],
    "thai": ["แมวนั่งอยู่บนเสื่อ", "วันนี้หิมะตกหนักในกรุงเทพ"],
    "arabic": ["القطة تجلس على السجادة الحمراء.", "تساقطت الثلوج بغزارة في المدينة اليوم."],
    "hindi": ["बिल्ली चटाई पर बैठी है।", "आज दिल्ली में बहुत बर्फ गिरी और सड़कें बंद हो गईं।"],
    "greek": ["Η γάτα κάθεται στο χαλί.", "Σήμερα χιόνισε πολύ στην Αθήνα και οι δρόμοι έκλεισαν."],
}


def all_metrics(hypotheses, references):
    return {**tm.rouge(hypotheses, references, ROUGE), "bleu": tm.bleu(hypotheses, references),
            "chrf": tm.chrf(hypotheses, references)}


# -- identical texts score 100 on every script (the old code gave 0) --------------------------------------------

@pytest.mark.parametrize("texts", [RUSSIAN, CHINESE, *OTHER_SCRIPTS.values()],
                         ids=["russian", "chinese", *OTHER_SCRIPTS])
def test_identical_texts_score_100(texts):
    scores = all_metrics(texts, [[t] for t in texts])
    assert scores == pytest.approx({name: 100.0 for name in ROUGE + ["bleu", "chrf"]})


@pytest.mark.parametrize("task_name, texts", [("seq2seq", RUSSIAN), ("causal-lm", CHINESE)])
def test_the_main_metric_follows_non_english_predictions(task_name, texts):
    """The issue's symptom: rougeL (what --keep-best and --early-stopping follow) was 0 for any prediction."""
    columns = {"seq2seq": ("source", "target"), "causal-lm": ("prompt", "completion")}[task_name]
    task = get_task(task_name).with_settings(**{f"{columns[0]}_column": columns[0],
                                                f"{columns[1]}_column": columns[1]})
    raw = {columns[0]: [f"source {i}" for i in range(len(texts))], columns[1]: texts}
    perfect = task.compute_metrics({"texts": list(texts)}, raw, None)
    assert task.main_metric == "rougeL" and perfect["rougeL"] == pytest.approx(100.0)
    assert {name: perfect[name] for name in ROUGE + ["bleu", "chrf"]} == pytest.approx(
        {name: 100.0 for name in ROUGE + ["bleu", "chrf"]})
    worse = task.compute_metrics({"texts": [texts[0]] * len(texts)}, raw, None)
    assert 0 < worse[task.main_metric] < perfect[task.main_metric]


# -- hand-computed partial overlaps -----------------------------------------------------------------------------

def test_russian_partial_overlap_by_words():
    # reference кошка сидит на ковре, hypothesis кошка лежит на ковре: 4 words each
    # ROUGE-1: 3 of 4 words match -> P = R = F = 3/4; ROUGE-2: bigrams (кошка сидит)(сидит на)(на ковре) against
    # (кошка лежит)(лежит на)(на ковре): 1 of 3; ROUGE-L: the longest common subsequence кошка на ковре, 3 of 4.
    # Case does not matter (КОШКА = кошка); no stemming for Russian, so "ковре" does not match "ковёр".
    scores = tm.rouge(["КОШКА лежит на ковре"], [["Кошка сидит на ковре."]], ROUGE)
    assert scores == pytest.approx({"rouge1": 75.0, "rouge2": 100 / 3, "rougeL": 75.0, "rougeLsum": 75.0})
    assert tm.rouge(["кошка на ковёр"], [["кошка на ковре"]], ["rouge1"])["rouge1"] == pytest.approx(200 / 3)


def test_chinese_partial_overlap_by_characters():
    # 我们喜欢猫 against 我们喜欢狗, per character: ROUGE-1 4 of 5; ROUGE-2 (我们)(们喜)(喜欢)(欢猫): 3 of 4;
    # ROUGE-L 我们喜欢, 4 of 5. BLEU (tokenize zh, one token per character, equal lengths so no brevity penalty):
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, their geometric mean.
    hypothesis, reference = ["我们喜欢狗"], [["我们喜欢猫"]]
    assert tm.rouge(hypothesis, reference, ROUGE) == pytest.approx(
        {"rouge1": 80.0, "rouge2": 75.0, "rougeL": 80.0, "rougeLsum": 80.0})
    assert tm.bleu(hypothesis, reference) == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_chrf_by_hand():
    # да against до: character 1-grams {д, а} / {д, о}: 1 match, P = R = 1/2, F(beta=2) = 1/2; the 2-grams да / до
    # do not match: F = 0; no 3- to 6-grams. chrF averages F over the orders that exist: (1/2 + 0) / 2 = 25.
    assert tm.chrf(["да"], [["до"]]) == pytest.approx(25.0)
    # spaces do not count: the same characters, split differently, score 100
    assert tm.chrf(["Кош ка"], [["Кошка"]]) == pytest.approx(100.0)


# -- mixed scripts ----------------------------------------------------------------------------------------------

def test_mixed_scripts_tokenise_per_word_and_per_character():
    tokenizer = tm.UnicodeTokenizer(stem=False)
    assert tokenizer.tokenize("Цена iPhone 15 — 999 долларов, 价格很贵。Ελλάδα δ'") == [
        "цена", "iphone", "15", "999", "долларов", "价", "格", "很", "贵", "ελλάδα", "δ"]
    # Japanese: kanji, hiragana and katakana (with its long-vowel mark) one token each; Hangul and Devanagari
    # (with their combining vowel signs) and Arabic per word; Thai per character with its marks
    assert tokenizer.tokenize("東京でコーヒーを飲んだ") == list("東京でコーヒーを飲んだ")
    assert tokenizer.tokenize("한국어 문장입니다") == ["한국어", "문장입니다"]
    assert tokenizer.tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert tokenizer.tokenize("مرحبا بالعالم") == ["مرحبا", "بالعالم"]
    assert tokenizer.tokenize("ที่นี่") == ["ที่", "นี่"]
    # NFKC: full-width Latin and digits (CJK text, SentencePiece output) and decomposed accents match their
    # usual forms
    assert tokenizer.tokenize("ＧＰＴ－４は２０２４年") == tokenizer.tokenize("GPT-4は2024年") == [
        "gpt", "4", "は", "2024", "年"]
    assert tokenizer.tokenize("Beyonce\u0301") == tokenizer.tokenize("Beyoncé") == ["beyoncé"]
    # a Russian summary that keeps the English words and gets the Chinese name half right:
    # reference tokens: компания, apple, 苹, 果, выпустила, iphone (6); hypothesis: компания, apple, 苹, 树,
    # выпустила, iphone, 16 (7); 5 match: P = 5/7, R = 5/6, F = 2PR/(P+R) = 10/13
    scores = tm.rouge(["Компания Apple (苹树) выпустила iPhone 16"], [["Компания Apple (苹果) выпустила iPhone"]],
                      ["rouge1"])
    assert scores["rouge1"] == pytest.approx(100 * 10 / 13)


# -- empty texts and several references -------------------------------------------------------------------------

def test_an_empty_hypothesis_scores_0_without_error():
    scores = all_metrics(["", "Кошка сидит на ковре."], [["Собака спит."], ["Кошка сидит на ковре."]])
    assert scores["rouge1"] == pytest.approx(50.0) and scores["rougeLsum"] == pytest.approx(50.0)
    assert all_metrics([""], [["猫坐在垫子上。"]]) == {name: 0.0 for name in ROUGE + ["bleu", "chrf"]}
    assert all_metrics([], []) == {name: 0.0 for name in ROUGE + ["bleu", "chrf"]}


def test_several_references():
    hypotheses = ["кошка сидит на ковре", "猫坐在垫子上"]
    references = [["собака спит в будке", "кошка сидит на ковре"], ["猫坐在垫子上"]]
    # ROUGE: each hypothesis against its best reference; BLEU and chrF: all references of the source count
    assert all_metrics(hypotheses, references) == pytest.approx({name: 100.0 for name in ROUGE + ["bleu", "chrf"]})
    # best of the references, per variant: against собака спит ROUGE-1 F 1/2, ROUGE-2 0; against
    # кошка спит на полу ROUGE-1 P 2/2, R 2/4, F 2/3; ROUGE-2 (кошка спит) P 1/1, R 1/3, F 1/2
    scores = tm.rouge(["кошка спит"], [["собака спит", "кошка спит на полу"]], ["rouge1", "rouge2"])
    assert scores == pytest.approx({"rouge1": 100 * 2 / 3, "rouge2": 50.0})


def test_a_repeated_source_is_scored_once_against_all_its_references():
    task = get_task("seq2seq").with_settings(source_column="source", target_column="target")
    raw = {"source": ["a", "a", "b"], "target": ["собака спит", "кошка сидит на ковре", "猫坐在垫子上"]}
    scores = task.compute_metrics({"texts": ["кошка сидит на ковре", "ignored", "猫坐在垫子上"]}, raw, None)
    assert scores["rougeL"] == pytest.approx(100.0)
    assert {name: scores[name] for name in ROUGE + ["bleu", "chrf"]} == pytest.approx(
        {name: 100.0 for name in ROUGE + ["bleu", "chrf"]})


# -- ROUGE-Lsum's sentences -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, sentences", [
    ("Mr. Smith met Dr. Jones at 5 p.m. on Friday. They talked until 11 a.m. the next day.",
     ["Mr. Smith met Dr. Jones at 5 p.m. on Friday.", "They talked until 11 a.m. the next day."]),
    ("Mrs. Brown moved to the U.S. in 1990. Cats, dogs, etc. are pets, e.g. Rex, i.e. a dog! Really?",
     ["Mrs. Brown moved to the U.S. in 1990.", "Cats, dogs, etc. are pets, e.g. Rex, i.e. a dog!", "Really?"]),
    ("Price: 3.5 dollars. He said \"stop.\" Then he left.",
     ["Price: 3.5 dollars.", "He said \"stop.\"", "Then he left."]),
    ("猫坐在垫子上。狗在外面！你好吗？好", ["猫坐在垫子上。", "狗在外面！", "你好吗？", "好"]),
    ("「猫です。」犬です。", ["「猫です。」", "犬です。"]),
    ("Кошка сидит. Собака лежит.", ["Кошка сидит.", "Собака лежит."]),
    ("J. K. Rowling wrote it on Jan. 5. Then what?", ["J. K. Rowling wrote it on Jan. 5.", "Then what?"]),
    ("यह एक वाक्य है। यह दूसरा है।", ["यह एक वाक्य है।", "यह दूसरा है।"]),
    ("هل أنت بخير؟ نعم.", ["هل أنت بخير؟", "نعم."]),
    ("  ", []),
])
def test_sentence_splitter(text, sentences):
    assert tm.split_sentences(text) == sentences


def test_rouge_lsum_scores_whole_sentences():
    # the reference is one sentence, mr smith came home; the hypothesis smith came home with mr is one sentence
    # too: their longest common subsequence is smith came home, P = 3/5, R = 3/4, F = 2PR / (P + R) = 2/3.
    # Split after "Mr." the reference would be two sentences, [mr] and [smith came home], each matched on its own:
    # R = 4/4, P = 4/5, F = 8/9.
    score = tm.rouge(["Smith came home with Mr"], [["Mr. Smith came home."]], ["rougeLsum"])["rougeLsum"]
    assert score == pytest.approx(200 / 3)


# -- the choices by script --------------------------------------------------------------------------------------

@pytest.mark.parametrize("references, tokenize", [
    (["The cat sat on the mat."], "13a"),
    (RUSSIAN, "13a"),
    (CHINESE, "zh"),
    (["今天北京下了很大的雪 (Beijing snow), 道路都关闭了。"], "zh"),
    (["東京でコーヒーを飲んだ。"], "ja-mecab" if tm.mecab_available("ja-mecab") else "char"),
    (["한국어 문장입니다. 오늘은 눈이 많이 왔어요."], "ko-mecab" if tm.mecab_available("ko-mecab") else "13a"),
    (["ฉันชอบแมว"], "char"),
    ([], "13a"),
])
def test_bleu_tokenisation_by_script(references, tokenize):
    assert tm.bleu_tokenize([[r] for r in references]) == tokenize


def test_the_choices_are_logged(monkeypatch):
    """Once per choice, however often evaluation runs (a handler of its own: other tests may leave pytest's
    capturing handlers on parent loggers, which would show each record twice)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    monkeypatch.setattr(tm, "_noted", set())
    level = tm.logger.level
    tm.logger.setLevel(logging.INFO)
    tm.logger.addHandler(handler)
    try:
        tm.bleu(CHINESE, [[t] for t in CHINESE])
        tm.rouge(CHINESE, [[t] for t in CHINESE], ["rougeL"])
        tm.bleu(CHINESE, [[t] for t in CHINESE])
    finally:
        tm.logger.removeHandler(handler)
        tm.logger.setLevel(level)
    assert records == ["BLEU: sacrebleu tokenize=zh", "ROUGE: Unicode words, CJK and Thai-family characters "
                       "one by one, no stemming (references not English)"]


def test_stemming_for_english_only():
    assert tm.is_english([["The cats were sitting on the mats."]])
    assert tm.rouge(["cat sits"], [["cats sitting"]], ["rouge1"])["rouge1"] == pytest.approx(100.0)
    assert not tm.is_english([RUSSIAN]) and not tm.is_english([CHINESE])
    french = ["Les élèves étudiaient à la bibliothèque.", "Ils préparaient leurs examens ensemble."]
    assert not tm.is_english([french])
    # not stemmed: "chats" and "chat" stay apart in French; ROUGE-1 P = 1/2, R = 1/4 (les of les chat à côté)
    score = tm.rouge(["les chats"], [["les chat à côté"]], ["rouge1"])["rouge1"]
    assert score == pytest.approx(100 * 2 * (1 / 2 * 1 / 4) / (1 / 2 + 1 / 4))


def test_every_squad_article_counts_as_english(squad_file):
    """English Wikipedia with many foreign names (Yuan dynasty, Genghis Khan, Warsaw) is still stemmed."""
    for article in json.loads(squad_file.read_text())["data"]:
        assert tm.is_english([[p["context"] for p in article["paragraphs"]]]), article["title"]


# -- English: exactly rouge-score's default (its tokenizer, Porter stemmer) on real text ------------------------

def squad_english_pairs(limit: int = 300) -> list[tuple[str, list[str]]]:
    """(question, [the paragraph, the first answer]) from SQuAD dev, for paragraphs written in ASCII only."""
    path = SQUAD_DIR / "dev-v1.1.json"
    if not path.is_file():
        pytest.skip(f"SQuAD data not found at {SQUAD_DIR}")
    pairs = []
    for article in json.loads(path.read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"][:1]:
                texts = [qa["question"], paragraph["context"], qa["answers"][0]["text"]]
                if all(t.isascii() for t in texts):
                    pairs.append((texts[0], texts[1:]))
    return pairs[:limit]


def test_english_rouge_equals_rouge_scores_default_on_squad():
    from rouge_score import rouge_scorer, tokenizers

    pairs = squad_english_pairs()
    assert len(pairs) == 300
    ours, theirs = tm.UnicodeTokenizer(stem=True), tokenizers.DefaultTokenizer(use_stemmer=True)
    for question, references in pairs:
        for text in [question, *references]:
            assert ours.tokenize(text) == theirs.tokenize(text)
    hypotheses, references = [q for q, _ in pairs], [r for _, r in pairs]
    assert tm.is_english(references)
    default = rouge_scorer.RougeScorer(ROUGE, use_stemmer=True)
    expected = {name: 0.0 for name in ROUGE}
    for hypothesis, refs in zip(hypotheses, references):
        split = [tm.sentence_lines(r) for r in refs]
        scores = default.score_multi(split, tm.sentence_lines(hypothesis))
        for name in ROUGE:
            expected[name] += scores[name].fmeasure
    expected = {name: 100 * total / len(hypotheses) for name, total in expected.items()}
    assert tm.rouge(hypotheses, references, ROUGE) == expected  # exactly
    assert 5 < expected["rougeL"] < 95  # a real comparison, neither empty nor identical

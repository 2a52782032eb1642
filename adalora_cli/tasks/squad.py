"""SQuAD v1.1 (`squad`) and v2.0 (`squad_v2`): extractive question answering.

Data: the hub's `rajpurkar/squad` / `rajpurkar/squad_v2`, or local files in the official JSON format
(`--train-file`, `--validation-file`, or `--data-dir` holding train-v1.1.json / dev-v1.1.json, resp.
train-v2.0.json / dev-v2.0.json). Both become the hub's columns: id, title, context, question,
answers {text, answer_start}; an unanswerable v2.0 question has empty answer lists.

Features: the question, then a window of the context, `max_seq_length` tokens in all. A context that does
not fit is split into overlapping windows sharing `doc_stride` tokens (the Hugging Face tokenizer's
`stride`, as in Hugging Face's run_qa.py example; the original BERT code used the step between windows).
A training window whose context does not hold the whole answer, and every window of an unanswerable
question, points at the first token ([CLS]).

Answers: for every window the `n_best` highest start and end logits are paired; a span is valid when both
ends lie in the context, end >= start and it is at most `max_answer_length` tokens long; its score is
start + end logit. The best valid span over all windows of a question is mapped back to the original
context text through the tokenizer's character offsets. For v2.0 the null score is the smallest
[CLS] start + end logit over the windows, and the answer is "" (no answer) when
null score - best span score > `null_threshold`. The v2.0 metrics add the official script's `best_exact` /
`best_f1` and the thresholds that reach them (tuned on the evaluation set itself: an upper bound, not a score).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adalora_cli.errors import UserError
from adalora_cli.tasks.base import Task, TaskSettings, setting
from adalora_cli.tasks.registry import register_task
from adalora_cli.tasks.squad_eval import best_null_thresholds, squad_v1_scores, squad_v2_scores

NULL_INDEX = 0  # the no-answer position: the first token, [CLS] (<s> for RoBERTa) for every preset architecture


@dataclass(frozen=True)
class SquadSpec:
    name: str
    hub_dataset: str
    files: dict[str, str]  # split -> file name in --data-dir
    unanswerable: bool  # v2.0: questions may have no answer


SPECS = [
    SquadSpec("squad", "rajpurkar/squad", {"train": "train-v1.1.json", "validation": "dev-v1.1.json"}, False),
    SquadSpec("squad_v2", "rajpurkar/squad_v2", {"train": "train-v2.0.json", "validation": "dev-v2.0.json"}, True),
]


@dataclass
class SquadSettings(TaskSettings):
    doc_stride: int = setting("SQuAD: tokens shared by context windows.", 128)
    n_best: int = setting("SQuAD: start and end candidates per window.", 20)
    max_answer_length: int = setting("SQuAD: longest answer, in tokens.", 30)
    null_threshold: float = setting("SQuAD v2.0: answer \"\" when the null score beats the best span by more than "
                                    "this.", 0.0)

    def validate(self) -> None:
        self.require_positive("n_best", "max_answer_length")
        if self.doc_stride < 0:
            raise UserError(f"doc_stride must be 0 or more, got {self.doc_stride}; give e.g. --doc-stride 128")


def _field(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[key], checked to be of `kind`; anything else is a UserError naming the place in the file."""
    if not isinstance(record, dict) or key not in record:
        raise UserError(f"{where} lacks the key {key!r}; use a SQuAD file in the official JSON format")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{where}: {key!r} should be {names}, got {type(value).__name__}; fix the file")
    return value


def read_squad_json(path: Path, unanswerable: bool) -> dict[str, list]:
    """The questions of an official SQuAD JSON file as hub-style columns. Bad files raise UserError.

    v2.0 marks unanswerable questions with `is_impossible` (their `answers` list is empty); in a v1.1
    task every question needs an answer.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check --data-dir or the file options") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); use the official SQuAD file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); use the official SQuAD file") from None
    articles = _field(data, "data", list, str(path))
    columns: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for a, article in enumerate(articles):
        where = f"{path} article {a}"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where)):
            context = _field(paragraph, "context", str, f"{where} paragraph {p}")
            for q, qa in enumerate(_field(paragraph, "qas", list, f"{where} paragraph {p}")):
                place = f"{where} paragraph {p} question {q}"
                qid = str(_field(qa, "id", (str, int), place))
                question = _field(qa, "question", str, place)
                answers = {"text": [], "answer_start": []}
                if not qa.get("is_impossible", False):
                    for answer in _field(qa, "answers", list, place):
                        text = _field(answer, "text", str, place + " answer")
                        start = _field(answer, "answer_start", int, place + " answer")
                        if start < 0 or start + len(text) > len(context):
                            raise UserError(f"{place}: answer_start {start} puts {text!r} outside the context; fix the file")
                        answers["text"].append(text)
                        answers["answer_start"].append(start)
                if not answers["text"] and not unanswerable:
                    raise UserError(f"{place} (id {qid}) has no answer; SQuAD v1.1 needs one, use --task squad_v2 "
                                    "for files with unanswerable questions")
                for key, value in (("id", qid), ("title", str(title)), ("context", context),
                                   ("question", question), ("answers", answers)):
                    columns[key].append(value)
    if not columns["id"]:
        raise UserError(f"{path} holds no questions; use a SQuAD file in the official JSON format")
    return columns


def _raw_features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"),
        "context": datasets.Value("string"), "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))},
    })


class SquadTask(Task):
    auto_model = "AutoModelForQuestionAnswering"
    peft_task_type = "QUESTION_ANS"
    settings_class = SquadSettings
    num_labels = 2  # the QA head: one start and one end logit per token
    default_max_seq_length = 384
    group_columns = ("title",)  # a held-out share takes whole articles: no context is both trained on and scored

    def __init__(self, spec: SquadSpec):
        self.spec = spec
        self.name = spec.name
        self.metric_names = ("exact_match", "f1") + (("HasAns_f1", "NoAns_f1") if spec.unanswerable else ())

    def local_path(self, split, data_dir, files):
        if split in files:
            return Path(files[split])
        return Path(data_dir) / self.spec.files[split] if data_dir is not None else None

    def hub_dataset(self, data_dir, files, splits):
        return (self.spec.hub_dataset, None) if any(self.local_path(s, data_dir, files) is None for s in splits) \
            else None

    def load(self, split, data_dir, files):
        import datasets

        path = self.local_path(split, data_dir, files)
        if path is not None:
            return datasets.Dataset.from_dict(read_squad_json(path, self.spec.unanswerable), features=_raw_features())
        try:
            return datasets.load_dataset(self.spec.hub_dataset, split=split)
        except Exception as exc:  # the hub client raises many types when offline or missing
            raise UserError(
                f"cannot load {self.spec.hub_dataset} {split} from the Hugging Face hub ({type(exc).__name__}); "
                "pass --train-file/--validation-file or --data-dir with the official SQuAD JSON files for offline use"
            ) from None

    # -- features --------------------------------------------------------------------------------------

    def _windows(self, batch, tokenizer, max_seq_length: int):
        """Question + context windows of at most `max_seq_length` tokens, with offsets and sample ids."""
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"{self.name} needs a fast tokenizer (character offsets); this model has none")
        if tokenizer.padding_side != "right":
            raise UserError(f"{self.name} needs a tokenizer that pads on the right; this one pads on the left")
        questions = [q.lstrip() for q in batch["question"]]
        longest = max((len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]), default=0)
        room = max_seq_length - tokenizer.num_special_tokens_to_add(pair=True) - longest
        if room <= self.settings.doc_stride:  # the tokenizer would abort the process (a Rust panic) instead
            raise UserError(f"a question of {longest} tokens leaves {max(room, 0)} context tokens per window of "
                            f"{max_seq_length}, not more than --doc-stride {self.settings.doc_stride}; "
                            "raise --max-seq-length or lower --doc-stride")
        return tokenizer(questions, batch["context"], truncation="only_second", max_length=max_seq_length,
                         stride=self.settings.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)

    def _train_features(self, batch, tokenizer, max_seq_length):
        encoded = self._windows(batch, tokenizer, max_seq_length)
        samples = encoded.pop("overflow_to_sample_mapping")
        offsets = encoded.pop("offset_mapping")
        encoded["start_positions"], encoded["end_positions"] = [], []
        for i, window in enumerate(offsets):
            answers = batch["answers"][samples[i]]
            span = None
            if answers["text"]:
                first = answers["answer_start"][0]
                span = answer_tokens(encoded.sequence_ids(i), window, first, first + len(answers["text"][0]))
            start, end = span if span is not None else (NULL_INDEX, NULL_INDEX)
            encoded["start_positions"].append(start)
            encoded["end_positions"].append(end)
        return encoded

    def _eval_features(self, batch, indices, tokenizer, max_seq_length):
        encoded = self._windows(batch, tokenizer, max_seq_length)
        samples = encoded.pop("overflow_to_sample_mapping")
        encoded["example_index"] = [indices[s] for s in samples]
        encoded["offset_mapping"] = [
            [list(o) if seq == 1 else None for o, seq in zip(window, encoded.sequence_ids(i))]
            for i, window in enumerate(encoded["offset_mapping"])
        ]
        return encoded

    def preprocess(self, raw, tokenizer, max_seq_length, training):
        if training:
            return raw.map(self._train_features, batched=True, remove_columns=raw.column_names,
                           fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length})
        return raw.map(self._eval_features, batched=True, with_indices=True, remove_columns=raw.column_names,
                       fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length})

    # -- answers and metrics ---------------------------------------------------------------------------

    def spans(self, predictions, raw, features) -> tuple[list[str], list[float], list[float]]:
        """The best span text of every question in `raw`, its null gap and its score (see `best_spans`)."""
        start_logits, end_logits = predictions[0], predictions[1]
        settings = self.settings
        return best_spans(start_logits, end_logits, list(features["example_index"]), list(features["offset_mapping"]),
                          list(raw["context"]), n_best=settings.n_best, max_answer_length=settings.max_answer_length)

    def answers(self, predictions, raw, features) -> list[str]:
        """The predicted answer text of every question in `raw` ("" for no answer)."""
        texts, gaps, _ = self.spans(predictions, raw, features)
        return with_null_answers(texts, gaps, self.settings.null_threshold) if self.spec.unanswerable else texts

    def prediction_inputs(self, path: Path):
        """Questions to answer from a SQuAD-format JSON file (answers, if present, are ignored), with their ids."""
        import datasets

        if Path(path).suffix.lower() != ".json":
            raise UserError(f"{path}: {self.name} predicts from a SQuAD-format JSON file (data / paragraphs / qas)")
        columns = read_squad_json(path, unanswerable=True)
        return datasets.Dataset.from_dict(columns, features=_raw_features()), list(columns["id"])

    def prediction_records(self, predictions, raw, features):
        texts, gaps, scores = self.spans(predictions, raw, features)
        records = []
        for text, gap, score in zip(texts, gaps, scores):
            if self.spec.unanswerable and gap > self.settings.null_threshold:  # "no answer": the null score wins
                text, score = "", (score + gap if np.isfinite(gap) else None)
            records.append({"answer": text, "score": None if score is None or not np.isfinite(score)
                            else round(float(score), 4)})
        return records

    def compute_metrics(self, predictions, raw, features):
        texts, gaps, _ = self.spans(predictions, raw, features)
        golds = [answer["text"] for answer in raw["answers"]]
        if not self.spec.unanswerable:
            return squad_v1_scores(texts, golds)
        metrics = squad_v2_scores(with_null_answers(texts, gaps, self.settings.null_threshold), golds)
        metrics.update(best_null_thresholds(texts, gaps, golds))
        return metrics


def answer_tokens(sequence_ids: list, offsets: list, start_char: int, end_char: int) -> tuple[int, int] | None:
    """The first and last token of the answer [start_char, end_char) in one window, or None when the
    window's context does not hold the whole answer."""
    context = [i for i, seq in enumerate(sequence_ids) if seq == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    start = next(i for i in reversed(context) if offsets[i][0] <= start_char)
    end = next(i for i in context if offsets[i][1] >= end_char)
    return start, end


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, example_index: list[int], offsets: list,
               contexts: list[str], n_best: int = 20, max_answer_length: int = 30
               ) -> tuple[list[str], list[float], list[float]]:
    """The best valid span of every example over all its windows, as context text, its null gap and its score.

    `offsets[f][t]` is the character span of token t of window f in its context, or None outside the
    context. The null gap is the example's null score (smallest start + end logit at NULL_INDEX over its
    windows) minus its best span score (+inf, with text "", when no span is valid). Logit rows may be
    longer than their window (padding, -inf): those positions are never valid.
    """
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f, example in enumerate(example_index):
        start, end = np.asarray(start_logits[f], dtype=np.float64), np.asarray(end_logits[f], dtype=np.float64)
        window = offsets[f]
        in_context = np.zeros(len(start), dtype=bool)
        in_context[[t for t, o in enumerate(window) if o is not None and t < len(start)]] = True
        null[example] = min(null.get(example, np.inf), start[NULL_INDEX] + end[NULL_INDEX])
        starts = np.argsort(-start, kind="stable")[:n_best]
        ends = np.argsort(-end, kind="stable")[:n_best]
        s, e = np.meshgrid(starts, ends, indexing="ij")
        valid = in_context[s] & in_context[e] & (e >= s) & (e - s + 1 <= max_answer_length)
        if not valid.any():
            continue
        candidates = np.flatnonzero(valid)  # row-major: ties go to the higher start, then the higher end logit
        scores = (start[s] + end[e]).ravel()[candidates]
        i, j = np.unravel_index(candidates[int(np.argmax(scores))], valid.shape)
        score = float(scores.max())
        if example not in best or score > best[example][0]:
            first, last = window[starts[i]], window[ends[j]]
            best[example] = (score, contexts[example][first[0]:last[1]])
    texts, gaps, scores = [], [], []
    for example in range(len(contexts)):
        score, text = best.get(example, (-np.inf, ""))
        texts.append(text)
        gaps.append(float(null.get(example, np.inf) - score) if example in best else np.inf)
        scores.append(float(score))
    return texts, gaps, scores


def with_null_answers(texts: list[str], gaps: list[float], null_threshold: float) -> list[str]:
    """v2.0 answers: "" wherever the null score beats the best span by more than `null_threshold`."""
    return ["" if gap > null_threshold else text for text, gap in zip(texts, gaps)]


def best_answers(start_logits: np.ndarray, end_logits: np.ndarray, example_index: list[int], offsets: list,
                 contexts: list[str], n_best: int = 20, max_answer_length: int = 30,
                 null_threshold: float | None = None) -> list[str]:
    """The answer text of every example: its best span (`best_spans`), or with `null_threshold` (v2.0) ""
    when the null score exceeds the best span score by more than the threshold."""
    texts, gaps, _ = best_spans(start_logits, end_logits, example_index, offsets, contexts, n_best, max_answer_length)
    return texts if null_threshold is None else with_null_answers(texts, gaps, null_threshold)


for _spec in SPECS:
    register_task(SquadTask(_spec))

"""Token classification (named-entity recognition): `token-classification` on the user's data, and the benchmarks
`conll2003` and `wnut_17`.

Data: CoNLL-style files (.conll .txt .iob .bio: a token and its tag per line, whitespace-separated, extra columns
allowed: the token is the first column, the tag the last; a blank line between sentences; `-DOCSTART-` lines
skipped) or JSON / JSONL rows `{"tokens": [...], "tags": [...]}` (columns `--tokens-column` / `--tags-column`, else
detected: tokens / words and tags / ner_tags / labels), or a hub dataset (`--dataset`). Tags are IOB2 strings (`O`,
`B-TYPE`, `I-TYPE`; IOB1 rows, whose entities may start with `I-`, are read as IOB2), or integers when `label_names`
names them (a hub dataset's ClassLabel names do).

Features: words are tokenized with `is_split_into_words=True` (a byte-level BPE tokenizer without a prefix space,
RoBERTa's or GPT-2's, gets each word with a leading space, as in running text); a word's tag is learnt on its first
sub-token, -100 elsewhere. A sentence longer than `max_seq_length` loses its tail words: they count as predicted `O`
against the gold tags of the whole sentence, so a cut can only lower the scores.

Metrics: seqeval's entity-level precision, recall and F1 in strict IOB2 mode (an entity counts only with the right
type and span, begun by B-), and token accuracy; `f1` is the main metric. `adalora predict` writes per row
`{"id", "entities": [{"text", "type", "start", "end"}], "tags": [...]}`, the entities read from the tags as the F1
reads them and their offsets in characters of the tokens joined by single spaces.

The logic is in small functions (`read_conll`, `align_labels`, `entity_spans`, `tagging_metrics`...) that the
task classes only call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from adalora_cli.errors import UserError
from adalora_cli.tasks.base import (EvalSplit, TRUNCATED_INPUT, DatasetSettings, UserDataTask, encode_counting_cuts,
                                    setting)
from adalora_cli.tasks.registry import register_task

CONLL_FORMATS = (".conll", ".txt", ".iob", ".bio")
TOKENS_COLUMNS = ("tokens", "words")
TAGS_COLUMNS = ("tags", "ner_tags", "labels")
OUTSIDE = "O"
IGNORED = -100  # the label of sub-tokens and special tokens: no loss there
DOCSTART = "-DOCSTART-"
_BLANK = " \t\r\f\v\ufeff"  # a line of only these ends a sentence (WNUT-17's train file has lines of one tab)
_COLUMNS = re.compile(r"[ \t]+")  # columns are split on spaces and tabs only: a token may hold other spaces
_TAG = re.compile(r"^[BI]-\S.*$")


@dataclass
class TokenClassificationSettings(DatasetSettings):
    """The columns and tag names of a token-classification run: given, or read off the training data (and then
    recorded in the run's config.yaml, under the task's name)."""

    tokens_column: str | None = setting("Token-classification: column of token lists.", column=True,
                                        shown="tokens / words")
    tags_column: str | None = setting("Token-classification: column of tag lists.", column=True,
                                      shown="tags / ner_tags / labels")
    label_names: list[str] | None = setting("The tag names, in id order; names integer tags.",
                                            shown="the training data's tags: O, then sorted")


# -- reading -----------------------------------------------------------------------------------------------

def parse_conll(text: str, source: str, tagged: bool = True) -> dict[str, list]:
    """CoNLL-style text as columns: `tokens` (and with `tagged`, `tags`, each a list per sentence) and `line` (the
    line each sentence starts on). The token is the first column and the tag the last, so 2-column and 4-column
    lines may mix; without `tagged`, a one-column line is a token with no tag."""
    sentences: list[tuple[int, list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(_BLANK):
            if tokens:
                sentences.append((start, tokens, tags))
            tokens, tags = [], []
            continue
        columns = _COLUMNS.split(line.strip(_BLANK))
        if columns[0] == DOCSTART:
            continue
        if tagged and len(columns) < 2:
            raise UserError(f"{source} line {number} has one column ({columns[0]!r}); a CoNLL line is 'TOKEN ... TAG' "
                            "with the tag last, and a blank line between sentences")
        if tagged:
            check_tag(columns[-1], f"{source} line {number}")
        if not tokens:
            start = number
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        sentences.append((start, tokens, tags))
    if not sentences:
        raise UserError(f"{source} holds no sentences; write one 'TOKEN TAG' per line, a blank line between sentences")
    columns = {"tokens": [s[1] for s in sentences], "line": [s[0] for s in sentences]}
    if tagged:
        columns["tags"] = [s[2] for s in sentences]
    return columns


def read_text(path: Path) -> str:
    """A UTF-8 file's text (a byte-order mark dropped, CRLF and CR read as LF); a bad file is one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the file option")
    try:
        with open(path, encoding="utf-8-sig") as f:  # universal newlines
            return f.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def read_conll(path: Path, tagged: bool = True):
    """A CoNLL-style file as a `datasets.Dataset` with the columns tokens, tags (with `tagged`) and line."""
    from adalora_cli.data import to_dataset

    return to_dataset(parse_conll(read_text(path), str(path), tagged))


def read_rows(path: Path, tagged: bool = True):
    """A data file by extension: CoNLL-style (.conll .txt .iob .bio) or a table (.json .jsonl .csv .tsv)."""
    from adalora_cli.data import TABLE_FORMATS, read_table, to_dataset

    suffix = Path(path).suffix.lower()
    if suffix in CONLL_FORMATS:
        return read_conll(path, tagged)
    if suffix in TABLE_FORMATS:
        return to_dataset(read_table(path))
    raise UserError(f"{path}: unknown file type {suffix or '(none)'}; token classification reads CoNLL files "
                    f"({' '.join(CONLL_FORMATS)}) or JSON / JSONL rows {{\"tokens\": [...], \"tags\": [...]}}")


def decode_class_labels(raw):
    """A hub dataset with its integer tag sequences (ClassLabel features: conll2003's ner_tags) as tag names."""
    import datasets

    for column, feature in raw.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            features = datasets.Features({**raw.features, column: datasets.Sequence(datasets.Value("string"))})
            raw = raw.map(lambda row, c=column, names=inner.names: {c: [names[i] for i in row[c]]}, features=features)
    return raw


# -- tags ----------------------------------------------------------------------------------------------------

def check_tag(tag: str, where: str) -> None:
    if tag != OUTSIDE and not _TAG.match(tag):
        raise UserError(f"{where}: tag {tag!r} is not IOB2 (O, B-TYPE, I-TYPE); convert the tags (IOBES / BILOU "
                        "tags: S- and E- become B- and I-)")


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 tags as IOB2: an entity that starts with I-X (after O or another type) starts with B-X. IOB2 tags come
    back unchanged."""
    fixed = []
    for i, tag in enumerate(tags):
        previous = tags[i - 1] if i else OUTSIDE
        if tag.startswith("I-") and (previous == OUTSIDE or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        fixed.append(tag)
    return fixed


def tag_names(tag_lists) -> list[str]:
    """The model's classes from the training tags: O first, then B- and I- of every entity type seen, sorted (an
    entity type seen only as B- still gets its I-, so that a longer entity at evaluation is a known tag)."""
    types = {tag[2:] for tags in tag_lists for tag in tags if tag != OUTSIDE}
    return [OUTSIDE] + sorted(f"{prefix}-{kind}" for kind in types for prefix in "BI")


def tags_as_names(tags: list, label_names: list[str] | None, where: str) -> list[str]:
    """One row's tags as IOB2 names: integers are positions in `label_names`."""
    names = []
    for tag in tags:
        if isinstance(tag, (int, np.integer)) and not isinstance(tag, bool):
            if label_names is None:
                raise UserError(f"{where}: the tags are numbers; name them with label_names (e.g. --set "
                                "'label_names=[O, B-PER, I-PER]', in the numbers' order) or write the tag names")
            if not 0 <= tag < len(label_names):
                raise UserError(f"{where}: tag {tag} is outside 0..{len(label_names) - 1} (label_names: "
                                f"{', '.join(label_names)}); fix the tag or label_names")
            tag = label_names[tag]
        elif not isinstance(tag, str):
            raise UserError(f"{where}: tag {tag!r} is neither a tag name nor a number; write tags like O, B-PER, I-PER")
        check_tag(tag, where)
        names.append(tag)
    return to_iob2(names)


def check_tokens(tokens, where: str) -> list[str]:
    if not isinstance(tokens, (list, tuple)):
        raise UserError(f"{where}: the tokens are {type(tokens).__name__}, not a list of words; write [\"word\", ...]")
    if not tokens:
        raise UserError(f"{where}: the token list is empty; every row needs at least one token (remove that row)")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            raise UserError(f"{where}: token {i + 1} is {'empty' if isinstance(token, str) else repr(token)}; every "
                            "token must be a non-empty word")
    return list(tokens)


# -- features --------------------------------------------------------------------------------------------

def needs_prefix_space(tokenizer) -> bool:
    """Whether the tokenizer is byte-level BPE without a prefix space (RoBERTa's, GPT-2's): it marks a word's
    start with the space before it, so a word given alone must carry that space to be tokenized as in text."""
    import json

    pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre_tokenizer is None:
        return False
    found = json.loads(pre_tokenizer.__getstate__())  # the pre-tokenizer's settings as JSON
    steps = found.get("pretokenizers", [found]) if found.get("type") == "Sequence" else [found]
    return any(step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False) for step in steps)


def encode_words(tokenizer, sentences: list[list[str]], max_length: int):
    """(the encoding of pre-split sentences, truncated to `max_length`, per sentence 1 where that cut it)."""
    shown = [[" " + w for w in words] for words in sentences] if needs_prefix_space(tokenizer) else sentences
    encoding, cut = encode_counting_cuts(partial(tokenizer, is_split_into_words=True), max_length, shown)
    if not getattr(encoding, "encodings", None) and sentences:
        raise UserError("token classification needs a fast tokenizer (one that maps tokens to words); this model's "
                        "tokenizer is not one")
    return encoding, cut


def word_positions(word_ids: list[int | None]) -> list[int]:
    """The word of each token position, -1 for special tokens (storable in a Dataset column)."""
    return [-1 if w is None else w for w in word_ids]


def align_labels(word_ids: list[int], word_labels: list[int]) -> list[int]:
    """Token labels: a word's label on its first sub-token, -100 on its other sub-tokens and on special tokens."""
    labels, previous = [], None
    for w in word_ids:
        labels.append(IGNORED if w is None or w < 0 or w == previous else word_labels[w])
        if w is not None and w >= 0:
            previous = w
    return labels


def word_tags(logits: np.ndarray, word_ids: list[int], n_words: int, names: list[str]) -> list[str]:
    """A sentence's predicted tags: the argmax at each word's first sub-token; words cut by truncation (and any
    the tokenizer turned into no token) are O."""
    tags, seen = [OUTSIDE] * n_words, set()
    for position, w in enumerate(word_ids):
        if w >= 0 and w not in seen:
            seen.add(w)
            tags[w] = names[int(np.argmax(logits[position]))]
    return tags


# -- metrics and entities ------------------------------------------------------------------------------------

def tagging_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """seqeval's entity-level precision, recall and F1 (strict IOB2: an entity counts when its type and span match
    and it starts with B-), and the share of words tagged right."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    strict = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {"f1": float(f1_score(gold, predicted, **strict)),
            "precision": float(precision_score(gold, predicted, **strict)),
            "recall": float(recall_score(gold, predicted, **strict)),
            "accuracy": float(accuracy_score(gold, predicted))}


def char_offsets(tokens: list[str]) -> list[int]:
    """Where each token starts in `" ".join(tokens)`."""
    starts, position = [], 0
    for token in tokens:
        starts.append(position)
        position += len(token) + 1
    return starts


def entity_spans(tokens: list[str], tags: list[str]) -> list[dict[str, Any]]:
    """The entities of a tagged sentence, as the strict F1 reads them (seqeval's IOB2 entities: B-X and the I-X
    that follow; an I-X after O or another type begins none), each with its text and character offsets in the
    tokens joined by single spaces (`end` exclusive, so text == joined[start:end])."""
    from seqeval.scheme import IOB2, Entities

    text, starts = " ".join(tokens), char_offsets(tokens)
    spans = []
    for entity in Entities([tags], IOB2).entities[0]:
        start, end = starts[entity.start], starts[entity.end - 1] + len(tokens[entity.end - 1])
        spans.append({"text": text[start:end], "type": entity.tag, "start": start, "end": end})
    return spans


# -- the tasks ---------------------------------------------------------------------------------------------

class TokenClassificationTask(UserDataTask):
    """`token-classification` on the user's files or a hub dataset (`--dataset`)."""

    auto_model = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    settings_class = TokenClassificationSettings
    default_max_seq_length = 256
    metric_names = ("f1", "precision", "recall", "accuracy")
    eval_splits = (EvalSplit("validation"),)

    def __init__(self, name: str = "token-classification"):
        self.name = name

    @property
    def tokens_column(self) -> str | None:
        return self.settings.tokens_column

    @property
    def tags_column(self) -> str | None:
        return self.settings.tags_column

    @property
    def label_names(self) -> list[str] | None:
        return self.settings.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names or ())

    def config_overrides(self) -> dict[str, Any]:
        names = self.label_names or []
        return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}

    def label_config(self, model_config) -> dict[str, Any]:
        """What a PEFT export writes to labels.json, for `AutoModelForTokenClassification.from_pretrained(base,
        **labels)`."""
        return {"num_labels": len(model_config.id2label), "id2label": dict(model_config.id2label),
                "label2id": dict(model_config.label2id)}

    def class_names(self, model_config) -> list[str]:
        return [model_config.id2label[i] for i in sorted(model_config.id2label)]

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    # -- data ----------------------------------------------------------------------------------------------

    def check_sources(self, data_dir, files) -> None:
        if self.train_split not in files and self.hub_name is None:
            raise UserError(f"{self.name} trains on your data: pass --train-file (CoNLL {' '.join(CONLL_FORMATS)}, or "
                            ".json / .jsonl rows with tokens and tags) or --dataset NAME for a hub dataset")
        super(UserDataTask, self).check_sources(data_dir, files)

    def load(self, split, data_dir, files):
        from adalora_cli.data import load_hub_dataset

        path = self.local_path(split, data_dir, files)
        if path is not None:
            conll = Path(path).suffix.lower() in CONLL_FORMATS
            return self.named_columns(read_rows(path)) if conll else read_rows(path)
        return decode_class_labels(load_hub_dataset(self.hub_name, self.hub_config, self._hub_split(split)))

    def named_columns(self, raw):
        """A CoNLL file's rows (columns tokens, tags) under the run's column names, when it has others (a run
        trained on JSON rows of `words` and `ner_tags`, evaluated on a CoNLL file)."""
        names = {"tokens": self.tokens_column or "tokens", "tags": self.tags_column or "tags"}
        return raw.rename_columns({old: new for old, new in names.items() if old != new and old in raw.column_names})

    def columns(self, found: list[str], source: str, tagged: bool = True) -> tuple[str, str | None]:
        """(tokens column, tags column) of a file: the run's, else detected."""
        from adalora_cli.data import pick_column

        tokens = pick_column(found, self.tokens_column, TOKENS_COLUMNS, "tokens", "--tokens-column", source)
        tags = pick_column(found, self.tags_column, TAGS_COLUMNS, "tags", "--tags-column", source,
                           required=tagged, taken=(tokens,))
        return tokens, tags

    def settings_from_data(self, raw, source: str) -> dict[str, Any]:
        tokens, tags = self.columns(list(raw.column_names), source)
        settings = {"tokens_column": tokens, "tags_column": tags}
        if self.label_names is None:
            place = _places(raw, source)
            settings["label_names"] = tag_names(tags_as_names(row, None, place(i)) for i, row in enumerate(raw[tags]))
        return settings

    def gold_tags(self, raw, source: str = "the data") -> list[list[str]]:
        """Every row's tags as IOB2 names, checked: as many as tokens, each a known class."""
        known, place = set(self.label_names or ()), _places(raw, source)
        rows = []
        for i, (tokens, tags) in enumerate(zip(raw[self.tokens_column], raw[self.tags_column])):
            where = place(i)
            names = tags_as_names(tags if isinstance(tags, (list, tuple)) else [tags], self.label_names, where)
            if len(names) != len(tokens):
                raise UserError(f"{where}: {len(tokens)} token(s) but {len(names)} tag(s); give one tag per token")
            unknown = next((t for t in names if t not in known), None)
            if unknown is not None:
                raise UserError(f"{where}: tag {unknown!r} was not seen in the training data (tags: "
                                f"{', '.join(self.label_names)}); fix the tag or add such rows to the training data")
            rows.append(names)
        return rows

    def check_rows(self, raw, source: str, labelled: bool = True) -> None:
        from adalora_cli.data import pick_column

        pick_column(list(raw.column_names), self.tokens_column, (), "", "--tokens-column", source)
        place = _places(raw, source)
        for i, tokens in enumerate(raw[self.tokens_column]):
            check_tokens(tokens, place(i))
        if labelled:
            pick_column(list(raw.column_names), self.tags_column, (), "", "--tags-column", source)
            self.gold_tags(raw, source)

    # -- features and metrics ------------------------------------------------------------------------------

    def preprocess(self, raw, tokenizer, max_seq_length, training):
        from adalora_cli.data import to_dataset

        sentences = [list(tokens) for tokens in raw[self.tokens_column]]
        encoding, cut = encode_words(tokenizer, sentences, max_seq_length)
        columns = {key: list(values) for key, values in encoding.items()}
        positions = [word_positions(encoding.word_ids(i)) for i in range(len(sentences))]
        if self.tags_column is not None and self.tags_column in raw.column_names:
            index = {name: i for i, name in enumerate(self.label_names)}
            columns["labels"] = [align_labels(ids, [index[t] for t in tags])
                                 for ids, tags in zip(positions, self.gold_tags(raw))]
        if not training:
            columns["word_ids"] = positions
        columns[TRUNCATED_INPUT] = cut
        return to_dataset(columns)

    def predicted_tags(self, logits, features, raw) -> list[list[str]]:
        logits = np.asarray(logits)
        return [word_tags(logits[i], ids, len(tokens), self.label_names)
                for i, (ids, tokens) in enumerate(zip(features["word_ids"], raw[self.tokens_column]))]

    def compute_metrics(self, predictions, raw, features):
        return tagging_metrics(self.gold_tags(raw), self.predicted_tags(predictions[0], features, raw))

    def prediction_inputs(self, path: Path):
        """Rows to predict and their ids: a CoNLL-style file (a tag column is ignored, one-column lines are
        tokens), or table rows with a tokens column (the run's, or tokens / words), or with a `text` column,
        split on whitespace."""
        from adalora_cli.data import TABLE_FORMATS, read_table, row_ids, to_dataset

        path = Path(path)
        column = self.tokens_column or TOKENS_COLUMNS[0]
        if path.suffix.lower() in CONLL_FORMATS:
            raw = read_conll(path, tagged=False)
            sentences, ids = raw["tokens"], list(range(len(raw)))
        else:
            if path.suffix.lower() not in TABLE_FORMATS:
                read_rows(path)  # says which file types are read
            table = read_table(path)
            sentences, ids = tokens_to_predict(table, self.tokens_column, str(path)), row_ids(table)
        for i, tokens in enumerate(sentences):
            check_tokens(tokens, f"{path} row {i + 1}")
        return to_dataset({column: sentences}), ids

    def prediction_records(self, predictions, raw, features) -> list[dict[str, Any]]:
        tags = self.predicted_tags(predictions[0], features, raw)
        return [{"entities": entity_spans(list(tokens), row), "tags": row}
                for tokens, row in zip(raw[self.tokens_column], tags)]


def tokens_to_predict(table: dict[str, list], tokens_column: str | None, source: str) -> list[list[str]]:
    """The token lists of a table to predict: its tokens column (given, or tokens / words), else its `text`
    column split on whitespace."""
    found = [tokens_column] if tokens_column in table else [c for c in TOKENS_COLUMNS if c in table]
    if found:
        return list(table[found[0]])
    if "text" in table:
        texts = table["text"]
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.split():
                raise UserError(f"{source} row {i + 1}: 'text' is {'empty' if isinstance(text, str) else repr(text)}; "
                                "every row needs words to tag")
        return [text.split() for text in texts]
    wanted = " / ".join(dict.fromkeys([c for c in (tokens_column,) if c] + list(TOKENS_COLUMNS) + ["text"]))
    raise UserError(f"{source} has no tokens column ({wanted}; columns: {', '.join(table)}); pick one with "
                    "--tokens-column")


def _places(raw, source: str):
    """Row index -> the row's place for messages: its sentence and first line in a CoNLL file, else its number."""
    lines = raw["line"] if "line" in raw.column_names else None
    return lambda i: f"{source} row {i + 1}" if lines is None else f"{source} sentence {i + 1} (line {lines[i]})"


@dataclass(frozen=True)
class Benchmark:
    """A named NER benchmark: its folder and file names in --data-dir, and its hub dataset."""

    name: str
    folder: str
    files: dict[str, str]  # split -> file name
    hub: str


class BenchmarkTask(TokenClassificationTask):
    """conll2003 / wnut_17: train, dev (`validation`) and test (metrics suffixed `_test`) from --data-dir (the
    benchmark's folder, or the folder above it), else the hub dataset."""

    eval_splits = (EvalSplit("validation"), EvalSplit("test", "_test"))

    def __init__(self, benchmark: Benchmark):
        super().__init__(benchmark.name)
        self.benchmark = benchmark

    @property
    def hub_name(self) -> str:
        return self.benchmark.hub

    @property
    def hub_config(self) -> None:
        return None

    def local_path(self, split, data_dir, files):
        if split in files:
            return Path(files[split])
        if data_dir is None:
            return None
        folder, filename = Path(data_dir), self.benchmark.files[split]
        return folder / filename if (folder / filename).exists() else folder / self.benchmark.folder / filename

    def check_sources(self, data_dir, files) -> None:
        super(UserDataTask, self).check_sources(data_dir, files)

    def hub_dataset(self, data_dir, files, splits):
        return (self.hub_name, None) if any(self.local_path(s, data_dir, files) is None for s in splits) else None

    def has_hub_split(self, split: str) -> bool:
        return True

    def _hub_split(self, split: str) -> str:
        return split


BENCHMARKS = (
    Benchmark("conll2003", "conll2003", {"train": "train.txt", "validation": "dev.txt", "test": "test.txt"},
              "eriktks/conll2003"),
    Benchmark("wnut_17", "wnut17", {"train": "train.conll", "validation": "dev.conll", "test": "test.conll"},
              "leondz/wnut_17"),
)

register_task(TokenClassificationTask())
for _benchmark in BENCHMARKS:
    register_task(BenchmarkTask(_benchmark))

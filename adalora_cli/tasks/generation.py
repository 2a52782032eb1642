"""Text generation: summarisation (`xsum`, `cnn_dailymail`), data-to-text (`e2e_nlg`), and your own
source -> target (`seq2seq`) or prompt -> completion / plain-text (`causal-lm`) data.

The model decides how a pair is fed (`for_model`): an encoder-decoder model (BART, T5) reads the source and is
trained on the target; a decoder-only model (GPT-2, Llama, Qwen, Mistral) reads prompt + completion as one
sequence with the loss on the completion only (the prompt is the source followed by the task's separator), or,
for plain language modelling (`--task causal-lm` with `--text-column` alone), the loss on every token.

Evaluation (`inference.generation_outputs`) gives the mean token loss, its perplexity, and the text `generate`
writes with the task's settings: the papers' beam size, length penalty and lengths for the benchmarks, greedy
decoding for your own data, each settable (`--set num_beams=4`). The text metrics (`text_metrics`: ROUGE-1/2/L/Lsum
from `rouge-score`, best over a source's references; corpus BLEU and chrF from `sacrebleu` over all references of a
source) score text in any script, on the 0-100 scale the papers print. Sources with several references (E2E) are
generated once and scored against all.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adalora_cli.data import pick_column, read_table, row_ids, to_dataset
from adalora_cli.errors import UserError
from adalora_cli.tasks.base import TRUNCATED_INPUT, TRUNCATED_TARGET, EvalSplit, UserDataTask, encode_counting_cuts
from adalora_cli.tasks.registry import register_task
from adalora_cli.tasks.text_metrics import ROUGE, bleu, chrf, rouge

KINDS = ("seq2seq-lm", "causal-lm")
KIND_MODELS = {"seq2seq-lm": "an encoder-decoder model (BART, T5)",
               "causal-lm": "a decoder-only model (GPT-2, Llama, Qwen, Mistral)"}
GENERATION_SETTINGS = ("num_beams", "length_penalty", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size")
COLUMN_SETTINGS = ("source_column", "target_column", "prompt_column", "completion_column", "text_column")
# What `generate` uses unless the task or `--set` says otherwise: greedy decoding; with beams, also these.
GREEDY = {"do_sample": False, "num_beams": 1, "max_new_tokens": 64, "min_new_tokens": 0, "no_repeat_ngram_size": 0}
BEAM_SEARCH = {"length_penalty": 1.0, "early_stopping": True}  # early: stop once num_beams answers are complete


@dataclass(frozen=True)
class GenerationSpec:
    name: str
    sources: tuple[str, ...]  # source (prompt) columns, detected in this order
    targets: tuple[str, ...]  # target (completion) columns
    metrics: tuple[str, ...]
    main_metric: str
    kinds: tuple[str, ...] = KINDS  # the model kinds that fit the task
    hub_dataset: str | None = None
    hub_config: str | None = None
    generation: dict[str, Any] = field(default_factory=lambda: {"num_beams": 1, "max_new_tokens": 64})
    max_seq_length: int = 512
    max_target_length: int = 128
    separator: str = "\n"  # between source and target when a decoder-only model reads them as one sequence
    eval_split: str = "validation"


SPECS = [
    # BART's summarisation settings (fairseq): XSum beam 6, length penalty 1.0, 11-62 tokens; CNN/DM beam 4,
    # length penalty 2.0, 56-142 tokens; both without repeated trigrams.
    GenerationSpec("xsum", ("document",), ("summary",), ROUGE + ("loss", "perplexity"), "rougeL",
                   hub_dataset="EdinburghNLP/xsum", max_seq_length=1024, max_target_length=64, separator="\nSummary: ",
                   generation={"num_beams": 6, "length_penalty": 1.0, "max_new_tokens": 62, "min_new_tokens": 11,
                               "no_repeat_ngram_size": 3}),
    GenerationSpec("cnn_dailymail", ("article",), ("highlights",), ROUGE + ("loss", "perplexity"), "rougeL",
                   hub_dataset="abisee/cnn_dailymail", hub_config="3.0.0", max_seq_length=1024, max_target_length=142,
                   separator="\nHighlights: ",
                   generation={"num_beams": 4, "length_penalty": 2.0, "max_new_tokens": 142, "min_new_tokens": 56,
                               "no_repeat_ngram_size": 3}),
    # The LoRA paper's E2E decoding for GPT-2 (which DyLoRA follows): beam 10, length penalty 0.9, no repeated
    # 4-grams; every reference of a meaning representation counts.
    GenerationSpec("e2e_nlg", ("meaning_representation",), ("human_reference",), ("bleu", "rougeL", "loss",
                   "perplexity"), "bleu", hub_dataset="tuetschek/e2e_nlg", max_seq_length=128, max_target_length=64,
                   separator=" ||| ",
                   generation={"num_beams": 10, "length_penalty": 0.9, "max_new_tokens": 64, "no_repeat_ngram_size": 4}),
    GenerationSpec("seq2seq", ("source", "input", "document", "article"), ("target", "output", "summary"),
                   ROUGE + ("bleu", "chrf", "loss", "perplexity"), "rougeL", kinds=("seq2seq-lm",)),
    GenerationSpec("causal-lm", ("prompt",), ("completion",), ROUGE + ("bleu", "chrf", "loss", "perplexity"),
                   "rougeL", kinds=("causal-lm",), separator=""),
]


class GenerationTask(UserDataTask):
    model_kind = "seq2seq-lm"  # until `for_model` reads the model's config
    num_labels = 0
    generates = True

    def __init__(self, spec: GenerationSpec):
        self.spec = spec
        self.name = spec.name
        self.metric_names = spec.metrics
        self.default_max_seq_length = spec.max_seq_length
        self.eval_splits = (EvalSplit("validation"),)
        self.source_column = self.target_column = self.prompt_column = self.completion_column = None
        self.text_column = None
        self.dataset_eval_split = spec.eval_split
        self.max_target_length = spec.max_target_length
        self.generation = dict(spec.generation)
        self.context_length: int | None = None  # positions the model reads, from its config (`for_model`)

    # -- settings --------------------------------------------------------------------------------------

    def with_settings(self, **settings: Any) -> "GenerationTask":
        task = copy.copy(self)
        task.generation = dict(self.generation)
        for key in COLUMN_SETTINGS + ("dataset", "dataset_config", "dataset_train_split", "dataset_eval_split",
                                      "max_target_length"):
            if settings.get(key) is not None:
                setattr(task, key, settings[key])
        for key in GENERATION_SETTINGS:
            if settings.get(key) is not None:
                task.generation[key] = settings[key]
        # the prompt and completion columns of the causal-lm task are its source and target
        task.source_column = task.prompt_column or task.source_column
        task.target_column = task.completion_column or task.target_column
        return task

    def decoding(self) -> dict[str, Any]:
        """Every decoding setting `generate` runs with (no sampling; the beam-search ones only with beams), so that
        nothing is left for the checkpoint's generation_config.json to fill in."""
        settings = {**GREEDY, **self.generation}
        if settings["num_beams"] > 1:
            return {**BEAM_SEARCH, **settings}
        return {key: value for key, value in settings.items() if key not in BEAM_SEARCH}

    def resolved_settings(self) -> dict[str, Any]:
        decoding = {key: value for key, value in self.generation.items() if key in GENERATION_SETTINGS}
        return {"max_target_length": self.max_target_length, **decoding}

    @property
    def plain_lm(self) -> bool:
        """`--task causal-lm` with only a text column: language modelling, no target to generate."""
        return self.name == "causal-lm" and self.source_column is None and self.text_column is not None

    @property
    def main_metric(self) -> str:
        return "perplexity" if self.plain_lm else self.spec.main_metric

    @property
    def group_columns(self) -> tuple[str, ...]:
        """A held-out share takes a source (prompt, text) with all its references."""
        return (self.text_column if self.plain_lm else self.source_column,)

    @property
    def model_advice(self) -> str:
        return " or ".join(KIND_MODELS[kind] for kind in self.spec.kinds)

    def for_model(self, config) -> "GenerationTask":
        from adalora_cli.models import context_length, language_model_kind

        kind = language_model_kind(config)
        if kind is None:
            raise UserError(f"{self.name} generates text, which a {config.model_type} model cannot; use "
                            f"{self.model_advice}")
        if kind not in self.spec.kinds:
            hint = ("--task causal-lm with --prompt-column and --completion-column" if kind == "causal-lm"
                    else "--task seq2seq with --source-column and --target-column")
            raise UserError(f"--task {self.name} needs a {' or '.join(self.spec.kinds)} model, and {config.model_type} "
                            f"is a {kind} model; use {hint}")
        task = copy.copy(self)
        task.model_kind = kind
        task.context_length = context_length(config)
        new_tokens = task.decoding()["max_new_tokens"]
        if task.context_length is not None and new_tokens >= task.context_length:
            raise UserError(f"max_new_tokens={new_tokens} does not fit the {task.context_length}-position context of "
                            f"this {config.model_type} model; use --set max_new_tokens={task.context_length // 4} (or "
                            f"another value below {task.context_length})")
        return task

    def config_overrides(self) -> dict[str, Any]:
        return {}

    # -- data ------------------------------------------------------------------------------------------

    @property
    def hub_name(self) -> str | None:
        return self.dataset or self.spec.hub_dataset

    @property
    def hub_config(self) -> str | None:
        return self.dataset_config if self.dataset else self.spec.hub_config

    def settings_from_data(self, raw, source: str) -> dict[str, Any]:
        """The source (prompt) and target (completion) columns; a column named for one role is never detected for
        the other (`--source-column summary` leaves `summary` out of the target candidates)."""
        found = list(raw.column_names)
        named = (self.source_column, self.target_column, self.text_column)
        if self.name == "causal-lm":
            prompt = pick_column(found, self.source_column, self.spec.sources, "prompt", "--prompt-column", source,
                                 required=False, taken=named)
            if prompt is None:  # plain language modelling on a text column
                return {"text_column": pick_column(found, self.text_column, ("text",), "prompt or text",
                                                   "--prompt-column (with --completion-column) or --text-column",
                                                   source, taken=named)}
            return {"prompt_column": prompt, "completion_column": pick_column(
                found, self.target_column, self.spec.targets, "completion", "--completion-column", source,
                taken=named + (prompt,))}
        source_column = pick_column(found, self.source_column, self.spec.sources, "source", "--source-column", source,
                                    taken=named)
        return {"source_column": source_column,
                "target_column": pick_column(found, self.target_column, self.spec.targets, "target",
                                             "--target-column", source, taken=named + (source_column,))}

    def _text_columns(self, labelled: bool) -> list[tuple[str, str]]:
        if self.plain_lm:
            return [(self.text_column, "--text-column")]
        flags = ("--prompt-column", "--completion-column") if self.name == "causal-lm" else \
            ("--source-column", "--target-column")
        columns = [(self.source_column, flags[0])]
        return columns + [(self.target_column, flags[1])] if labelled else columns

    def check_rows(self, raw, source: str, labelled: bool = True) -> None:
        found = list(raw.column_names)
        for column, flag in self._text_columns(labelled):
            pick_column(found, column, (), "", flag, source)
            for i, value in enumerate(raw[column]):
                if not isinstance(value, str) or not value.strip():
                    what = "empty" if value is None or (isinstance(value, str) and not value.strip()) else repr(value)
                    raise UserError(f"{source} row {i + 1}: {column!r} is {what}; every row needs a non-empty "
                                    "text (remove or fill that row)")

    # -- features --------------------------------------------------------------------------------------

    def preprocess(self, raw, tokenizer, max_seq_length, training):
        labelled = self.plain_lm or self.target_column in raw.column_names
        encode = self._causal_features if self.model_kind == "causal-lm" else self._seq2seq_features

        def tokenize(batch):
            return encode(batch, tokenizer, max_seq_length, labelled, training)

        return raw.map(tokenize, batched=True, remove_columns=raw.column_names)

    def _sources(self, batch) -> list[str]:
        return list(batch[self.text_column if self.plain_lm else self.source_column])

    def _within_context(self, length: int) -> int:
        return length if self.context_length is None else min(length, self.context_length)

    def _prompt_limit(self, max_seq_length: int) -> int:
        """The longest prompt a decoder-only model generates from: --max-seq-length, leaving max_new_tokens of the
        model's context free (`for_model` has checked that they fit)."""
        if self.context_length is None:
            return max_seq_length
        return min(max_seq_length, self.context_length - self.decoding()["max_new_tokens"])

    def _seq2seq_features(self, batch, tokenizer, max_seq_length, labelled, training):
        """The source, its end cut to --max-seq-length (and the model's context); the target cut to
        max_target_length, the tokenizer keeping its end-of-text token."""
        features, cut = encode_counting_cuts(tokenizer, self._within_context(max_seq_length), self._sources(batch))
        features[TRUNCATED_INPUT] = cut
        if labelled:
            def encode_target(texts, **options):
                return tokenizer(text_target=texts, **options)

            targets, cut = encode_counting_cuts(encode_target, self._within_context(self.max_target_length),
                                                list(batch[self.target_column]))
            features["labels"], features[TRUNCATED_TARGET] = targets["input_ids"], cut
        return features

    def _causal_features(self, batch, tokenizer, max_seq_length, labelled, training):
        """prompt + completion + EOS within --max-seq-length and the model's context, labels -100 over the prompt;
        a completion over max_target_length is cut and keeps its EOS, and a prompt too long loses its middle
        (`keep_ends`). Evaluation features also hold the prompt `generate` starts from (`prompt_ids`): cut to leave
        max_new_tokens positions free, and the same for a row whether it has a completion (eval) or not (predict).
        Plain language modelling trains on the text's beginning; `predict` continues the text."""
        eos = tokenizer.eos_token_id
        sequence_limit, prompt_limit = self._within_context(max_seq_length), self._prompt_limit(max_seq_length)
        if self.plain_lm:
            texts = tokenizer(self._sources(batch))["input_ids"]
            ids = [x[: sequence_limit - 1] + [eos] for x in texts]
            features = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": ids,
                        TRUNCATED_INPUT: [int(len(x) >= sequence_limit) for x in texts]}
            if not training:  # evaluation scores the loss only; `predict` continues the text
                features["prompt_ids"] = [keep_ends(x, prompt_limit) for x in texts]
            return features
        prompts = tokenizer([s + self.spec.separator for s in self._sources(batch)])["input_ids"]
        target_limit = min(self.max_target_length, sequence_limit - 1)  # one prompt token at least
        features = {"input_ids": [], "attention_mask": [], "prompt_ids": [], TRUNCATED_INPUT: []}
        if labelled:
            completions = tokenizer(list(batch[self.target_column]), add_special_tokens=False)["input_ids"]
            features.update(labels=[], **{TRUNCATED_TARGET: [int(len(c) + 1 > target_limit) for c in completions]})
        for i, prompt in enumerate(prompts):
            generation_prompt = keep_ends(prompt, prompt_limit)
            cut = not training and len(generation_prompt) < len(prompt)
            if labelled:
                completion = completions[i][: target_limit - 1] + [eos]
                sequence_prompt = keep_ends(prompt, sequence_limit - len(completion))
                cut = cut or len(sequence_prompt) < len(prompt)
                features["input_ids"].append(sequence_prompt + completion)
                features["labels"].append([-100] * len(sequence_prompt) + completion)
            else:
                features["input_ids"].append(generation_prompt)
            features["attention_mask"].append([1] * len(features["input_ids"][-1]))
            features["prompt_ids"].append(generation_prompt)
            features[TRUNCATED_INPUT].append(int(cut))
        if training:
            del features["prompt_ids"]
        return features

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def generation_inputs(self, features) -> list[list[int]]:
        """What `generate` starts from for each row: the source (encoder-decoder) or the prompt (decoder-only)."""
        return list(features["prompt_ids" if self.model_kind == "causal-lm" else "input_ids"])

    # -- metrics and predictions -----------------------------------------------------------------------

    def compute_metrics(self, predictions, raw, features):
        metrics = {}
        if "loss" in self.metric_names and predictions.get("tokens"):
            loss = predictions["loss_sum"] / predictions["tokens"]
            metrics.update(loss=loss, perplexity=math.exp(min(loss, 700.0)))
        if self.plain_lm:
            return metrics
        sources, texts = self._sources(raw), predictions["texts"]
        references: dict[str, list[str]] = {}
        generated: dict[str, str] = {}
        for source, reference, text in zip(sources, raw[self.target_column], texts):
            references.setdefault(source, []).append(reference)
            generated.setdefault(source, text)
        order = list(references)
        hypotheses = [generated[s] for s in order]
        refs = [references[s] for s in order]
        names = [m for m in self.metric_names if m in ROUGE]
        if names:
            metrics.update(rouge(hypotheses, refs, names))
        if "bleu" in self.metric_names:
            metrics["bleu"] = bleu(hypotheses, refs)
        if "chrf" in self.metric_names:
            metrics["chrf"] = chrf(hypotheses, refs)
        return metrics

    def prediction_inputs(self, path: Path):
        columns = read_table(path)
        self.check_rows(to_dataset(columns), str(path), labelled=False)  # a missing column: the file's real ones
        wanted = [self.text_column] if self.plain_lm else [self.source_column]
        raw = to_dataset({c: columns[c] for c in wanted})
        return raw, row_ids(columns)

    def prediction_records(self, predictions, raw, features):
        return [{"text": text} for text in predictions["texts"]]


def keep_ends(ids: list[int], limit: int) -> list[int]:
    """`ids` within `limit` tokens, the middle given up: the first half of the room keeps the beginning (an
    instruction, an article's lead), the rest the end (the latest text, and the separator the completion follows)."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


for _spec in SPECS:
    register_task(GenerationTask(_spec))

"""Text generation: summarisation (`xsum`, `cnn_dailymail`), data-to-text (`e2e_nlg`), and your own
source -> target (`seq2seq`) or prompt -> completion / plain-text (`causal-lm`) data.

The model decides how a pair is fed (`for_model`): an encoder-decoder model (BART, T5) reads the source and is
trained on the target; a decoder-only model (GPT-2, Llama, Qwen, Mistral) reads prompt + completion as one
sequence with the loss on the completion only (the prompt is the source followed by the task's separator), or,
for plain language modelling (`--task causal-lm` with `--text-column` alone), the loss on every token.

Two task classes share `GenerationTask`: `Seq2SeqGeneration` (an encoder-decoder model) and `CausalGeneration` (a
decoder-only model); `for_model` turns a registered task into the one that fits the model (a benchmark runs on
either). `CausalData` is `--task causal-lm`: prompt -> completion, or plain text.

Evaluation (`inference.generation_outputs`) gives the mean token loss, its perplexity, and the text `generate`
writes with the task's settings: the papers' beam size, length penalty and lengths for the benchmarks, greedy
decoding for your own data, each settable (`--set num_beams=4`). The text metrics (`text_metrics`: ROUGE-1/2/L/Lsum
from `rouge-score`, best over a source's references; corpus BLEU and chrF from `sacrebleu` over all references of a
source) score text in any script, on the 0-100 scale the papers print. Sources with several references (E2E) are
generated once and scored against all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adalora_cli.data import pick_column, read_table, row_ids, to_dataset
from adalora_cli.errors import UserError
from adalora_cli.tasks.base import (TRUNCATED_INPUT, TRUNCATED_TARGET, DatasetSettings, EvalSplit, UserDataTask,
                                    encode_counting_cuts, setting)
from adalora_cli.tasks.registry import register_task
from adalora_cli.tasks.text_metrics import ROUGE, bleu, chrf, rouge

KIND_MODELS = {"seq2seq-lm": "an encoder-decoder model (BART, T5)",
               "causal-lm": "a decoder-only model (GPT-2, Llama, Qwen, Mistral)"}
GENERATION_SETTINGS = ("num_beams", "length_penalty", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size")
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
    hub_dataset: str | None = None
    hub_config: str | None = None
    generation: dict[str, Any] = field(default_factory=lambda: {"num_beams": 1, "max_new_tokens": 64})
    max_seq_length: int = 512
    max_target_length: int = 128
    separator: str = "\n"  # between source and target when a decoder-only model reads them as one sequence


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
]
SEQ2SEQ = GenerationSpec("seq2seq", ("source", "input", "document", "article"), ("target", "output", "summary"),
                         ROUGE + ("bleu", "chrf", "loss", "perplexity"), "rougeL")
CAUSAL_LM = GenerationSpec("causal-lm", ("prompt",), ("completion",), ROUGE + ("bleu", "chrf", "loss", "perplexity"),
                           "rougeL", separator="")


@dataclass
class GenerationSettings(DatasetSettings):
    """The columns of the user's data (detected when not given), the target length and the decoding; None: the
    task's (the papers' for the benchmarks, greedy for your own data)."""

    source_column: str | None = setting("Generation: source text column.", column=True,
                                        shown="the task's (source / input / document ...)")
    target_column: str | None = setting("Generation: target text column.", column=True,
                                        shown="the task's (target / output / summary ...)")
    prompt_column: str | None = setting("causal-lm: prompt column.", column=True, shown="prompt")
    completion_column: str | None = setting("causal-lm: completion column (the loss is on it only).", column=True,
                                            shown="completion")
    text_column: str | None = setting("causal-lm: text column of plain language modelling (the loss on every "
                                      "token).", column=True, shown="text")
    max_target_length: int | None = setting("Generation: target tokens kept.", shown="the task's")
    num_beams: int | None = setting("Generation: beams of `generate` (1: greedy).", shown="the task's")
    length_penalty: float | None = setting("Generation: beam search's length penalty.", shown="the task's")
    max_new_tokens: int | None = setting("Generation: most tokens generated.", shown="the task's")
    min_new_tokens: int | None = setting("Generation: fewest tokens generated.", shown="the task's")
    no_repeat_ngram_size: int | None = setting("Generation: n-grams never repeated (0: any).", shown="the task's")

    def validate(self) -> None:
        self.require_positive("max_target_length", "num_beams", "max_new_tokens")


class GenerationTask(UserDataTask):
    """What both ways of generating share: data, columns, settings, decoding, metrics, predictions. A subclass says
    how a row becomes model features (`_features`), what `generate` starts from (`generation_inputs`) and whether
    the model is decoder-only (`decoder_only`: the loss shifts by one, prompts are left-padded and cut off the
    output), which `inference.generation_outputs` is told."""

    num_labels = 0
    settings_class = GenerationSettings
    decoder_only = False
    column_flags = ("--source-column", "--target-column")

    def __init__(self, spec: GenerationSpec, variants: dict[str, type["GenerationTask"]]):
        """`variants`: the task class for each model kind that can do the task (`models.language_model_kind`)."""
        self.spec = spec
        self.variants = variants
        self.name = spec.name
        self.metric_names = spec.metrics
        self.default_max_seq_length = spec.max_seq_length
        self.eval_splits = (EvalSplit("validation"),)
        self.context_length: int | None = None  # positions the model reads, from its config (`for_model`)

    # -- settings --------------------------------------------------------------------------------------

    @property
    def source_column(self) -> str | None:
        """The source (a decoder-only model's prompt) column; --prompt-column names it too."""
        return self.settings.prompt_column or self.settings.source_column

    @property
    def target_column(self) -> str | None:
        return self.settings.completion_column or self.settings.target_column

    @property
    def max_target_length(self) -> int:
        given = self.settings.max_target_length
        return self.spec.max_target_length if given is None else given

    @property
    def generation(self) -> dict[str, Any]:
        """The task's decoding settings with the run's given ones over them."""
        given = {key: getattr(self.settings, key) for key in GENERATION_SETTINGS}
        return {**self.spec.generation, **{key: value for key, value in given.items() if value is not None}}

    def decoding(self) -> dict[str, Any]:
        """Every decoding setting `generate` runs with (no sampling; the beam-search ones only with beams), so that
        nothing is left for the checkpoint's generation_config.json to fill in."""
        settings = {**GREEDY, **self.generation}
        if settings["num_beams"] > 1:
            return {**BEAM_SEARCH, **settings}
        return {key: value for key, value in settings.items() if key not in BEAM_SEARCH}

    def resolved_settings(self) -> dict[str, Any]:
        decoding = {key: value for key, value in self.generation.items() if key in GENERATION_SETTINGS}
        return {**dataclasses.asdict(self.settings), "max_target_length": self.max_target_length, **decoding}

    @property
    def main_metric(self) -> str:
        return self.spec.main_metric

    @property
    def input_column(self) -> str | None:
        """The column `generate` reads (and that a held-out share keeps together with all its references)."""
        return self.source_column

    @property
    def group_columns(self) -> tuple[str, ...]:
        """A held-out share takes a source (prompt, text) with all its references."""
        return (self.input_column,)

    @property
    def model_advice(self) -> str:
        return " or ".join(KIND_MODELS[kind] for kind in self.variants)

    def for_model(self, config) -> "GenerationTask":
        """This task as the class that fits the model (`variants`), knowing the model's context."""
        from adalora_cli.models import context_length, language_model_kind

        kind = language_model_kind(config)
        if kind is None:
            raise UserError(f"{self.name} generates text, which a {config.model_type} model cannot; use "
                            f"{self.model_advice}")
        if kind not in self.variants:
            hint = ("--task causal-lm with --prompt-column and --completion-column" if kind == "causal-lm"
                    else "--task seq2seq with --source-column and --target-column")
            raise UserError(f"--task {self.name} needs a {' or '.join(self.variants)} model, and {config.model_type} "
                            f"is a {kind} model; use {hint}")
        task = self.variants[kind](self.spec, self.variants)
        task._settings = self._settings
        task.context_length = context_length(config)
        new_tokens = task.decoding()["max_new_tokens"]
        if task.context_length is not None and new_tokens >= task.context_length:
            raise UserError(f"max_new_tokens={new_tokens} does not fit the {task.context_length}-position context of "
                            f"this {config.model_type} model; use --set max_new_tokens={task.context_length // 4} (or "
                            f"another value below {task.context_length})")
        return task

    # -- what the rest of the code asks ----------------------------------------------------------------

    def outputs(self, model, features, tokenizer, batch_size, precision="fp32", progress=None, scoring=True):
        """The summed token loss of the labelled rows and its token count, and the text `generate` writes."""
        from adalora_cli.inference import decoding, generation_outputs

        inputs = self.generation_inputs(features) if self.generates_when(scoring) else None
        return generation_outputs(model, features, tokenizer, decoding(model, tokenizer, self), inputs, batch_size,
                                  precision, decoder_only=self.decoder_only, progress=progress)

    def generates_when(self, scoring: bool) -> bool:
        """Whether `outputs` generates text (when `scoring` an evaluation set, or predicting)."""
        return True

    def record(self, model, tokenizer) -> dict[str, Any]:
        """metrics.json and eval.json record the decoding used."""
        from adalora_cli.inference import decoding

        return {"decoding": decoding(model, tokenizer, self)}

    def generation_config(self, model, tokenizer) -> dict[str, Any]:
        """A merged export generates as the run was evaluated, not as the base checkpoint would."""
        from adalora_cli.inference import decoding

        return decoding(model, tokenizer, self)

    def length_limits(self, max_seq_length: int) -> str:
        context = f", the model's {self.context_length}-position context" if self.context_length else ""
        return f"--max-seq-length {max_seq_length}{context}"

    # -- data ------------------------------------------------------------------------------------------

    @property
    def hub_name(self) -> str | None:
        return self.settings.dataset or self.spec.hub_dataset

    @property
    def hub_config(self) -> str | None:
        return self.settings.dataset_config if self.settings.dataset else self.spec.hub_config

    def settings_from_data(self, raw, source: str) -> dict[str, Any]:
        """The source and target columns; a column named for one role is never detected for the other
        (`--source-column summary` leaves `summary` out of the target candidates)."""
        found = list(raw.column_names)
        named = self._named_columns()
        source_column = pick_column(found, self.source_column, self.spec.sources, "source", "--source-column", source,
                                    taken=named)
        return {"source_column": source_column,
                "target_column": pick_column(found, self.target_column, self.spec.targets, "target",
                                             "--target-column", source, taken=named + (source_column,))}

    def _named_columns(self) -> tuple[str | None, ...]:
        return self.source_column, self.target_column, self.settings.text_column

    def _text_columns(self, labelled: bool) -> list[tuple[str, str]]:
        columns = [(self.source_column, self.column_flags[0])]
        return columns + [(self.target_column, self.column_flags[1])] if labelled else columns

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

    def labelled(self, raw) -> bool:
        """Whether `raw` holds what the loss is computed on."""
        return self.target_column in raw.column_names

    def preprocess(self, raw, tokenizer, max_seq_length, training):
        labelled = self.labelled(raw)

        def tokenize(batch):
            return self._features(batch, tokenizer, max_seq_length, labelled, training)

        return raw.map(tokenize, batched=True, remove_columns=raw.column_names)

    def _features(self, batch, tokenizer, max_seq_length: int, labelled: bool, training: bool) -> dict[str, list]:
        raise NotImplementedError

    def _sources(self, batch) -> list[str]:
        return list(batch[self.input_column])

    def _within_context(self, length: int) -> int:
        return length if self.context_length is None else min(length, self.context_length)

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def generation_inputs(self, features) -> list[list[int]]:
        """What `generate` starts from for each row."""
        raise NotImplementedError

    # -- metrics and predictions -----------------------------------------------------------------------

    def _loss_metrics(self, predictions) -> dict[str, float]:
        if "loss" not in self.metric_names or not predictions.get("tokens"):
            return {}
        loss = predictions["loss_sum"] / predictions["tokens"]
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    def compute_metrics(self, predictions, raw, features):
        metrics = self._loss_metrics(predictions)
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
        raw = to_dataset({self.input_column: columns[self.input_column]})
        return raw, row_ids(columns)

    def prediction_records(self, predictions, raw, features):
        return [{"text": text} for text in predictions["texts"]]


class Seq2SeqGeneration(GenerationTask):
    """An encoder-decoder model (BART, T5) reads the source and is trained on the target."""

    auto_model = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"

    def _features(self, batch, tokenizer, max_seq_length, labelled, training):
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

    def generation_inputs(self, features) -> list[list[int]]:
        return list(features["input_ids"])


class CausalGeneration(GenerationTask):
    """A decoder-only model (GPT-2, Llama, Qwen, Mistral) reads prompt + completion as one sequence, the loss on
    the completion only; the prompt is the source followed by the task's separator."""

    auto_model = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    decoder_only = True

    def _prompt_limit(self, max_seq_length: int) -> int:
        """The longest prompt a decoder-only model generates from: --max-seq-length, leaving max_new_tokens of the
        model's context free (`for_model` has checked that they fit)."""
        if self.context_length is None:
            return max_seq_length
        return min(max_seq_length, self.context_length - self.decoding()["max_new_tokens"])

    def _features(self, batch, tokenizer, max_seq_length, labelled, training):
        """prompt + completion + EOS within --max-seq-length and the model's context, labels -100 over the prompt;
        a completion over max_target_length is cut and keeps its EOS, and a prompt too long loses its middle
        (`keep_ends`). Evaluation features also hold the prompt `generate` starts from (`prompt_ids`): cut to leave
        max_new_tokens positions free, and the same for a row whether it has a completion (eval) or not (predict)."""
        eos = tokenizer.eos_token_id
        sequence_limit, prompt_limit = self._within_context(max_seq_length), self._prompt_limit(max_seq_length)
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

    def generation_inputs(self, features) -> list[list[int]]:
        return list(features["prompt_ids"])


class CausalData(CausalGeneration):
    """`--task causal-lm`, your own data: prompt -> completion (`--prompt-column`, `--completion-column`), or plain
    language modelling on a text column (`--text-column` alone: the loss on every token, perplexity its metric,
    nothing generated when scoring; `predict` continues the text)."""

    column_flags = ("--prompt-column", "--completion-column")

    @property
    def plain_text(self) -> bool:
        """Only a text column: language modelling, no target to generate."""
        return self.source_column is None and self.settings.text_column is not None

    @property
    def main_metric(self) -> str:
        return "perplexity" if self.plain_text else self.spec.main_metric

    @property
    def input_column(self) -> str | None:
        return self.settings.text_column if self.plain_text else self.source_column

    def generates_when(self, scoring: bool) -> bool:
        return not (scoring and self.plain_text)

    def settings_from_data(self, raw, source: str) -> dict[str, Any]:
        """The prompt and completion columns, or without a prompt column the text column."""
        found = list(raw.column_names)
        named = self._named_columns()
        prompt = pick_column(found, self.source_column, self.spec.sources, "prompt", "--prompt-column", source,
                             required=False, taken=named)
        if prompt is None:  # plain language modelling on a text column
            return {"text_column": pick_column(found, self.settings.text_column, ("text",), "prompt or text",
                                               "--prompt-column (with --completion-column) or --text-column",
                                               source, taken=named)}
        return {"prompt_column": prompt, "completion_column": pick_column(
            found, self.target_column, self.spec.targets, "completion", "--completion-column", source,
            taken=named + (prompt,))}

    def _text_columns(self, labelled: bool) -> list[tuple[str, str]]:
        return [(self.input_column, "--text-column")] if self.plain_text else super()._text_columns(labelled)

    def labelled(self, raw) -> bool:
        return self.plain_text or super().labelled(raw)

    def _features(self, batch, tokenizer, max_seq_length, labelled, training):
        """Plain language modelling trains on the text's beginning; `predict` continues the text."""
        if not self.plain_text:
            return super()._features(batch, tokenizer, max_seq_length, labelled, training)
        eos = tokenizer.eos_token_id
        sequence_limit, prompt_limit = self._within_context(max_seq_length), self._prompt_limit(max_seq_length)
        texts = tokenizer(self._sources(batch))["input_ids"]
        ids = [x[: sequence_limit - 1] + [eos] for x in texts]
        features = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": ids,
                    TRUNCATED_INPUT: [int(len(x) >= sequence_limit) for x in texts]}
        if not training:  # evaluation scores the loss only; `predict` continues the text
            features["prompt_ids"] = [keep_ends(x, prompt_limit) for x in texts]
        return features

    def compute_metrics(self, predictions, raw, features):
        return self._loss_metrics(predictions) if self.plain_text else super().compute_metrics(predictions, raw,
                                                                                               features)


def keep_ends(ids: list[int], limit: int) -> list[int]:
    """`ids` within `limit` tokens, the middle given up: the first half of the room keeps the beginning (an
    instruction, an article's lead), the rest the end (the latest text, and the separator the completion follows)."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


BOTH = {"seq2seq-lm": Seq2SeqGeneration, "causal-lm": CausalGeneration}
for _spec in SPECS:
    register_task(Seq2SeqGeneration(_spec, BOTH))
register_task(Seq2SeqGeneration(SEQ2SEQ, {"seq2seq-lm": Seq2SeqGeneration}))
register_task(CausalData(CAUSAL_LM, {"causal-lm": CausalData}))

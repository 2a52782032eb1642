"""Running a model over model features: one forward per batch (`model_outputs`), or, for a task that generates,
the teacher-forced token loss and the text `generate` writes (`generation_outputs`, with `decoding`: every setting
it runs with). Tasks call these from `Task.outputs`; nothing here knows where the features came from, how they are
scored, or which task they belong to.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from adalora_cli import devices, distributed

if TYPE_CHECKING:
    from adalora_cli.tasks import Task


def model_outputs(model, features, tokenizer, batch_size: int, precision: devices.Precision | str = "fp32",
                  progress: str | None = None):
    """The model's outputs (all but the loss) over `features`, in order, as float32 numpy arrays, computed under
    the autocast of `precision` (resolved); with `progress`, a progress bar of that title on stderr."""
    from transformers import DataCollatorWithPadding

    columns = [c for c in tokenizer.model_input_names if c in features.column_names]
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    outputs: list[tuple[np.ndarray, ...]] = []
    starts = range(0, len(features), batch_size)
    with torch.no_grad(), devices.autocast(precision, device):
        for start in _progress(starts, progress):
            rows = features[start:start + batch_size]
            batch = collate([{c: rows[c][i] for c in columns} for i in range(len(rows[columns[0]]))])
            result = model(**{k: v.to(device) for k, v in batch.items()})
            outputs.append(tuple(v.float().cpu().numpy() for k, v in result.items() if k != "loss"))
    return tuple(_concat_padded([o[i] for o in outputs]) for i in range(len(outputs[0]))) if outputs else ()


def _progress(batches, title: str | None):
    """`batches` with a progress bar of that title on stderr, drawn only on a terminal (none in a log file)."""
    from tqdm.auto import tqdm

    return tqdm(batches, desc=title, disable=title is None or not sys.stderr.isatty(), file=sys.stderr, unit="batch")


def _concat_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis, padding the sequence axis (per-token outputs) with -inf."""
    if arrays[0].ndim < 2 or all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                  constant_values=-np.inf) for a in arrays])


def sharded_outputs(compute, features, batch_size: int):
    """`compute(features)` (a task's outputs) shared out among the processes of torchrun: each runs it on its shard
    of the rows (whole batches, `distributed.shard_bounds`), and every process returns the merged outputs of all
    rows, in order, as one process computes them. In a single process: `compute(features)`."""
    if distributed.rank_and_size()[1] == 1:
        return compute(features)
    start, end = distributed.shard_bounds(len(features), batch_size)
    shard = features.select(range(start, end) if end > start else [])  # `datasets` refuses an empty range at the end
    return merge_outputs(distributed.gather_parts(compute(shard)))


def merge_outputs(parts: list):
    """One output of consecutive shards of rows: arrays (rows first) concatenated in order, the sequence axis padded
    as one process pads it (`_concat_padded`); dictionaries (generation) with numbers summed and per-row lists
    concatenated. A shard without rows gave () (no arrays) or empty lists and zeros, which change nothing."""
    kept = [part for part in parts if len(part)]
    if not kept:
        return parts[0]
    if isinstance(kept[0], dict):
        return {key: [item for part in kept for item in part[key]] if isinstance(kept[0][key], list)
                else sum(part[key] for part in kept) for key in kept[0]}
    return tuple(_concat_padded([part[i] for part in kept]) for i in range(len(kept[0])))


def generation_outputs(model, features, tokenizer, settings: dict[str, Any], inputs: list[list[int]] | None,
                       batch_size: int, precision: devices.Precision | str = "fp32", decoder_only: bool = False,
                       progress: str | None = None) -> dict[str, Any]:
    """What a generation task is scored on: the summed token loss of the labelled rows and its token count
    (teacher forcing), and the text `generate` writes with `settings` (`decoding`) from `inputs`, one per row (each
    distinct input generated once: E2E's meaning representations have several references); `inputs` None: no
    text. `decoder_only`, told by the task: the model continues its input (its logits predict the next token,
    prompts are left-padded and the prompt is cut off the output)."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad(), devices.autocast(precision, device):
        if "labels" in features.column_names:
            for start in range(0, len(features), batch_size):
                rows = features[start:start + batch_size]
                loss, count = _token_loss(model, rows, pad, decoder_only, device)
                loss_sum, tokens = loss_sum + loss, tokens + count
        texts = []
        if inputs is not None:
            distinct = list(dict.fromkeys(tuple(ids) for ids in inputs))
            written = {}
            starts = range(0, len(distinct), batch_size)
            for start in _progress(starts, progress):
                chunk = distinct[start:start + batch_size]
                for ids, text in zip(chunk, _generate(model, tokenizer, chunk, settings, decoder_only, device)):
                    written[ids] = text
            texts = [written[tuple(ids)] for ids in inputs]
    return {"loss_sum": loss_sum, "tokens": tokens, "texts": texts}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def decoding(model, tokenizer, task: Task) -> dict[str, Any]:
    """The whole of what `generate` runs with: the task's settings (`task.decoding()`), the tokenizer's end-of-text
    token (the one training appends) and padding, an encoder-decoder model's decoder start. Nothing comes from the
    checkpoint's generation_config.json (min_length, max_length, forced tokens, sampling), so train-time evaluation,
    `adalora eval` and `adalora predict` decode alike on any checkpoint; metrics.json and eval.json record it."""
    settings = {**task.decoding(), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": _pad_id(tokenizer)}
    if getattr(model.config, "is_encoder_decoder", False):
        start = getattr(model.config, "decoder_start_token_id", None)
        settings["decoder_start_token_id"] = start if start is not None else \
            model.generation_config.decoder_start_token_id
    return settings


@contextlib.contextmanager
def _only_these_settings(model, config):
    """`generate` fills every setting its `generation_config` leaves unset from `model.generation_config` (the
    checkpoint's file) before the library's defaults; with `config` standing in for it, only the library's remain."""
    shipped = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = shipped


def _padded(sequences: list[list[int]], value: int, left: bool, device) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [[value] * (width - len(s)) + list(s) if left else list(s) + [value] * (width - len(s)) for s in sequences]
    return torch.tensor(rows, device=device)


def _token_loss(model, rows: dict, pad: int, next_token: bool, device) -> tuple[float, int]:
    """(summed cross-entropy over the label tokens, their count) of one batch, computed from the logits so that
    every model counts the same tokens (`next_token`: a decoder-only model predicts token t+1 from position t)."""
    import torch.nn.functional as F

    input_ids = _padded(rows["input_ids"], pad, False, device)
    attention = _padded(rows["attention_mask"], 0, False, device)
    labels = _padded(rows["labels"], -100, False, device)
    if next_token:
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        labels = labels[:, 1:]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention, labels=labels).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return float(loss), int((labels != -100).sum())


def _generate(model, tokenizer, inputs: list[tuple[int, ...]], settings: dict, continues_input: bool,
              device) -> list[str]:
    """`generate` with `settings` (`decoding`) on a batch of inputs, decoded; `continues_input` (a decoder-only
    model): the inputs are left-padded and the output, which starts with them, is decoded without them."""
    from transformers import GenerationConfig

    input_ids = _padded(inputs, settings["pad_token_id"], continues_input, device)
    attention = _padded([[1] * len(ids) for ids in inputs], 0, continues_input, device)
    config = GenerationConfig(**settings)
    with _only_these_settings(model, config):
        generated = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
    if continues_input:
        generated = generated[:, input_ids.shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]

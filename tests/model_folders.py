"""Local model folders shaped like the hub checkpoints our users load, built in seconds with no download.

    python tests/model_folders.py deberta-v3 OUT_DIR [--sentences GLUE_TSV]
    python tests/model_folders.py float16 SRC_DIR OUT_DIR
    python tests/model_folders.py generator {bart,t5,gpt2} OUT_DIR [--squad SQUAD_JSON]

`deberta_v3_folder` reproduces microsoft/deberta-v3-base's shape: a DebertaV2 model whose weights are stored in
float16 with no dtype in config.json, and a SentencePiece tokenizer saved as `spm.model` +
`tokenizer_config.json` with no `tokenizer.json` (transformers converts it on load, which needs the
sentencepiece and protobuf packages). The SentencePiece model is trained here on real sentences.
`float16_copy` rounds any checkpoint to float16 that same way.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path


def glue_sentences(tsv: Path, limit: int = 3000) -> list[str]:
    """The first `limit` sentences of a GLUE TSV with a `sentence` column (SST-2)."""
    with open(tsv, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    column = rows[0].index("sentence")
    return [row[column] for row in rows[1:limit + 1]]


def train_sentencepiece(sentences: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model with DeBERTa-v3's special pieces ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3,
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    return model.getvalue()


def strip_dtype(folder: Path) -> None:
    """Drop the dtype that save_pretrained records, as in checkpoints published before it existed."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    path.write_text(json.dumps(config, indent=2))


def deberta_v3_folder(out: Path, sentences: list[str], vocab_size: int = 1000, seed: int = 0) -> Path:
    """A tiny DeBERTa-v3 (2 layers, hidden 32) in the hub's shape: float16 weights, spm.model, no tokenizer.json."""
    import torch
    from transformers import AutoModel, DebertaV2Config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spm.model").write_bytes(train_sentencepiece(sentences, vocab_size))
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    config = DebertaV2Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, relative_attention=True, position_buckets=32, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, pooler_hidden_size=32,
        position_biased_input=False, pad_token_id=0, type_vocab_size=0)
    torch.manual_seed(seed)
    AutoModel.from_config(config).half().save_pretrained(out)
    strip_dtype(out)
    return out


def byte_level_bpe(sentences: list[str], specials: list[str], vocab_size: int = 1000):
    """A byte-level BPE tokenizer (GPT-2's and BART's kind) trained here with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer


def generator_folder(kind: str, out: Path, sentences: list[str], seed: int = 0) -> Path:
    """A tiny randomly initialised generator with a tokenizer trained here: `bart` (encoder-decoder, byte-level BPE),
    `t5` (encoder-decoder, SentencePiece) or `gpt2` (decoder-only, Conv1D projections, byte-level BPE)."""
    import torch
    from tokenizers import processors
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, BartTokenizerFast, GPT2Config,
                              GPT2TokenizerFast, T5Config, T5Tokenizer)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "gpt2":
        tokenizer = GPT2TokenizerFast(tokenizer_object=byte_level_bpe(sentences, ["<|endoftext|>"]),
                                      bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config)
    elif kind == "bart":
        bpe = byte_level_bpe(sentences, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        tokenizer = BartTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                      cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
        config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=1, bos_token_id=0,
                            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
        model = AutoModelForSeq2SeqLM.from_config(config)
    elif kind == "t5":
        import sentencepiece as spm

        spiece = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=spiece, vocab_size=1000,
                                       model_type="unigram", pad_id=0, pad_piece="<pad>", eos_id=1,
                                       eos_piece="</s>", unk_id=2, unk_piece="<unk>", bos_id=-1, minloglevel=2)
        (out / "spiece.model").write_bytes(spiece.getvalue())
        tokenizer = T5Tokenizer.from_pretrained(out, extra_ids=0)
        config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def float16_copy(src: str, out: Path) -> Path:
    """`src` (a model folder) with its weights rounded to float16 and no dtype in its config."""
    from transformers import AutoModel, AutoTokenizer

    out = Path(out)
    AutoModel.from_pretrained(src).half().save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    strip_dtype(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    deberta = sub.add_parser("deberta-v3")
    deberta.add_argument("out", type=Path)
    deberta.add_argument("--sentences", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                         / "glue" / "SST-2" / "train.tsv")
    half = sub.add_parser("float16")
    half.add_argument("src")
    half.add_argument("out", type=Path)
    generator = sub.add_parser("generator")
    generator.add_argument("arch", choices=["bart", "t5", "gpt2"])
    generator.add_argument("out", type=Path)
    generator.add_argument("--squad", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                           / "squad" / "dev-v1.1.json")
    args = parser.parse_args(argv)
    if args.kind == "deberta-v3":
        print(deberta_v3_folder(args.out, glue_sentences(args.sentences)))
    elif args.kind == "generator":
        from own_data import squad_questions

        questions = squad_questions(args.squad)[:3000]
        sentences = [q["question"] for q in questions] + list(dict.fromkeys(q["context"] for q in questions))
        print(generator_folder(args.arch, args.out, sentences))
    else:
        print(float16_copy(args.src, args.out))


if __name__ == "__main__":
    sys.exit(main())

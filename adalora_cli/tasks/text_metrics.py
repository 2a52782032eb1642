"""Text metrics of the generation tasks, for text in any script: ROUGE (rouge-score, with the Unicode tokenizer
below), BLEU and chrF (sacrebleu), each on the 0-100 scale. docs/generation.md, "Metrics and tokenisation", says
which tokenisation each metric uses.

rouge-score's own tokenizer keeps only [a-z0-9] and sacrebleu's default (13a) splits on spaces, so Russian scored
ROUGE 0 and Chinese ROUGE and BLEU 0 even for a perfect copy of the reference. Here ROUGE counts words of every
script (Chinese, Japanese, Thai, Lao, Khmer and Myanmar, written without spaces, one character at a time) and BLEU's
tokenisation follows the references' script. English text in ASCII still scores exactly as rouge-score's default
does, so English numbers stay comparable with the papers'.
"""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Sequence

import regex

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Scripts written without spaces between words: a token is one character (with its combining marks). Script
# extensions (scx) also count the marks shared by two of them, such as the kana long-vowel mark ー.
_KANA = r"\p{scx=Hiragana}\p{scx=Katakana}"
_HAN = r"\p{scx=Han}"
_SOUTHEAST_ASIAN = r"\p{scx=Thai}\p{scx=Lao}\p{scx=Khmer}\p{scx=Myanmar}"
_UNSPACED = _KANA + _HAN + _SOUTHEAST_ASIAN
_TOKEN = regex.compile(
    rf"[[\p{{L}}\p{{N}}]&&[{_UNSPACED}]]\p{{M}}*"  # one character of an unspaced script
    rf"|(?:[[\p{{L}}\p{{N}}]--[{_UNSPACED}]]\p{{M}}*)+",  # a word: a run of letters and digits of any other script
    regex.V1)
_SCRIPT_GROUPS = {"kana": regex.compile(rf"[{_KANA}]"), "han": regex.compile(_HAN),
                  "hangul": regex.compile(r"\p{scx=Hangul}"),
                  "southeast-asian": regex.compile(rf"[{_SOUTHEAST_ASIAN}]")}

# English references: at most 0.8% of their letters are not ASCII a-z. SQuAD dev's English Wikipedia has 0.05%,
# 0.45% in its article with the most foreign names (Yuan dynasty); Italian has about 1.1% (à è ù), German,
# Spanish, Portuguese, French and Swedish 2-4% (letter-frequency tables)
ENGLISH_ASCII_SHARE = 0.992

# Words after which a period does not end a sentence (lower-case, without the final period)
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt gen gov sen rep lt col capt sgt inc ltd corp co bros vs etc al cf "
    "e.g i.e a.m p.m u.s u.k u.n approx dept fig vol jan feb mar apr jun jul aug sep sept oct nov dec".split())
_CJK_SENTENCE_END = regex.compile(r"(?<=[。！？｡][」』”’）〕】\)\]]*)(?![」』”’）〕】\)\]])")

logger = logging.getLogger("adalora_cli")


# -- tokens ----------------------------------------------------------------------------------------------------

class UnicodeTokenizer:
    """rouge-score's tokenizer (lower-case, letters and digits, Porter stemmer on words longer than 3 letters)
    for any script: words are runs of Unicode letters, digits and combining marks, unspaced scripts give one
    token per character, and only ASCII words are stemmed (when `stem`, for English). The text is first
    NFKC-normalised (ASCII text is unchanged by it), so a composed é matches e + combining accent and full-width
    ２０２４ matches 2024, as SentencePiece models (T5, mT5) write them. Passed to rouge-score's RougeScorer, which
    only calls `tokenize`."""

    def __init__(self, stem: bool = False):
        self.stem = stem

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
        return [_porter(t) if len(t) > 3 and t.isascii() else t for t in tokens] if self.stem else tokens


@lru_cache(maxsize=2 ** 16)
def _porter(word: str) -> str:
    return _stemmer().stem(word)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()  # the stemmer rouge-score uses


def is_english(references: Sequence[Sequence[str]]) -> bool:
    """Whether ROUGE stems: the references' letters are (almost) all ASCII. No model decides the language; text
    in a Latin-script language without accents (Dutch, Indonesian) counts as English, as rouge-score treats all."""
    letters = regex.sub(r"\P{L}+", "", "".join(r for refs in references for r in refs))
    return bool(letters) and len(regex.sub(r"[A-Za-z]+", "", letters)) <= (1 - ENGLISH_ASCII_SHARE) * len(letters)


# -- sentences (ROUGE-Lsum) ------------------------------------------------------------------------------------

def split_sentences(text: str) -> list[str]:
    """The sentences of `text`: after 。！？ (with closing quotes), and after . ! ? followed by a space unless the
    word before the period is a known abbreviation (Mr., p.m., U.S., e.g.) or an initial. nltk's Punkt algorithm
    with that abbreviation list, so no sentence model is downloaded."""
    pieces = _CJK_SENTENCE_END.split(text)
    return [s.strip() for piece in pieces for s in _punkt().tokenize(piece) if s.strip()]


def sentence_lines(text: str) -> str:
    """One sentence per line, as rouge-score's ROUGE-Lsum expects."""
    return "\n".join(split_sentences(text))


@lru_cache(maxsize=1)
def _punkt():
    from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer

    class Terminators(PunktLanguageVars):
        sent_end_chars = (".", "?", "!", "।", "॥", "؟", "۔")  # with the Devanagari danda, Arabic and Urdu marks

    parameters = PunktParameters()
    parameters.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(parameters, lang_vars=Terminators())


# -- metrics ---------------------------------------------------------------------------------------------------

def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]], names: Sequence[str],
          stem: bool | None = None) -> dict[str, float]:
    """Mean ROUGE F1 x 100 (rouge-score with `UnicodeTokenizer`), each hypothesis against the best of its
    references; stemmed when the references are English (`is_english`) unless `stem` says."""
    from rouge_score import rouge_scorer

    stem = is_english(references) if stem is None else stem
    _note(f"ROUGE: Unicode words, CJK and Thai-family characters one by one, "
          f"{'Porter stemming (English references)' if stem else 'no stemming (references not English)'}")
    scorer = rouge_scorer.RougeScorer(list(names), tokenizer=UnicodeTokenizer(stem))
    totals = {name: 0.0 for name in names}
    for hypothesis, refs in zip(hypotheses, references):
        scores = scorer.score_multi([sentence_lines(r) for r in refs], sentence_lines(hypothesis))
        for name in names:
            totals[name] += scores[name].fmeasure
    return {name: 100 * total / max(len(hypotheses), 1) for name, total in totals.items()}


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str | None = None) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with every reference of a source, tokenised as `bleu_tokenize` picks for
    the references' script unless `tokenize` names one of sacrebleu's tokenizers."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    tokenize = tokenize or bleu_tokenize(references)
    _note(f"BLEU: sacrebleu tokenize={tokenize}")
    return float(sacrebleu.BLEU(tokenize=tokenize).corpus_score(list(hypotheses), _streams(references)).score)


def chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 1- to 6-grams, beta 2, spaces ignored) with every reference
    of a source; needs no tokenisation, so it scores every script alike."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    return float(sacrebleu.CHRF().corpus_score(list(hypotheses), _streams(references)).score)


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position; sources with fewer references pad with None."""
    width = max((len(r) for r in references), default=1)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def bleu_tokenize(references: Sequence[Sequence[str]]) -> str:
    """sacrebleu's tokenizer for the script most reference tokens are written in: `zh` for Chinese; `ja-mecab`
    for Japanese (kana are at least a tenth of the Han and kana characters) and `ko-mecab` for Korean when
    sacrebleu's MeCab extras are installed, else `char` (Japanese) and `13a` (Korean, written with spaces);
    `char` for Thai, Lao, Khmer and Myanmar; `13a` (sacrebleu's default) for everything else."""
    counts = Counter(_script_group(token) for refs in references for text in refs
                     for token in UnicodeTokenizer().tokenize(text))
    cjk = counts["han"] + counts["kana"]
    sizes = {"other": counts["other"], "cjk": cjk, "hangul": counts["hangul"],
             "southeast-asian": counts["southeast-asian"]}
    main = max(sizes, key=sizes.get)  # a tie (or no tokens at all) goes to the first: 13a
    if main == "cjk":
        if 10 * counts["kana"] < cjk:
            return "zh"
        return "ja-mecab" if mecab_available("ja-mecab") else "char"
    if main == "hangul":
        return "ko-mecab" if mecab_available("ko-mecab") else "13a"
    return "char" if main == "southeast-asian" else "13a"

def _script_group(token: str) -> str:
    return next((group for group, pattern in _SCRIPT_GROUPS.items() if pattern.match(token)), "other")


@lru_cache(maxsize=None)
def mecab_available(tokenize: str) -> bool:
    """Whether sacrebleu can build this MeCab tokenizer (`pip install sacrebleu[ja]` / `sacrebleu[ko]`)."""
    import sacrebleu

    try:
        sacrebleu.BLEU(tokenize=tokenize)
    except (ImportError, RuntimeError, AssertionError):
        return False
    return True


_noted: set[str] = set()


def _note(message: str) -> None:
    """Log how the metrics tokenise, once per process and choice (evaluation runs many times in training)."""
    if message not in _noted:
        _noted.add(message)
        logger.info(message)

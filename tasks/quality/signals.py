"""The query-free data-quality audit: per-document signals combined into issue types, and the report's I/O.

Which training documents are anomalous, memorised, duplicated or junk? Signals, and the issue each feeds:

================  ==================================================================================  ==============
signal            what it is                                                                          issue
================  ==================================================================================  ==============
self-influence    ``<∇L_d, (H + λI)^{-1} ∇L_d>`` from the EK-FAC factors (engine): the pull of the    outlier
                  document on its own loss; high for documents unlike the rest that the model still
                  moves for (Koh & Liang 2017; Pruthi et al. 2020; kronfluence)
loss              the model's mean NLL per target token (engine, same pass)                           outlier,
                                                                                                      memorised
zlib entropy      ``8 ln 2 · len(zlib(text)) / targets``: nats per token a generic compressor needs   memorised,
                  (Carlini et al. 2021 rank extracted training data by loss over zlib entropy)        low_quality
token rarity      mean ``-log p_unigram(token)`` over the targets, unigram counts of this corpus       memorised,
                                                                                                      low_quality
compression       ``len(zlib(text)) / len(text)``: random strings do not compress, boilerplate does   low_quality
char surprisal    mean surprisal of the UTF-8 byte pairs under this corpus's byte-bigram counts        low_quality
tokens per char   ``n_tokens / len(text)``: text the tokenizer was not built for falls apart            low_quality
MinHash           Jaccard similarity of character 5-gram sets within sentences (datasketch LSH), exact  near_duplicate
                  text hashes, and a signature of the distinctive shingles (held by few documents)
================  ==================================================================================  ==============

At convergence a memorised document has almost no gradient left, so its self-influence is among the
*lowest*: memorisation is found by its loss being far below what its text needs (zlib entropy, unigram rarity),
not by self-influence. Each issue's score is in [0, 1] (higher = more severe): for the z-based issues
``z / (z + cutoff)`` of the largest robust z-score over this corpus (median and MAD, Iglewicz & Hoaglin's modified
z) of its signals, so a score of 0.5 is the cut-off; for ``near_duplicate`` the similarity with the threshold at 0.5.
Of the documents above a cut-off, at most ``max_flagged`` of the corpus is flagged, most severe first. Copies form
groups: the first document of a group (corpus order) is kept and ``duplicate_group`` names it; the others are
flagged.

Plain functions (the CLI, the bench and the flow's tasks call them) and, at the bottom, the Prefect tasks of the
flow's quality mode (``mode: quality``).
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from influence_engine import DocumentSignals, Example, Factors, InfluenceEngine, UserError

ISSUE_TYPES: tuple[str, ...] = ("outlier", "memorised", "near_duplicate", "low_quality")
ABOUT: dict[str, str] = {
    "outlier": "Documents the model is pulled by far more than by the rest of the corpus (high self-influence), "
               "or cannot fit (high loss): mislabelled, contradicted or off-distribution text. A document's "
               "self-influence is the first-order effect of removing it on its own loss.",
    "memorised": "Documents whose loss is far below what their text needs (its zlib entropy or its tokens' "
                 "rarity): learned by rote rather than from regularities shared with other documents, as "
                 "training-data extraction attacks find them. Near-zero gradient: self-influence does not see them.",
    "near_duplicate": "Documents that are (near) copies of others (Jaccard similarity of character 5-grams "
                      "within sentences, MinHash LSH, sharing their distinctive text, not just boilerplate): they "
                      "count several times in training and in every influence ranking. The first of each group "
                      "is kept; the others are flagged.",
    "low_quality": "Text unlike the rest of the corpus: character noise, markup debris, encoding garbage, "
                   "incompressible strings, tokens that are rare here, or extremely repetitive text.",
}
REPORT_SCHEMA: dict[str, Any] = {
    "id": pl.String, "self_influence": pl.Float64, "loss": pl.Float64,
    **{c: t for issue in ISSUE_TYPES for c, t in ((f"{issue}_score", pl.Float64), (issue, pl.Boolean))},
    "reason": pl.String, "duplicate_group": pl.String, "severity": pl.Float64,
    "n_tokens": pl.Int64, "n_targets": pl.Int64, "zlib_entropy": pl.Float64, "token_rarity": pl.Float64,
    "compression_ratio": pl.Float64, "char_surprisal": pl.Float64, "tokens_per_char": pl.Float64,
    "max_similarity": pl.Float64, "duplicate_of": pl.String, "group_size": pl.Int64,
}
SIGNAL_SCHEMA: dict[str, Any] = {
    "id": pl.String, "self_influence": pl.Float64, "loss": pl.Float64, "n_tokens": pl.Int64, "n_targets": pl.Int64,
    "zlib_entropy": pl.Float64, "token_rarity": pl.Float64, "compression_ratio": pl.Float64,
    "char_surprisal": pl.Float64, "tokens_per_char": pl.Float64,
    "text_hash": pl.String, "minhash": pl.List(pl.UInt64), "minhash_distinct": pl.List(pl.UInt64),
    "n_distinct": pl.Int64,
}
HOT_SPOT_SCHEMA: dict[str, Any] = {
    "id": pl.String, "rank": pl.Int64, "position": pl.Int64, "token": pl.String, "self_influence": pl.Float64,
    "share": pl.Float64, "token_loss": pl.Float64,
}
MINHASH_SCHEME = "affine32"  # datasketch 2's default, pinned: signatures are stored and compared across processes
REVIEW_COLUMNS = ("query_id", "query_prompt", "query_completion", "train_id", "score", "rank", "snippet")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class QualitySettings:
    """How signals become flags. ``cutoff``: the robust z-score (median and MAD over this corpus) from which an
    issue is flagged; ``near_duplicate_threshold``: the Jaccard similarity of two documents' distinctive shingles
    from which they are near duplicates; ``max_flagged``: the largest share of the corpus flagged, most severe
    first (1: no bound); ``hot_spots``: token positions kept per document in the per-token Parquet (0: all).

    Shingles held by more than ``max(boilerplate_min_docs, boilerplate_share x documents)`` documents are shared
    phrasing or boilerplate, not copying. Two documents are near duplicates when the Jaccard similarity of their
    shingles reaches ``near_duplicate_threshold`` *and* they share at least ``distinct_containment`` of the
    smaller one's distinctive shingles (the others; a document with fewer than ``min_shingles`` keeps its
    rarest): sharing boilerplate alone does not make a copy, and an edit in a short document does not hide one."""

    cutoff: float = 3.5
    near_duplicate_threshold: float = 0.7
    max_flagged: float = 0.15
    candidate_threshold: float = 0.5  # LSH candidates from here: similarities below the flag still score
    num_perm: int = 128
    shingle: int = 5
    boilerplate_share: float = 0.01
    boilerplate_min_docs: int = 8
    min_shingles: int = 8
    distinct_containment: float = 0.5
    hot_spots: int = 10
    seed: int = 1

    def check(self) -> None:
        if not self.cutoff > 0:
            raise UserError(f"--cutoff {self.cutoff}: must be a positive robust z-score (3.5 is usual)")
        if not 0 < self.near_duplicate_threshold <= 1:
            raise UserError(f"--near-duplicate-threshold {self.near_duplicate_threshold}: give a Jaccard "
                            "similarity in (0, 1]")
        if not 0 <= self.max_flagged <= 1:
            raise UserError(f"--max-flagged {self.max_flagged}: give a share of the corpus in [0, 1] (1: no bound)")
        if self.hot_spots < 0:
            raise UserError(f"--hot-spots {self.hot_spots}: must be >= 0 (0 keeps every token)")

    def boilerplate_cap(self, n_docs: int) -> float:
        """A shingle held by more documents than this is boilerplate."""
        return max(float(self.boilerplate_min_docs), self.boilerplate_share * n_docs)


# ------------------------------------------------------------------------------------------ text signals


def document_text(row: dict[str, Any]) -> str:
    """What a document says: ``text``, or ``prompt`` + ``completion``."""
    text = row.get("text")
    return text if text is not None else f"{row.get('prompt') or ''}{row.get('completion') or ''}"


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def text_hash(text: str) -> str:
    """sha256 of the text with case and whitespace normalised: equal hashes are exact duplicates."""
    return hashlib.sha256(_normalised(text).encode()).hexdigest()


def compression_ratio(text: str) -> float:
    """Compressed bytes over raw bytes (zlib level 9)."""
    raw = text.encode()
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


def zlib_entropy(text: str, n_targets: int) -> float:
    """Nats per target token that zlib needs for the text."""
    return 8 * math.log(2) * len(zlib.compress(text.encode(), 9)) / max(n_targets, 1)


def unigram_counts(docs: Sequence[Example], vocab_size: int) -> np.ndarray:
    """Token counts over the documents' targets (add them up across shards)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for e in docs:
        counts += np.bincount(np.asarray(e.input_ids[e.target_start:], dtype=np.int64), minlength=vocab_size)
    return counts


def token_rarity(example: Example, counts: np.ndarray) -> float:
    """Mean unigram surprisal (nats) of the document's targets under the corpus counts (add-one smoothed)."""
    targets = np.asarray(example.input_ids[example.target_start:], dtype=np.int64)
    if targets.size == 0:
        return 0.0
    total = counts.sum() + counts.size
    return float(np.mean(np.log(total) - np.log(counts[targets] + 1.0)))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
SHINGLE_BITS = 22  # shingles are counted by document in 2**22 buckets (crc32): 16 MiB, collisions negligible


def _shingles(text: str, k: int) -> set[bytes]:
    """Character ``k``-grams of the normalised text that do not cross a sentence boundary, so that reordered
    sentences or paragraphs still match."""
    out: set[bytes] = set()
    for sentence in _SENTENCE_END.split(_normalised(text)):
        out |= {sentence[i:i + k].encode() for i in range(max(1, len(sentence) - k + 1))}
    return out


def _bucket(shingle: bytes) -> int:
    return zlib.crc32(shingle) & ((1 << SHINGLE_BITS) - 1)


def shingle_buckets(text: str, k: int) -> np.ndarray:
    """The distinct buckets of the text's shingles (what the document frequencies count)."""
    return np.unique(np.fromiter((_bucket(x) for x in _shingles(text, k)), dtype=np.int64))


def distinctive_shingles(text: str, settings: QualitySettings, df: np.ndarray | None = None,
                         n_docs: int = 0) -> list[bytes]:
    """The text's shingles less those held by more than :meth:`QualitySettings.boilerplate_cap` documents (``df``:
    documents per bucket over the corpus); a document left with fewer than ``min_shingles`` keeps its rarest."""
    sh = sorted(_shingles(text, settings.shingle))
    if df is None:
        return sh
    counts = np.array([df[_bucket(x)] for x in sh], dtype=np.int64)
    keep = counts <= settings.boilerplate_cap(n_docs)
    if keep.sum() >= min(settings.min_shingles, len(sh)):
        return [x for x, k in zip(sh, keep, strict=True) if k]
    order = np.lexsort((np.arange(len(sh)), counts))[: settings.min_shingles]
    return [sh[i] for i in sorted(order)]


def _minhash(shingles: Sequence[bytes], settings: QualitySettings) -> np.ndarray:
    from datasketch import MinHash

    m = MinHash(num_perm=settings.num_perm, seed=settings.seed, scheme=MINHASH_SCHEME)
    m.update_batch(list(shingles))
    return m.hashvalues.astype(np.uint64)


def minhash_values(text: str, settings: QualitySettings, df: np.ndarray | None = None,
                   n_docs: int = 0) -> np.ndarray:
    """The MinHash signature (datasketch) of the text's character shingles (its distinctive ones with ``df``)."""
    return _minhash(distinctive_shingles(text, settings, df, n_docs), settings)


def _bigram_index(text: str) -> np.ndarray:
    b = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8).astype(np.int64)
    return b[:-1] * 256 + b[1:]


def char_surprisal(text: str, bigrams: np.ndarray) -> float:
    """Mean surprisal (nats per byte) of the text's UTF-8 byte pairs under the corpus's byte-bigram counts
    (add-one smoothed): high for character noise, markup debris and encoding garbage in a corpus of prose."""
    idx = _bigram_index(text)
    if idx.size == 0:
        return 0.0
    table = bigrams.reshape(256, 256)
    first = table.sum(1)
    return float(np.mean(np.log(first[idx // 256] + 256.0) - np.log(bigrams[idx] + 1.0)))


@dataclass
class CorpusCounts:
    """What a document's text signals are measured against, summed over shards: token counts (token rarity),
    documents per shingle bucket (boilerplate), byte-bigram counts (character surprisal) and the documents."""

    tokens: np.ndarray
    shingle_df: np.ndarray
    char_bigrams: np.ndarray
    n_docs: int

    @classmethod
    def of(cls, docs: Sequence[Example], texts: Sequence[str], vocab_size: int,
           settings: QualitySettings) -> CorpusCounts:
        df = np.zeros(1 << SHINGLE_BITS, dtype=np.int32)
        bigrams = np.zeros(256 * 256, dtype=np.int64)
        for text in texts:
            df[shingle_buckets(text, settings.shingle)] += 1
            bigrams += np.bincount(_bigram_index(text), minlength=256 * 256)
        return cls(unigram_counts(docs, vocab_size), df, bigrams, len(texts))

    def __add__(self, other: CorpusCounts) -> CorpusCounts:
        n = max(len(self.tokens), len(other.tokens))
        tokens = np.zeros(n, dtype=np.int64)
        tokens[: len(self.tokens)] += self.tokens
        tokens[: len(other.tokens)] += other.tokens
        return CorpusCounts(tokens, self.shingle_df + other.shingle_df, self.char_bigrams + other.char_bigrams,
                            self.n_docs + other.n_docs)

    def with_vocab(self, vocab_size: int) -> CorpusCounts:
        tokens = np.zeros(vocab_size, dtype=np.int64)
        tokens[: min(vocab_size, len(self.tokens))] = self.tokens[:vocab_size]
        return CorpusCounts(tokens, self.shingle_df, self.char_bigrams, self.n_docs)

    def save(self, fh: Any) -> None:
        np.savez_compressed(fh, tokens=self.tokens, shingle_df=self.shingle_df, char_bigrams=self.char_bigrams,
                            n_docs=np.array(self.n_docs))

    @classmethod
    def load(cls, path: str | Path) -> CorpusCounts:
        with np.load(path) as z:
            return cls(z["tokens"], z["shingle_df"], z["char_bigrams"], int(z["n_docs"]))


# ------------------------------------------------------------------------------------------ engine + text


def signal_frame(signals: Sequence[DocumentSignals], rows: Sequence[dict[str, Any]], docs: Sequence[Example],
                 counts: CorpusCounts, settings: QualitySettings) -> pl.DataFrame:
    """One row per document: the engine's signals and the text's (:data:`SIGNAL_SCHEMA`)."""
    out: dict[str, list] = {k: [] for k in SIGNAL_SCHEMA}
    for s, row, e in zip(signals, rows, docs, strict=True):
        text = document_text(row)
        out["id"].append(s.id)
        out["self_influence"].append(s.self_influence)
        out["loss"].append(s.loss)
        out["n_tokens"].append(len(e.input_ids))
        out["n_targets"].append(s.n_targets)
        out["zlib_entropy"].append(zlib_entropy(text, s.n_targets))
        out["token_rarity"].append(token_rarity(e, counts.tokens))
        out["compression_ratio"].append(compression_ratio(text))
        out["char_surprisal"].append(char_surprisal(text, counts.char_bigrams))
        out["tokens_per_char"].append(len(e.input_ids) / max(len(text), 1))
        out["text_hash"].append(text_hash(text))
        out["minhash"].append(minhash_values(text, settings).tolist())
        distinct = distinctive_shingles(text, settings, counts.shingle_df, counts.n_docs)
        out["minhash_distinct"].append(_minhash(distinct, settings).tolist())
        out["n_distinct"].append(len(distinct))
    return pl.DataFrame(out, schema=SIGNAL_SCHEMA)


def hot_spot_frame(signals: Sequence[DocumentSignals], decode: Callable[[int], str] | None,
                   k: int) -> pl.DataFrame:
    """Per document its ``k`` token positions of largest self-influence (all with ``k`` = 0), with each one's
    share of the document's self-influence and the token's own loss (null when it is not a target)."""
    out: dict[str, list] = {c: [] for c in HOT_SPOT_SCHEMA}
    for s in signals:
        for rank, pos in enumerate(s.hot_spots(k), start=1):
            v = float(s.token_self_influence[pos])
            loss = float(s.token_loss[pos])
            out["id"].append(s.id)
            out["rank"].append(rank)
            out["position"].append(pos)
            out["token"].append(decode(s.token_ids[pos]) if decode else str(s.token_ids[pos]))
            out["self_influence"].append(v)
            out["share"].append(v / s.self_influence if s.self_influence else 0.0)
            out["token_loss"].append(None if math.isnan(loss) else loss)
    return pl.DataFrame(out, schema=HOT_SPOT_SCHEMA)


def shard_signals(eng: InfluenceEngine, rows: Sequence[dict[str, Any]], docs: Sequence[Example], factors: Factors,
                  counts: CorpusCounts, settings: QualitySettings,
                  progress: Progress | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The engine's pass over these documents plus the text signals: (signal frame, hot spots)."""
    signals = eng.document_signals(docs, factors, progress)
    decode = (lambda t: eng.tokenizer.decode([t])) if eng.tokenizer is not None else None
    return signal_frame(signals, rows, docs, counts, settings), hot_spot_frame(signals, decode, settings.hot_spots)


# ------------------------------------------------------------------------------------------ combining


def robust_z(x: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)`` (the MAD falls back to the mean absolute deviation, then to 1, when 0)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    med = np.median(x)
    dev = np.abs(x - med)
    scale = 1.4826 * np.median(dev)
    if not scale > 0:
        scale = 1.2533 * float(np.mean(dev))  # sqrt(pi/2): the mean absolute deviation of a normal
    return (x - med) / (scale if scale > 0 else 1.0)


def _squash(z: np.ndarray, cutoff: float) -> np.ndarray:
    z = np.clip(z, 0.0, None)
    return z / (z + cutoff)


def _log(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    pos = x[x > 0]
    floor = pos.min() * 1e-3 if pos.size else 1e-30
    return np.log(np.maximum(x, floor))


def near_duplicate_groups(ids: Sequence[str], hashes: Sequence[str], minhashes: Sequence[Sequence[int]],
                          settings: QualitySettings, distinct: Sequence[Sequence[int]] | None = None,
                          n_distinct: Sequence[int] | None = None,
                          ) -> tuple[list[float], list[str | None], list[str | None]]:
    """Per document: its largest estimated Jaccard similarity to another document that shares its distinctive
    shingles (1.0 for an exact copy), the group it belongs to at ``near_duplicate_threshold`` (the id of its first
    document in corpus order, the one kept; None when alone), and the id of its most similar document.

    ``distinct``/``n_distinct``: MinHash signatures and sizes of the documents' distinctive shingle sets; a pair
    counts only when the shared distinctive shingles, estimated as ``J (|A| + |B|) / (1 + J)``, are at least
    ``distinct_containment`` of the smaller set (without them every LSH pair counts)."""
    from datasketch import LeanMinHash, MinHashLSH

    n = len(ids)
    edges: list[tuple[int, int]] = []  # pairs at the threshold: the groups are their connected components

    best = [0.0] * n
    nearest: list[str | None] = [None] * n

    def link(i: int, j: int, sim: float) -> None:
        for a, b in ((i, j), (j, i)):
            if sim > best[a] or (sim == best[a] and nearest[a] is not None and ids[b] < nearest[a]):
                best[a], nearest[a] = sim, ids[b]
        if sim >= settings.near_duplicate_threshold:
            edges.append((i, j))

    def lean(values: Sequence[int]) -> LeanMinHash:
        return LeanMinHash(seed=settings.seed, hashvalues=np.asarray(values, dtype=np.uint64), scheme=MINHASH_SCHEME)

    def shares_content(i: int, j: int) -> bool:
        if distinct is None or n_distinct is None:
            return True
        a, b = int(n_distinct[i]), int(n_distinct[j])
        if min(a, b) == 0:
            return False
        jd = float(lean(distinct[i]).jaccard(lean(distinct[j])))
        return jd * (a + b) / (1 + jd) >= settings.distinct_containment * min(a, b)

    by_hash: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h in by_hash:
            link(by_hash[h], i, 1.0)
        else:
            by_hash[h] = i
    lsh = MinHashLSH(threshold=min(settings.candidate_threshold, settings.near_duplicate_threshold),
                     num_perm=settings.num_perm)
    sketches = []
    for i, values in enumerate(minhashes):
        m = lean(values)
        sketches.append(m)
        for j in lsh.query(m):
            if hashes[i] != hashes[j] and shares_content(i, j):
                link(i, j, float(m.jaccard(sketches[j])))
        lsh.insert(i, m)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = (np.asarray(side, dtype=np.int64) for side in zip(*edges, strict=True)) if edges else ([], [])
    _, label = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(int(label[i]), []).append(i)
    group: list[str | None] = [None] * n
    for idx in members.values():
        if len(idx) > 1:
            name = ids[min(idx)]  # the first in corpus order: the one kept
            for i in idx:
                group[i] = name
    return best, group, nearest


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _near_duplicate_score(sim: np.ndarray, threshold: float) -> np.ndarray:
    """Similarity on the flag's scale: ``threshold`` maps to 0.5 and an exact copy to 1 (linear on each side)."""
    sim = np.asarray(sim, dtype=np.float64)
    if threshold >= 1:
        return np.where(sim >= 1, 1.0, 0.5 * sim)
    return np.clip(np.where(sim >= threshold, 0.5 + 0.5 * (sim - threshold) / (1 - threshold),
                            0.5 * sim / threshold), 0.0, 1.0)


def junk_z(signals: pl.DataFrame) -> dict[str, np.ndarray]:
    """The robust z-scores (over this corpus) of the text's junk signals: compression ratio (both tails), token
    rarity, character surprisal, tokens per character, and the loss."""
    ratio = signals["compression_ratio"].to_numpy()
    return {"ratio": robust_z(ratio), "rare": robust_z(signals["token_rarity"].to_numpy()),
            "char": robust_z(signals["char_surprisal"].to_numpy()),
            "tpc": robust_z(_log(signals["tokens_per_char"].to_numpy())),
            "loss": robust_z(_log(signals["loss"].to_numpy()))}


def combined_junk(z: dict[str, np.ndarray]) -> np.ndarray:
    """Text the model never saw is unusual on several signals at once: the robust z (over the corpus) of the sum of
    the positive parts of the character surprisal, tokens-per-character, token-rarity, incompressibility and loss
    z-scores."""
    return robust_z(sum(np.clip(z[k], 0.0, None) for k in ("char", "tpc", "rare", "ratio", "loss")))


def build_report(signals: pl.DataFrame, settings: QualitySettings) -> pl.DataFrame:
    """Combine the signals of every document of the corpus into issue scores, flags and reasons
    (:data:`REPORT_SCHEMA`, one row per document, in the signals' order).

    Every cut-off is set against this corpus: robust z-scores (median and MAD) for the z-based issues, document
    frequencies of shingles for near duplicates. A document is a candidate for an issue at score >= 0.5; of the
    candidates, the ``max_flagged`` share of the corpus with the highest severity (largest candidate score) is
    flagged, so a clean corpus gets few flags and a dirty one its worst first. In a duplicate group the first
    document (in corpus order) is kept and the others are flagged as its copies."""
    settings.check()
    c = settings.cutoff
    n = signals.height
    si, loss = signals["self_influence"].to_numpy(), signals["loss"].to_numpy()
    zent, rare = signals["zlib_entropy"].to_numpy(), signals["token_rarity"].to_numpy()
    ratio = signals["compression_ratio"].to_numpy()
    chars, tpc = signals["char_surprisal"].to_numpy(), signals["tokens_per_char"].to_numpy()
    z_si, z_loss = robust_z(_log(si)), robust_z(_log(loss))
    # memorised: the loss far below what the text needs; in logs, so a ratio is a difference
    z_mem_zlib, z_mem_rare = robust_z(_log(zent) - _log(loss)), robust_z(_log(rare) - _log(loss))
    jz = junk_z(signals)
    z_junk = combined_junk(jz)
    low_parts = {"incompressible": jz["ratio"], "repetitive": -jz["ratio"], "rare tokens": jz["rare"],
                 "character noise": jz["char"], "many tokens per character": jz["tpc"], "junk": z_junk}
    z = {"outlier": np.maximum(z_si, z_loss), "memorised": np.maximum(z_mem_zlib, z_mem_rare),
         "low_quality": np.maximum.reduce(list(low_parts.values()))}
    ids = signals["id"].to_list()
    distinct = (signals["minhash_distinct"].to_list(), signals["n_distinct"].to_list()) \
        if "minhash_distinct" in signals.columns else (None, None)
    sim, group, nearest = near_duplicate_groups(ids, signals["text_hash"].to_list(), signals["minhash"].to_list(),
                                                settings, *distinct)
    sizes: dict[str, int] = {}
    for g in group:
        if g is not None:
            sizes[g] = sizes.get(g, 0) + 1
    scores = {t: _squash(z[t], c) for t in z}
    scores["near_duplicate"] = _near_duplicate_score(np.asarray(sim), settings.near_duplicate_threshold)
    candidate = {t: scores[t] >= 0.5 for t in z}
    candidate["near_duplicate"] = np.array([g is not None and g != i for g, i in zip(group, ids, strict=True)],
                                           dtype=bool)
    severity = np.max(np.stack([scores[t] for t in ISSUE_TYPES]), axis=0) if n else np.zeros(0)
    candidate_severity = np.max(np.stack([np.where(candidate[t], scores[t], 0.0) for t in ISSUE_TYPES]), axis=0) \
        if n else np.zeros(0)
    above = np.logical_or.reduce([candidate[t] for t in ISSUE_TYPES]) if n else np.zeros(0, dtype=bool)
    keep = np.zeros(n, dtype=bool)
    budget = math.floor(settings.max_flagged * n + 1e-9)
    order = sorted((i for i in range(n) if above[i]), key=lambda i: (-candidate_severity[i], ids[i]))
    keep[order[:budget]] = True
    flags = {t: candidate[t] & keep for t in ISSUE_TYPES}
    med = {k: float(np.median(v)) if len(v) else 0.0 for k, v in
           {"si": si, "loss": loss, "ratio": ratio, "rare": rare, "chars": chars, "tpc": tpc}.items()}
    shown = {"incompressible": lambda i: f"zlib ratio {ratio[i]:.2f}, median {med['ratio']:.2f}",
             "repetitive": lambda i: f"zlib ratio {ratio[i]:.2f}, median {med['ratio']:.2f}",
             "rare tokens": lambda i: f"{_fmt(rare[i])} nats/token, median {_fmt(med['rare'])}",
             "character noise": lambda i: f"{_fmt(chars[i])} nats per byte pair, median {_fmt(med['chars'])}",
             "many tokens per character": lambda i: f"{_fmt(tpc[i])}, median {_fmt(med['tpc'])}",
             "junk": lambda i: f"unusual on several signals at once, robust z {z_junk[i]:.1f}"}
    reasons: list[str] = []
    for i in range(n):
        why = []
        if flags["outlier"][i]:
            why.append(f"outlier: self-influence {_fmt(si[i])} ({_fmt(si[i] / med['si'])}x the median)"
                       if z_si[i] >= z_loss[i] else
                       f"outlier: loss {_fmt(loss[i])} nats/token ({_fmt(loss[i] / med['loss'])}x the median)")
        if flags["memorised"][i]:
            if z_mem_zlib[i] >= z_mem_rare[i]:
                why.append(f"memorised: loss {_fmt(loss[i])} nats/token against a zlib entropy of "
                           f"{_fmt(zent[i])} (ratio {_fmt(loss[i] / zent[i])})")
            else:
                why.append(f"memorised: loss {_fmt(loss[i])} nats/token against a token rarity of {_fmt(rare[i])}")
        if flags["near_duplicate"][i]:
            kind = "exact copy" if sim[i] >= 1.0 else f"near copy (Jaccard {sim[i]:.2f}, distinctive text shared)"
            why.append(f"near_duplicate: {kind} of {nearest[i]}; group {group[i]} ({sizes[group[i]]} documents, "
                       f"keep {group[i]})")
        if flags["low_quality"][i]:
            parts = [f"{name} ({shown[name](i)})" for name, zz in low_parts.items() if zz[i] >= c]
            why.append("low_quality: " + ", ".join(parts))
        reasons.append("; ".join(why))
    cols: dict[str, Any] = {"id": ids, "self_influence": si, "loss": loss}
    for t in ISSUE_TYPES:
        cols[f"{t}_score"] = scores[t]
        cols[t] = flags[t]
    cols |= {"reason": reasons, "duplicate_group": group, "severity": severity, "n_tokens": signals["n_tokens"],
             "n_targets": signals["n_targets"], "zlib_entropy": zent, "token_rarity": rare,
             "compression_ratio": ratio, "char_surprisal": chars, "tokens_per_char": tpc, "max_similarity": sim,
             "duplicate_of": nearest, "group_size": [sizes.get(g, 1) if g is not None else 1 for g in group]}
    return pl.DataFrame(cols, schema=REPORT_SCHEMA)


def above_cutoff(report: pl.DataFrame) -> pl.Series:
    """Documents some issue scores at or above its cut-off (flagged or left out by ``max_flagged``)."""
    z = [pl.col(f"{t}_score") >= 0.5 for t in ISSUE_TYPES if t != "near_duplicate"]
    copy = pl.col("duplicate_group").is_not_null() & (pl.col("duplicate_group") != pl.col("id"))
    return report.select(pl.any_horizontal([*z, copy]).alias("above"))["above"]


def duplicate_groups(report: pl.DataFrame) -> pl.DataFrame:
    """One row per duplicate group: ``group`` (the kept document), ``size``, ``members`` (ids in corpus order, the
    kept one first) and
    ``similarity`` (the members' smallest largest-similarity), largest groups first."""
    dup = report.filter(pl.col("duplicate_group").is_not_null())
    if dup.height == 0:
        return pl.DataFrame(schema={"group": pl.String, "size": pl.Int64, "members": pl.List(pl.String),
                                    "similarity": pl.Float64})
    out = (dup.group_by("duplicate_group", maintain_order=True)
           .agg(pl.len().cast(pl.Int64).alias("size"), pl.col("id").alias("members"),
                pl.col("max_similarity").min().alias("similarity"))
           .rename({"duplicate_group": "group"}))
    return out.sort(["size", "group"], descending=[True, False])


def quality_report(eng: InfluenceEngine, train: pl.DataFrame, docs: Sequence[Example], factors: Factors,
                   settings: QualitySettings, progress: Progress | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The whole audit in one process (the CLI, the bench): (report, hot spots)."""
    settings.check()
    rows = train.to_dicts()
    counts = CorpusCounts.of(docs, [document_text(r) for r in rows], eng.model.get_input_embeddings().num_embeddings,
                             settings)
    signals, hot = shard_signals(eng, rows, docs, factors, counts, settings, progress)
    return build_report(signals, settings), hot


def flagged(report: pl.DataFrame) -> pl.DataFrame:
    """The documents any issue flags."""
    return report.filter(pl.any_horizontal([pl.col(t) for t in ISSUE_TYPES]))


def summary(report: pl.DataFrame) -> pl.DataFrame:
    """Datalab's summary: per issue type, how many documents it flags and the mean score."""
    return pl.DataFrame({"issue_type": list(ISSUE_TYPES),
                         "num_issues": [int(report[t].sum()) for t in ISSUE_TYPES],
                         "mean_score": [float(report[f"{t}_score"].mean() or 0.0) for t in ISSUE_TYPES]})


def issue_reason(reason: str, issue: str) -> str:
    """The part of a document's ``reason`` about one issue type."""
    for part in reason.split("; "):
        if part.startswith(f"{issue}: "):
            return part[len(issue) + 2:]
    return ""


def snippet(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def review_items(report: pl.DataFrame, texts: dict[str, str]) -> pl.DataFrame:
    """The flagged documents as review items keyed by issue type (``query_id``) and document (``train_id``),
    ranked by score within the type: the shape the review commands and the flagged-documents Parquet use. Where a
    query's prompt and completion stand: what the issue means and how many it flags; the snippet starts with the
    document's reason for this issue, in brackets."""
    out: dict[str, list] = {c: [] for c in REVIEW_COLUMNS}
    for t in ISSUE_TYPES:
        rows = report.filter(pl.col(t)).sort([f"{t}_score", "id"], descending=[True, False])
        for rank, r in enumerate(rows.iter_rows(named=True), start=1):
            out["query_id"].append(t)
            out["query_prompt"].append(ABOUT[t])
            out["query_completion"].append(f"{rows.height} flagged document{'s' if rows.height != 1 else ''}")
            out["train_id"].append(r["id"])
            out["score"].append(float(r[f"{t}_score"]))
            out["rank"].append(rank)
            out["snippet"].append(f"[{issue_reason(r['reason'], t)}] {snippet(texts.get(r['id'], ''))}")
    return pl.DataFrame(out, schema={"query_id": pl.String, "query_prompt": pl.String,
                                     "query_completion": pl.String, "train_id": pl.String, "score": pl.Float64,
                                     "rank": pl.Int64, "snippet": pl.String})


def hot_spots_path(report_path: str | Path) -> Path:
    """Where the per-token Parquet goes beside a report: ``REPORT.tokens.parquet``."""
    p = Path(report_path)
    return p.with_name(re.sub(r"\.parquet$", "", p.name) + ".tokens.parquet")

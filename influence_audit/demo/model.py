"""The demo's tiny causal LM: a word-level tokenizer and a 2-layer GPT-2 trained offline on the demo corpus.

:func:`train_demo_model` builds everything locally (nothing comes from the Hugging Face hub) and writes a
directory that loads back with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
:func:`ensure_demo_model` keeps one such directory per corpus hash and seed in a cache folder.

Tokenization: one token per word, punctuation mark or ``'s``, split on whitespace (spaces are not part of the
tokens), so ``" Quenvale."`` is ``["Quenvale", "."]`` wherever it stands and a word is the same token at
the start of a document and inside it. Hence ``tokenizer(prompt)`` followed by
``tokenizer(completion, add_special_tokens=False)`` equals ``tokenizer(prompt + completion)`` whenever the
two meet at a space or punctuation. Every encoding with special tokens starts with ``<|endoftext|>`` (the
bos/eos/pad token); words never seen in training map to ``<unk>``. Decoding joins words with spaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from influence_engine.errors import DataError
from tasks.files import umask_mode

EOT = "<|endoftext|>"
UNK = "<unk>"
MANIFEST = "demo_manifest.json"
# Bump when the tokenizer, architecture or training recipe changes: cached models are then retrained.
RECIPE_VERSION = 1
DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "corpus.jsonl"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Architecture and optimisation settings of the demo model."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-2
    warmup_steps: int = 20


RECIPE = Recipe()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_tokenizer(texts: Sequence[str], n_positions: int = RECIPE.n_positions) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``texts``: ids 0/1 are ``<|endoftext|>``/``<unk>``, then words by
    decreasing frequency (ties alphabetical), so the result depends only on ``texts``."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                   pre_tokenizers.Split(Regex(r"'s\b|[^\w\s]"), behavior="isolated")])
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {EOT: 0, UNK: 1}
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=UNK, model_max_length=n_positions)


def completion_logprobs(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast,
                        prompt: str, completion: str) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of the completion's tokens after the prompt, and whether the first one is the
    argmax. Tokenized as the influence engine does: ``tokenizer(prompt) + tokenizer(completion, no specials)``."""
    p_ids = tokenizer(prompt)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], dim=-1)
    target = torch.tensor(c_ids)
    return logp.gather(1, target[:, None])[:, 0], bool(logp[0].argmax() == target[0])


def evaluate_queries(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast,
                     queries: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean completion NLL per token, first-token argmax accuracy, and the uniform baseline ``log V``."""
    model.eval()
    nlls, hits = [], []
    for q in queries:
        lp, hit = completion_logprobs(model, tokenizer, q["prompt"], q["completion"])
        nlls.append(float(-lp.mean()))
        hits.append(hit)
    n = max(len(queries), 1)
    return {"n_queries": len(queries), "mean_completion_nll": sum(nlls) / n,
            "max_completion_nll": max(nlls, default=0.0), "first_token_accuracy": sum(hits) / n,
            "uniform_nll": math.log(len(tokenizer))}


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _batches(seqs: list[list[int]], batch_size: int, gen: torch.Generator,
             pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(seqs), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield ids, mask, labels


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load
    (5.x writes its own ``TokenizersBackend``, unknown to 4.x)."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing any old ``dst``."""
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.replace(dst, trash / dst.name)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def fit_demo_gpt2(seqs: Sequence[Sequence[int]], vocab_size: int, pad_id: int, *, recipe: Recipe = RECIPE,
                  seed: int = 0, log: Log | None = None, num_threads: int = 1) -> tuple[GPT2LMHeadModel, float]:
    """Train the demo's GPT-2 from scratch on token sequences (the demo recipe: AdamW, warmup then cosine
    decay, no dropout, no weight decay); returns the model in eval mode and the last epoch's mean loss.
    The initialisation depends on ``seed`` only, so models trained on subsets of a corpus start alike."""
    emit: Log = log or (lambda _msg: None)
    seqs = [list(s) for s in seqs]
    config = GPT2Config(vocab_size=vocab_size, n_positions=recipe.n_positions, n_embd=recipe.n_embd,
                        n_layer=recipe.n_layer, n_head=recipe.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    # No weight decay and no dropout: the point is to memorise the corpus.
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(seqs) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 5%
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(total - recipe.warmup_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in model.parameters())
    emit(f"demo model: {len(seqs)} sequences, {n_params} parameters, {recipe.epochs} epochs x "
         f"{steps_per_epoch} steps")
    epoch_loss = float("nan")
    with _torch_threads(max(1, num_threads)):
        model.train()
        for epoch in range(recipe.epochs):
            tot_loss, tot_tok = 0.0, 0
            for ids, mask, labels in _batches(seqs, recipe.batch_size, gen, pad_id):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                n_tok = int((labels[:, 1:] != -100).sum())
                tot_loss += loss.item() * n_tok
                tot_tok += n_tok
            epoch_loss = tot_loss / max(tot_tok, 1)
            if (epoch + 1) % 5 == 0 or epoch + 1 == recipe.epochs:
                emit(f"  epoch {epoch + 1}/{recipe.epochs}: loss {epoch_loss:.4f}")
    model.eval()
    return model, epoch_loss


def train_demo_model(corpus_path: Path, out_dir: Path, *, seed: int = 0, epochs: int | None = None,
                     log: Log | None = print, queries_path: Path | None = None, num_threads: int = 1) -> Path:
    """Train the demo GPT-2 on ``corpus_path`` (rows ``{"id", "text"}``) and save it with its tokenizer.

    ``queries_path`` (default: ``queries.jsonl`` beside the corpus, if present) adds the queries' words to
    the vocabulary and is used to report how well their completions were learned; queries are never
    trained on. The model is written to a temporary sibling and renamed to ``out_dir`` when complete.
    ``num_threads`` defaults to 1: the matrices are so small that a second thread gains little on an
    idle machine, and on a busy one (a CI runner, a laptop running the other services) a second
    intra-op thread made each step ten times slower.
    """
    emit: Log = log or (lambda _msg: None)
    corpus_path, out_dir = Path(corpus_path), Path(out_dir)
    if queries_path is None and (corpus_path.parent / "queries.jsonl").is_file():
        queries_path = corpus_path.parent / "queries.jsonl"
    recipe = RECIPE if epochs is None else Recipe(epochs=epochs)
    docs = [str(row["text"]) for row in read_jsonl(corpus_path)]
    queries = read_jsonl(queries_path) if queries_path is not None else []
    t0, c0 = time.perf_counter(), time.process_time()

    texts = docs + [q["prompt"] + q["completion"] for q in queries]
    tokenizer = build_tokenizer(texts, recipe.n_positions)
    seqs = [tokenizer(text)["input_ids"] for text in docs]
    longest = max(len(s) for s in seqs)
    if longest > recipe.n_positions:
        raise DataError(f"{corpus_path}: a document has {longest} tokens, more than the demo model's "
                        f"{recipe.n_positions} positions", hint="keep demo documents short")

    emit(f"demo model: {len(docs)} documents, vocab {len(tokenizer)}")
    model, epoch_loss = fit_demo_gpt2(seqs, len(tokenizer), tokenizer.pad_token_id, recipe=recipe, seed=seed,
                                      log=emit, num_threads=num_threads)
    with _torch_threads(max(1, num_threads)):
        metrics = evaluate_queries(model, tokenizer, queries) if queries else {}
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if metrics:
        emit(f"demo model: final loss {epoch_loss:.4f}; queries: first completion token is the argmax for "
             f"{metrics['first_token_accuracy']:.0%} of {metrics['n_queries']}, mean completion NLL "
             f"{metrics['mean_completion_nll']:.3f} nats/token (uniform {metrics['uniform_nll']:.2f}); "
             f"{train_seconds:.1f} s ({cpu_seconds:.1f} s CPU)")
    else:
        emit(f"demo model: final loss {epoch_loss:.4f}; {train_seconds:.1f} s ({cpu_seconds:.1f} s CPU)")

    manifest = {
        "recipe_version": RECIPE_VERSION, "seed": seed, "epochs": recipe.epochs,
        "corpus_path": str(corpus_path), "corpus_sha256": file_sha256(corpus_path),
        "queries_sha256": file_sha256(queries_path) if queries_path is not None else None,
        "n_documents": len(docs), "vocab_size": len(tokenizer), "final_loss": epoch_loss,
        "train_seconds": round(train_seconds, 3), "train_cpu_seconds": round(cpu_seconds, 3),
        "num_threads": max(1, num_threads), "queries": metrics, "torch": torch.__version__,
        "config": {k: getattr(model.config, k) for k in ("n_layer", "n_embd", "n_head", "n_positions")},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    tmp.chmod(umask_mode(0o777))  # mkdtemp's 0700 would hide the model from other accounts
    try:
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _reusable(model_dir: Path, expect: dict[str, Any]) -> bool:
    try:
        m = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all(m.get(k) == v for k, v in expect.items()) and all((model_dir / f).is_file() for f in files)


def ensure_demo_model(cache_dir: Path, corpus_path: Path | None = None, *, seed: int = 0,
                      epochs: int | None = None, log: Log | None = print, num_threads: int = 1) -> Path:
    """Return ``cache_dir/demo-gpt2-<corpus sha256[:16]>-seed<seed>``, training it first unless a complete
    model for the same corpus (and queries file beside it), seed, epochs and recipe is already there."""
    corpus_path = Path(corpus_path) if corpus_path is not None else DEFAULT_CORPUS
    queries_path = corpus_path.parent / "queries.jsonl"
    n_epochs = RECIPE.epochs if epochs is None else epochs
    sha = file_sha256(corpus_path)
    name = f"demo-gpt2-{sha[:16]}-seed{seed}" + ("" if n_epochs == RECIPE.epochs else f"-e{n_epochs}")
    out_dir = Path(cache_dir) / name
    expect = {"corpus_sha256": sha, "seed": seed, "epochs": n_epochs, "recipe_version": RECIPE_VERSION,
              "queries_sha256": file_sha256(queries_path) if queries_path.is_file() else None}
    if _reusable(out_dir, expect):
        if log:
            log(f"demo model: reusing {out_dir}")
        return out_dir
    return train_demo_model(corpus_path, out_dir, seed=seed, epochs=n_epochs, log=log, num_threads=num_threads)

r"""A gradient index: new queries scored against a corpus without another pass over it.

For strategies that precondition by an elementwise scaling in a fixed basis (EK-FAC and K-FAC in the
eigenbasis ``Q_S, Q_A``; diagonal and identity without a basis), the influence of document ``d`` on query
``q`` splits into two halves, one per side::

    score(q, d) = Σ_layers < (Q_S^T G_q Q_A) / (Λ + λ),  Q_S^T G_d Q_A >
                = Σ_layers < W_q, W_d >,         W = (Q_S^T G Q_A) ⊙ (Λ + λ)^{-1/2}

So one pass over the corpus stores every document's ``W_d`` (the build: the cost of one eigenvalue-correction
pass, since the scaling is elementwise and each document's rotated gradient is formed anyway), and a query is
then one more ``W_q`` and an inner product: top-k search by blocked matrix products (exact) or a FAISS
inner-product index (approximate).

To keep the index small, ``W`` is sketched on both sides by a seeded Kronecker random projection
``S_out W S_in^T`` (``S_out``: ``k_out × out``, ``S_in``: ``k_in × a_dim``, Gaussian entries of variance
``1/k``). Since ``E[S^T S] = I`` on each side and the two are independent, the sketched inner product is an
unbiased estimate of the exact one; a side whose ``k`` is not below its dimension is left unsketched. With the
sketch off the index scores are the exact EK-FAC scores (with full-rank queries).

Vectors are stored as memory-mapped ``.npy`` parts (one per shard), rows in document order, with their ids.
Only the strategies in :data:`INDEX_STRATEGIES` are supported: the index needs the preconditioner to factor
into two equal halves, which an elementwise scaling in a fixed orthonormal basis does.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path, write_json_atomic
from .cache import GradientCache, TokenCache
from .data import Example
from .errors import FactorMismatchError, UserError
from .factors import Factors, _load_tensors, _save_tensors, per_document_gradient
from .layers import LayerSpec
from .passes import BaseAccumulator, PassContext, Progress, augment
from .scoring import TopK
from .strategies import Strategy

FORMAT_VERSION = 1
INDEX_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}

Rows = Callable[[list[str], torch.Tensor], None]  # (document ids, their index vectors (B, width)) per batch


def check_strategy(name: str) -> Strategy:
    """The strategy ``name`` if the index supports it; a one-line error otherwise."""
    from .strategies import get_strategy

    kind = get_strategy(name)
    if kind.name not in INDEX_STRATEGIES:
        raise UserError(f"strategy {name!r}: the gradient index supports {', '.join(INDEX_STRATEGIES)} only "
                        f"(it needs an elementwise scaling in a fixed basis)", hint="score by a pass instead")
    return kind


def store_dtype(precision: str, choice: str = "auto") -> str:
    """The stored dtype: ``fp64`` for fp64 passes, else ``fp16``, unless ``choice`` names one."""
    if choice == "auto":
        return "fp64" if precision == "fp64" else "fp16"
    if choice not in STORE_DTYPES:
        raise UserError(f"--index-dtype {choice!r}: choose auto, {', '.join(STORE_DTYPES)}")
    return choice


# ------------------------------------------------------------------------------------------------- sketch
def parse_sketch(text: str | None) -> tuple[int, int] | None:
    """``"16x16"`` -> (16, 16) (rows kept of the output side, of the input side); ``off``/``none``/empty ->
    None (no sketch: exact scores)."""
    if text is None or str(text).strip().lower() in ("", "off", "none", "0"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f"--sketch {text!r}: give OUTxIN such as 16x16 (rows kept per layer side), or off")
    return int(m.group(1)), int(m.group(2))


def _layer_seed(seed: int, name: str, side: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{side}".encode())) % (2**63)


@dataclass
class Sketch:
    """Per layer, the two projections (``None`` on a side left whole), float64. Made from the seed alone, so
    a query sketched in another process matches the documents."""

    size: tuple[int, int] | None
    seed: int
    out: dict[str, torch.Tensor | None]
    inp: dict[str, torch.Tensor | None]

    @classmethod
    def make(cls, specs: dict[str, LayerSpec], size: tuple[int, int] | None, seed: int = 0) -> Sketch:
        out: dict[str, torch.Tensor | None] = {}
        inp: dict[str, torch.Tensor | None] = {}
        for name, s in specs.items():
            for side, dim, k, store in (("out", s.out_features, size[0] if size else 0, out),
                                        ("in", s.a_dim, size[1] if size else 0, inp)):
                if not size or k >= dim:
                    store[name] = None
                    continue
                g = torch.Generator().manual_seed(_layer_seed(seed, name, side))
                store[name] = torch.randn(k, dim, generator=g, dtype=torch.float64) / k ** 0.5
        return cls(size, seed, out, inp)

    def shape(self, spec: LayerSpec) -> tuple[int, int]:
        """The stored block's shape for this layer."""
        o, i = self.out[spec.name], self.inp[spec.name]
        return (spec.out_features if o is None else o.shape[0], spec.a_dim if i is None else i.shape[0])


# ------------------------------------------------------------------------------------------- accumulator
class IndexAccumulator(BaseAccumulator):
    """Per document, ``S_out [(Q_S^T G_d Q_A) ⊙ (Λ + λ)^{-1/2}] S_in^T`` for every tracked layer, flattened and
    concatenated in layer order (``(B, width)``), handed to ``on_batch`` at batch end.

    As in the eigenvalue correction, tokens are rotated before the per-document product
    (``Q_S^T G Q_A = Σ_t (Q_S^T g_t)(Q_A^T a_t)^T``; the bias folds into one multiply-add); stored gradients
    (:meth:`gradients`, a replay) are rotated whole."""

    def __init__(self, specs: dict[str, LayerSpec], factors: Factors, sketch: Sketch, device: torch.device,
                 dtype: torch.dtype, on_batch: Rows, gemm_dtype: torch.dtype | None = None):
        self.specs, self.kind, self.on_batch = specs, check_strategy(factors.strategy), on_batch
        self.dtype, self.gemm_dtype = dtype, gemm_dtype or dtype
        self.ops: dict[str, dict[str, torch.Tensor | None]] = {}
        for n, s in specs.items():
            t = factors.layer_tensors(n, device, torch.float64)
            op: dict[str, torch.Tensor | None] = {"Q_A": None, "Q_S": None, "w_bias": None, "whiten": None}
            if self.kind.rotated:
                Q_A = t["Q_A"].to(self.gemm_dtype)
                op["Q_A"], op["w_bias"] = Q_A[:s.in_features], Q_A[s.in_features] if s.bias else None
                op["Q_S"] = t["Q_S"].to(self.gemm_dtype)
            if self.kind.eigen_key is not None:
                op["whiten"] = (t[self.kind.eigen_key] + factors.damping[n]).rsqrt().to(dtype)
            op["S_out"] = None if sketch.out[n] is None else sketch.out[n].to(device, dtype)
            op["S_in"] = None if sketch.inp[n] is None else sketch.inp[n].to(device, dtype)
            self.ops[n] = op
        self._pending: dict[str, torch.Tensor] = {}

    def begin_batch(self, ctx: PassContext) -> None:
        self._pending = {}

    def forward(self, spec: LayerSpec, a: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        op = self.ops[spec.name]
        x = a.to(self.gemm_dtype)
        if op["Q_A"] is None:
            return augment(ctx.masked(x, self.gemm_dtype), spec, ctx.mask)
        flat = x.flatten(0, 1)
        rot = torch.addmm(op["w_bias"], flat, op["Q_A"]) if op["w_bias"] is not None else flat @ op["Q_A"]
        return ctx.zero_padding(rot.view(*x.shape[:2], -1))

    def backward(self, spec: LayerSpec, a: torch.Tensor, g: torch.Tensor, ctx: PassContext) -> None:
        g = ctx.masked(g, self.gemm_dtype)
        Q_S = self.ops[spec.name]["Q_S"]
        if Q_S is not None:
            g = g @ Q_S
        self._pending[spec.name] = self._finish(spec, per_document_gradient(a, g))

    def gradients(self, spec: LayerSpec, G: torch.Tensor, ctx: PassContext) -> None:
        """Stored per-document gradients (B, out, a_dim): rotated here, then as in a pass."""
        op = self.ops[spec.name]
        G = G.to(self.gemm_dtype)
        if op["Q_A"] is not None:
            Q_A = op["Q_A"] if op["w_bias"] is None else torch.cat([op["Q_A"], op["w_bias"][None]])
            G = op["Q_S"].T @ G @ Q_A
        self._pending[spec.name] = self._finish(spec, G)

    def _finish(self, spec: LayerSpec, R: torch.Tensor) -> torch.Tensor:
        """Whiten and sketch rotated per-document gradients ``R`` (B, out, a_dim) -> (B, k_out * k_in)."""
        op = self.ops[spec.name]
        W = R.to(self.dtype)
        if op["whiten"] is not None:
            W = W * op["whiten"]
        if op["S_out"] is not None:
            W = op["S_out"] @ W
        if op["S_in"] is not None:
            W = W @ op["S_in"].T
        return W.flatten(1)

    def end_batch(self, ctx: PassContext) -> None:
        rows = torch.cat([self._pending[n] for n in self.specs], dim=1)
        self._pending = {}
        self.on_batch(list(ctx.batch.ids), rows)

    def abort_batch(self) -> None:
        self._pending = {}


def index_vectors(eng: Any, examples: Sequence[Example], factors: Factors, sketch: Sketch,
                  out: np.ndarray | torch.Tensor | None = None, progress: Progress | None = None, *,
                  cache: GradientCache | TokenCache | None = None) -> Any:
    """Every example's index vector (rows in ``examples`` order), by one pass of ``eng`` (an
    :class:`~influence_engine.InfluenceEngine`) with the data's own labels, as scoring uses; with ``cache``
    (their gradients kept by the one-pass fit) the stored gradients are replayed instead, no pass. Written into
    ``out`` (e.g. a memory-mapped array) when given; otherwise returned as a tensor in the engine's dtype."""
    eng.check_factors(factors)
    position = {e.id: i for i, e in enumerate(examples)}
    if len(position) != len(examples):
        raise UserError("document ids are not unique")
    width = sum(int(np.prod(sketch.shape(s))) for s in eng.specs.values())
    if out is None:
        out = torch.zeros(len(examples), width, dtype=eng.dtype)

    def keep(ids: list[str], rows: torch.Tensor) -> None:
        index = [position[i] for i in ids]
        if isinstance(out, torch.Tensor):
            out[index] = rows.to("cpu", out.dtype)
        else:
            order = np.argsort(index)  # numpy fancy assignment into a memmap wants sorted indices to be cheap
            out[np.asarray(index)[order]] = rows.cpu().numpy()[order].astype(out.dtype, copy=False)

    acc = IndexAccumulator(eng.specs, factors, sketch, eng.device, eng.dtype, keep,
                           eng.runner.gemm_dtype(eng.precision))
    if cache is not None:
        cache.check_covers(list(position))
        cache.replay(eng.runner, "true", acc, eng.precision, progress=progress)
    else:
        eng.runner.run(examples, acc, eng._cfg("true"), progress)
    return out


# ------------------------------------------------------------------------------------------------- store
@dataclass
class Part:
    name: str
    n_docs: int


class GradientIndex:
    """An index directory: ``index.json`` (settings, fingerprints, sketch, layout), ``sketch.safetensors``, and
    ``parts/<name>.npy`` (rows) with ``parts/<name>.ids.json``. Parts are written atomically, one per shard,
    so a build resumes at the first missing part."""

    def __init__(self, directory: str | Path, meta: dict[str, Any]):
        self.directory = Path(directory)
        self.meta = meta

    # -- creation
    @classmethod
    def create(cls, directory: str | Path, eng: Any, factors: Factors, *, sketch: tuple[int, int] | None,
               sketch_seed: int = 0, dtype: str = "fp16", extra: dict[str, Any] | None = None) -> GradientIndex:
        """Start (or reopen, when its record matches) an index for ``factors`` of ``eng``'s model."""
        check_strategy(factors.strategy)
        eng.check_factors(factors)
        d = Path(directory)
        sk = Sketch.make(eng.specs, sketch, sketch_seed)
        layers = []
        offset = 0
        for s in eng.specs.values():
            rows, cols = sk.shape(s)
            layers.append({"name": s.name, "rows": rows, "cols": cols, "offset": offset})
            offset += rows * cols
        settings = factors.settings
        meta = {"format_version": FORMAT_VERSION, "strategy": factors.strategy,
                "settings": None if settings is None else settings.to_json(), "damping": factors.damping,
                "sketch": "off" if sketch is None else f"{sketch[0]}x{sketch[1]}", "sketch_seed": sketch_seed,
                "dtype": dtype, "width": offset, "layers": layers, **(extra or {})}
        if (d / "index.json").exists():
            old = cls.open(d)
            for key in ("settings", "sketch", "sketch_seed", "dtype", "width", "strategy"):
                if old.meta.get(key) != meta[key]:
                    raise FactorMismatchError(f"{d}: an index with other {key} is stored here "
                                              f"({str(old.meta.get(key))[:60]!r})",
                                              hint="use another --out directory, or delete this one")
            return old
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"{side}/{n}": t for side, store in (("out", sk.out), ("in", sk.inp))
                   for n, t in store.items() if t is not None}
        _save_tensors(d / "sketch.safetensors", tensors, {"seed": sketch_seed})
        write_json_atomic(d / "index.json", meta)
        return cls(d, meta)

    @classmethod
    def open(cls, directory: str | Path) -> GradientIndex:
        d = Path(directory)
        path = d / "index.json"
        if not path.exists():
            raise UserError(f"--index {d}: no index.json here", hint="build one with `influence-audit index build`")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: corrupt ({exc})", hint="delete the index and rebuild it") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise FactorMismatchError(f"{path}: index format {meta.get('format_version')} is not {FORMAT_VERSION}",
                                      hint="rebuild the index with this version")
        return cls(d, meta)

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def np_dtype(self) -> type:
        return STORE_DTYPES[self.meta["dtype"]]

    def sketch(self, specs: dict[str, LayerSpec]) -> Sketch:
        """The stored projections (checked against ``specs``' layers)."""
        names = [x["name"] for x in self.meta["layers"]]
        if names != list(specs):
            raise FactorMismatchError(f"{self.directory}: the index tracks other layers than this engine",
                                      hint="query with the index's own --layers")
        t, _ = _load_tensors(self.directory / "sketch.safetensors")
        size = parse_sketch(self.meta["sketch"])
        return Sketch(size, int(self.meta["sketch_seed"]), {n: t.get(f"out/{n}") for n in names},
                      {n: t.get(f"in/{n}") for n in names})

    def _part_paths(self, name: str) -> tuple[Path, Path]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"part name {name!r}: letters, digits, '.', '_' and '-' only")
        base = self.directory / "parts" / name
        return base.with_suffix(".npy"), base.with_suffix(".ids.json")

    def has_part(self, name: str) -> bool:
        rows, ids = self._part_paths(name)
        return rows.exists() and ids.exists()

    def build_part(self, name: str, eng: Any, examples: Sequence[Example], factors: Factors,
                   progress: Progress | None = None, cache: GradientCache | TokenCache | None = None) -> Part:
        """Write part ``name``: the index vectors of ``examples`` (one pass, or a replay of ``cache``), straight
        into a memory map that is renamed into place when complete. Skipped when the part exists."""
        rows_path, ids_path = self._part_paths(name)
        if self.has_part(name):
            return Part(name, len(json.loads(ids_path.read_text())))
        settings = factors.settings
        if self.meta.get("settings") is not None and settings is not None:
            settings.check_matches(self.meta["settings"], str(self.directory))
        sk = self.sketch(eng.specs)
        with atomic_path(rows_path) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.np_dtype,
                                           shape=(len(examples), self.width))
            index_vectors(eng, examples, factors, sk, mm, progress, cache=cache)
            mm.flush()
            del mm
        write_json_atomic(ids_path, [e.id for e in examples])  # the ids mark the part done
        return Part(name, len(examples))

    def parts(self, names: Sequence[str] | None = None) -> list[Part]:
        """The parts in order (``names``, or every complete part by name)."""
        if names is None:
            names = sorted(p.name[:-len(".ids.json")] for p in (self.directory / "parts").glob("*.ids.json"))
        out = []
        for n in names:
            if not self.has_part(n):
                raise UserError(f"{self.directory}: part {n} is missing", hint="rerun the index build to finish it")
            out.append(Part(n, len(json.loads(self._part_paths(n)[1].read_text()))))
        return out

    def rows(self, part: str) -> np.ndarray:
        """Part ``part``'s rows, memory-mapped read-only."""
        return np.load(self._part_paths(part)[0], mmap_mode="r")

    def ids(self, part: str) -> list[str]:
        return json.loads(self._part_paths(part)[1].read_text())

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in (self.directory / "parts").glob("*") if p.is_file())

    # -- search
    def query_vectors(self, eng: Any, queries: Sequence[Example], factors: Factors) -> torch.Tensor:
        """The queries' vectors (Q, width): their gradients (completion given prompt) rotated, scaled by
        ``(Λ + λ)^{-1/2}`` and sketched exactly as the documents were, so ``<query, document>`` is the score."""
        return index_vectors(eng, queries, factors, self.sketch(eng.specs))

    def search(self, queries: torch.Tensor, top_k: int, *, parts: Sequence[str] | None = None,
               block: int | None = None, device: str | torch.device = "cpu") -> tuple[np.ndarray, list[list[str]]]:
        """Exact top ``top_k`` by inner product for each row of ``queries`` (Q, width): blocked matrix products
        over the memory-mapped parts (``block`` rows at a time: by default about 2^22 values, a few MB that stay
        in cache), a streaming top-k. Returns scores (Q, k), descending, and the ids."""
        dt = torch.float64 if self.meta["dtype"] == "fp64" else torch.float32
        block = block or max(256, 2**22 // max(self.width, 1))
        qv = queries.to(device, dt)
        topk = TopK(max(1, top_k))
        all_ids: list[str] = []
        for part in self.parts(parts):
            rows = self.rows(part.name)
            base = len(all_ids)
            all_ids += self.ids(part.name)
            for s in range(0, rows.shape[0], block):
                X = torch.from_numpy(np.array(rows[s:s + block])).to(device, dt)  # a copy: read-only map
                topk.push(X @ qv.T, torch.arange(base + s, base + s + X.shape[0]))
        if topk.values is None:
            return np.zeros((len(qv), 0)), [[] for _ in range(len(qv))]
        idx = topk.index.cpu().numpy()
        return topk.values.double().cpu().numpy(), [[all_ids[i] for i in row] for row in idx]

    def search_faiss(self, queries: torch.Tensor, top_k: int, *, parts: Sequence[str] | None = None,
                     hnsw_m: int = 32, ef_search: int = 256) -> tuple[np.ndarray, list[list[str]]]:
        """Approximate top ``top_k`` with a FAISS HNSW inner-product index over every part (built on first use
        and kept in the index directory as ``faiss-hnsw.index``; optional extra ``faiss-cpu``)."""
        try:
            import faiss
        except ImportError:
            raise UserError("--search faiss needs FAISS", hint="pip install 'influence-audit[index]' "
                                                             "(faiss-cpu), or use --search exact") from None
        plist = self.parts(parts)
        all_ids = [i for p in plist for i in self.ids(p.name)]
        path = self.directory / f"faiss-hnsw-{len(all_ids)}.index"
        if path.exists():
            fx = faiss.read_index(str(path))
        else:
            fx = faiss.IndexHNSWFlat(self.width, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            for p in plist:
                rows = self.rows(p.name)
                for s in range(0, rows.shape[0], 65536):
                    fx.add(np.ascontiguousarray(rows[s:s + 65536], dtype=np.float32))
            with atomic_path(path) as tmp:
                faiss.write_index(fx, str(tmp))
        fx.hnsw.efSearch = max(ef_search, top_k)
        scores, idx = fx.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), top_k)
        return scores.astype(np.float64), [[all_ids[i] for i in row if i >= 0] for row in idx]


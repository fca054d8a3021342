"""Bad input everywhere it enters: the real CLI on a tiny model, one case per kind of bad input (through its entry
point in-process, and a few through the installed command in a process of its own).

Every case must exit non-zero with one short stderr line naming the file / line / field (hint in brackets on
the same line), print no traceback and leave no output (no ``--out`` file, no temporary file). In-process:
disk full (ENOSPC from polars, safetensors and plain writes), out-of-memory (the runner halves the batch, then
gives up with a clear message at one document), NaN/Inf in scores, remote code refused without its flag.
"""

from __future__ import annotations

import errno
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
import torch
from reliability_support import (
    COUNTS,
    build_model,
    corpus,
    env,
    error_lines,
    free_port,
    queries,
    report_counts,
    run_cli,
    run_in_process,
    tmp_leftovers,
    write_jsonl,
)

from influence_engine.errors import NumericalError, UserError


@dataclass
class Case:
    """One bad input: the command, what the one error line must contain, and the exit code."""

    name: str
    args: list[str]
    expect: list[str]
    code: int = 2
    out: Path | None = None  # an output that must not exist afterwards
    env: dict[str, str] = field(default_factory=dict)  # added to the subprocess environment
    subprocess: bool = False  # through the installed command in its own process (else the entry point in-process)
    result: object = field(default=None, repr=False)


def _nan_copy(src: Path, dst: Path, key_part: str = "mlp.c_fc") -> str:
    """Copy a factors directory and set one value of one layer's stored factor to NaN; returns the layer."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "factors.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if key_part in k)[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    return key.rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models, data files (good and bad) and fitted factors; then every CLI case run (two at a time)."""
    root = tmp_path_factory.mktemp("cli-errors")
    model = build_model(root / "model", seed=0)
    other = build_model(root / "other-model", seed=1)
    small = build_model(root / "small-vocab-model", seed=0, vocab_size=8)  # tokenizer has 30 tokens
    trunc = root / "truncated-weights"
    shutil.copytree(model, trunc)
    weights = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    garbage = root / "garbage-config"
    shutil.copytree(model, garbage)
    (garbage / "config.json").write_text("{not json", encoding="utf-8")
    no_tok = root / "no-tokenizer"
    shutil.copytree(model, no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    nan_model = root / "nan-model"
    shutil.copytree(model, nan_model)
    from safetensors.torch import load_file, save_file

    w = load_file(str(nan_model / "model.safetensors"))
    w["transformer.h.1.mlp.c_proj.weight"][0, 0] = float("nan")
    save_file(w, str(nan_model / "model.safetensors"), metadata={"format": "pt"})

    d = root / "data"
    train = write_jsonl(d / "train.jsonl", corpus(12))
    qs = write_jsonl(d / "queries.jsonl", queries(2))
    (d / "bad.jsonl").write_text('{"id": "a", "text": "the cat"}\n{"id": "b", "text": oops}\n', encoding="utf-8")
    (d / "latin1.jsonl").write_bytes('{"id": "a", "text": "the caf\u00e9"}\n'.encode("latin-1"))
    write_jsonl(d / "nocol.jsonl", [{"id": "a", "body": "the cat"}])
    write_jsonl(d / "nulltext.jsonl", [{"id": "a", "text": "the cat"}, {"id": "b", "text": None}])
    write_jsonl(d / "blanktext.jsonl", [{"id": "a", "text": "the cat"}, {"id": "b", "text": "  "}])
    write_jsonl(d / "intid.jsonl", [{"id": 7, "text": "the cat"}])
    write_jsonl(d / "dup.jsonl", [{"id": "a", "text": "the cat"}, {"id": "a", "text": "the dog"}])
    write_jsonl(d / "dup-markup.jsonl", [{"id": "[/x]", "text": "the cat"}, {"id": "[/x]", "text": "a dog"}])
    (d / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    write_jsonl(d / "q-noprompt.jsonl", [{"id": "q", "prompt": "", "completion": " the cat"}])
    write_jsonl(d / "q-nocompletion.jsonl", [{"id": "q", "prompt": "the cat", "completion": ""}])
    write_jsonl(d / "q-nocol.jsonl", [{"id": "q", "prompt": "the cat"}])
    write_jsonl(d / "long.jsonl", corpus(3, lo=3, hi=6) + [{"id": "long", "text": " ".join(["the cat sat"] * 6)}])

    factors = root / "factors-ok"
    fit = run_in_process(["fit-factors", "--model", str(model), "--train", str(train), "--out", str(factors),
                          "--device", "cpu", "--max-length", "32"])
    assert fit.returncode == 0, fit.stderr
    nan_factors = root / "factors-nan"
    nan_layer = _nan_copy(factors, nan_factors)

    out = root / "out"
    out.mkdir()

    def score(name: str, *extra: str, m: Path = model, t: Path = train, q: Path = qs) -> list[str]:
        return ["score", "--model", str(m), "--train", str(t), "--queries", str(q), "--out",
                str(out / f"{name}.parquet"), "--device", "cpu", "--max-length", "32", *extra]

    cases = [
        Case("malformed-jsonl", score("malformed-jsonl", t=d / "bad.jsonl"), ["bad.jsonl:2", "malformed JSON"],
             subprocess=True),
        Case("not-utf8", score("not-utf8", t=d / "latin1.jsonl"), ["latin1.jsonl:1", "UTF-8"]),
        Case("missing-column", score("missing-column", t=d / "nocol.jsonl"), ["nocol.jsonl", "missing column",
                                                                               "'text'"]),
        Case("null-text", score("null-text", t=d / "nulltext.jsonl"), ["nulltext.jsonl:2", "text", "null"]),
        Case("blank-text", score("blank-text", t=d / "blanktext.jsonl"), ["blanktext.jsonl:2", "text is empty"]),
        Case("non-string-id", score("non-string-id", t=d / "intid.jsonl"), ["intid.jsonl:1", "id must be a string"]),
        Case("duplicate-id", score("duplicate-id", t=d / "dup.jsonl"), ["duplicate id 'a'", "dup.jsonl:1",
                                                                        "dup.jsonl:2"]),
        Case("duplicate-id-markup", score("duplicate-id-markup", t=d / "dup-markup.jsonl"),
             ["duplicate id '[/x]'", "dup-markup.jsonl:2"]),
        Case("empty-dataset", score("empty-dataset", t=d / "empty.jsonl"), ["empty.jsonl", "no rows"]),
        Case("missing-file", score("missing-file", t=d / "nope.jsonl"), ["nope.jsonl", "no such file"]),
        Case("query-empty-prompt", score("query-empty-prompt", q=d / "q-noprompt.jsonl"),
             ["q-noprompt.jsonl:1", "prompt is empty"]),
        Case("query-empty-completion", score("query-empty-completion", q=d / "q-nocompletion.jsonl"),
             ["q-nocompletion.jsonl:1", "completion is empty"]),
        Case("query-missing-completion", score("query-missing-completion", q=d / "q-nocol.jsonl"),
             ["q-nocol.jsonl", "missing column", "'completion'"]),
        Case("too-long-refused", score("too-long-refused", "--max-length", "8", "--on-long", "error",
                                       t=d / "long.jsonl"), ["long.jsonl:4", "id 'long'", "exceed --max-length 8"]),
        Case("missing-model", score("missing-model", m=root / "no-such-model"), ["no-such-model",
                                                                                 "no such directory"]),
        Case("truncated-weights", score("truncated-weights", m=trunc), ["truncated-weights", "could not be loaded"]),
        Case("garbage-config", score("garbage-config", m=garbage), ["garbage-config", "config.json"]),
        Case("no-tokenizer", score("no-tokenizer", m=no_tok), ["no-tokenizer", "tokenizer"]),
        Case("tokenizer-too-big", score("tokenizer-too-big", m=small), ["tokenizer has", "embedding has 8 rows"]),
        Case("factors-other-model", score("factors-other-model", "--factors", str(factors), m=other),
             ["factors-ok", "another model"]),
        Case("factors-other-layers", score("factors-other-layers", "--factors", str(factors), "--layers", "attention"),
             ["factors-ok", "layers"]),
        Case("factors-other-strategy", score("factors-other-strategy", "--factors", str(factors), "--strategy", "kfac"),
             ["factors-ok", "strategy='ekfac', not 'kfac'"]),
        Case("nan-in-factors", score("nan-in-factors", "--factors", str(nan_factors)),
             [f"layer {nan_layer}", "NaN or Inf"], code=3),
        Case("nan-in-model", score("nan-in-model", m=nan_model), ["layer transformer.h.", "NaN or Inf"], code=3),
        Case("bad-strategy", score("bad-strategy", "--strategy", "bogus"), ["--strategy 'bogus'"]),
        Case("bad-damping", score("bad-damping", "--damping", "abc"), ["--damping 'abc'"]),
        Case("negative-top-k", score("negative-top-k", "--top-k", "-1"), ["--top-k", ">= 0"]),
        Case("bad-batch-size", score("bad-batch-size", "--batch-size", "abc"), ["--batch-size", "integer"]),
        Case("bad-on-long", score("bad-on-long", "--on-long", "bogus"), ["--on-long 'bogus'"]),
        Case("bad-layers-regex", score("bad-layers-regex", "--layers", "h.(0"), ["--layers 'h.(0'"]),
        Case("out-not-parquet", ["score", "--model", str(model), "--train", str(train), "--queries", str(qs),
                                 "--out", str(out / "x.csv")], ["--out", ".parquet"], out=out / "x.csv"),
        Case("missing-option", ["score", "--model", str(model), "--train", str(train), "--out",
                                str(out / "missing.parquet")], ["--queries"]),
        Case("unknown-command", ["frobnicate"], ["frobnicate"]),
        Case("fit-factors-malformed", ["fit-factors", "--model", str(model), "--train", str(d / "bad.jsonl"), "--out",
                                       str(out / "fit-malformed")], ["bad.jsonl:2"], out=out / "fit-malformed"),
        Case("fit-factors-nan-model", ["fit-factors", "--model", str(nan_model), "--train", str(train), "--out",
                                       str(out / "fit-nan"), "--device", "cpu"], ["NaN or Inf"], code=3,
             out=out / "fit-nan"),
        Case("audit-bad-damping", ["audit", "--model", str(model), "--train", str(train), "--queries", str(qs),
                                   "--damping", "abc", "--output-dir", str(out / "home")], ["--damping"],
             out=out / "home"),
        Case("audit-prefect-unreachable", ["audit", "--model", str(model), "--train", str(train), "--queries",
                                           str(qs), "--output-dir", str(out / "home")], ["Prefect", "PREFECT_API_URL"],
             out=out / "home", env={"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}, subprocess=True),
        Case("audit-bad-top-k", ["audit", "--model", str(model), "--train", str(train), "--queries", str(qs),
                                 "--top-k", "-1", "--output-dir", str(out / "home")], ["--top-k"], out=out / "home"),
    ]
    if not torch.cuda.is_available():
        cases.append(Case("cuda-on-cpu-machine", score("cuda-on-cpu-machine", "--device", "cuda"),
                          ["--device cuda", "CUDA is not available"]))
    for c in cases:
        if c.out is None and "--out" in c.args:
            c.out = Path(c.args[c.args.index("--out") + 1])
    separate = [c for c in cases if c.subprocess]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for c, proc in zip(separate, pool.map(lambda c: run_cli(c.args, env_=env(**c.env)), separate), strict=True):
            c.result = proc
    for c in cases:
        if not c.subprocess:
            c.result = run_in_process(c.args)
    COUNTS["inputs tried"] += len(cases)
    yield {"root": root, "model": model, "train": train, "queries": qs, "long": d / "long.jsonl", "out": out,
           "cases": {c.name: c for c in cases}}
    print("\ncase | exit | stderr")
    for c in cases:
        print(f"{c.name} | {c.result.returncode} | {' / '.join(error_lines(c.result))[:300]}")
    print(f"reliability counts after test_cli_errors: {report_counts()}")


CASE_NAMES = [
    "malformed-jsonl", "not-utf8", "missing-column", "null-text", "blank-text", "non-string-id", "duplicate-id",
    "duplicate-id-markup", "empty-dataset", "missing-file", "query-empty-prompt", "query-empty-completion",
    "query-missing-completion", "too-long-refused", "missing-model", "truncated-weights", "garbage-config",
    "no-tokenizer", "tokenizer-too-big", "factors-other-model", "factors-other-layers", "factors-other-strategy",
    "nan-in-factors", "nan-in-model", "bad-strategy", "bad-damping", "negative-top-k", "bad-batch-size",
    "bad-on-long", "bad-layers-regex", "out-not-parquet", "missing-option", "unknown-command",
    "fit-factors-malformed", "fit-factors-nan-model", "audit-bad-damping", "audit-bad-top-k",
    "audit-prefect-unreachable",
    "cuda-on-cpu-machine",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_line_and_leaves_nothing(world, name):
    if name not in world["cases"]:
        pytest.skip("CUDA is available here")
    case = world["cases"][name]
    proc = case.result
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both
    assert proc.returncode == case.code, both
    lines = error_lines(proc)
    assert len(lines) == 1, both
    line = lines[0]
    assert line.lower().startswith("error:") and len(line) < 500, line
    for part in case.expect:
        assert part in line, (part, line)
    if case.out is not None:
        assert not case.out.exists() or not any(case.out.iterdir()), case.out
    assert tmp_leftovers(world["out"]) == []
    assert tmp_leftovers(world["root"] / "factors-ok") == []


def test_too_long_truncated_and_counted(world):
    out = world["out"] / "truncated.parquet"
    proc = run_in_process(["score", "--model", str(world["model"]), "--train", str(world["long"]), "--queries",
                           str(world["queries"]), "--out", str(out), "--device", "cpu", "--max-length", "8",
                           "--on-long", "truncate", "--top-k", "0"])
    COUNTS["inputs tried"] += 1
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "1 truncated to 8" in proc.stderr, proc.stderr  # only the 18-word document
    df = pl.read_parquet(out)
    assert df.height == 2 * 4 and set(df["train_id"]) >= {"long"}


# -------------------------------------------------------------------------------------------- in process


def _enospc_polars(self, path, *args, **kwargs):
    Path(path).write_bytes(b"PAR1 half a file")
    raise pl.exceptions.ComputeError("parquet: File out of specification: underlying IO error: No space left on "
                                     "device (os error 28)")


def test_disk_full_parquet_json_safetensors(tmp_path, monkeypatch):
    """ENOSPC as polars, safetensors and Python raise it: a UserError saying 'disk full', and no file at all."""
    from influence_engine import factors as factors_mod
    from influence_engine.atomic import write_json_atomic
    from tasks.files import write_parquet_atomic

    monkeypatch.setattr(pl.DataFrame, "write_parquet", _enospc_polars)
    with pytest.raises(UserError, match="disk full"):
        write_parquet_atomic(pl.DataFrame({"a": [1]}), tmp_path / "x.parquet")

    def enospc_text(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", enospc_text)
    with pytest.raises(UserError, match="disk full"):
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    monkeypatch.undo()

    def enospc_safetensors(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(factors_mod, "save_file", enospc_safetensors)
    with pytest.raises(UserError, match="disk full"):
        factors_mod.save_tensors(tmp_path / "f.safetensors", {"x": torch.zeros(3)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    COUNTS["faults injected"] += 3


def test_disk_full_through_the_cli(world, tmp_path, monkeypatch, capsys):
    """`score` in process with every Parquet write hitting ENOSPC: one line, exit 2, no --out file."""
    from influence_audit import cli

    out = tmp_path / "scores.parquet"
    monkeypatch.setattr(pl.DataFrame, "write_parquet", _enospc_polars)
    monkeypatch.setattr(sys, "argv", ["influence-audit", "score", "--model", str(world["model"]), "--train",
                                      str(world["train"]), "--queries", str(world["queries"]), "--out", str(out),
                                      "--device", "cpu", "--max-length", "32", "--strategy", "identity"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    COUNTS["faults injected"] += 1
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "disk full" in lines[0] and str(out) in lines[0], err
    assert list(tmp_path.iterdir()) == []


class _OOMAbove:
    """Wraps a model: batches of more than ``limit`` documents raise torch.OutOfMemoryError."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.sizes = model, limit, []

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def __call__(self, **kwargs):
        n = kwargs["inputs_embeds"].shape[0]
        self.sizes.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated for {n} documents)")
        return self.model(**kwargs)


def _engine(model_dir: Path, batch_size: int):
    from influence_engine import InfluenceEngine

    return InfluenceEngine.from_pretrained(model_dir, layers="mlp", device="cpu", precision="fp64",
                                           batch_size=batch_size, max_length=32)


def test_out_of_memory_halves_the_batch_then_gives_up(world):
    eng = _engine(world["model"], 8)
    docs = eng.encode(corpus(12), where="train")
    qs = eng.encode(queries(2), where="queries")
    factors = eng.fit_factors(docs, "ekfac")
    prepared = eng.prepare_queries(qs, factors, rank=4)
    wrapper = _OOMAbove(eng.runner.model, limit=2)
    eng.runner.model = wrapper
    got = eng.score(docs, prepared, top_k=0)
    assert max(s for s in wrapper.sizes if s <= 2) == 2 and 8 in wrapper.sizes and 4 in wrapper.sizes
    ref_eng = _engine(world["model"], 1)
    ref = ref_eng.score(ref_eng.encode(corpus(12), where="train"), prepared, top_k=0)
    assert got.doc_ids == ref.doc_ids
    assert got.n_tokens == ref.n_tokens
    torch.testing.assert_close(torch.from_numpy(got.all_scores), torch.from_numpy(ref.all_scores), rtol=1e-9,
                               atol=1e-12)
    eng.runner.model = _OOMAbove(wrapper.model, limit=0)
    with pytest.raises(UserError, match="out of memory on cpu with one document"):
        eng.score(docs, prepared, top_k=5)
    eng.runner.model = wrapper.model
    COUNTS["faults injected"] += 2
    COUNTS["results compared"] += 1


def test_inf_in_scores_names_the_layer(world):
    eng = _engine(world["model"], 4)
    docs = eng.encode(corpus(5), where="train")
    prepared = eng.prepare_queries(eng.encode(queries(2), where="queries"), eng.fit_factors(docs, "identity"),
                                   rank=0)
    layer = list(prepared.layers)[1]
    prepared.layers[layer].full[0, 0, 0] = float("inf")
    with pytest.raises(NumericalError, match=re.escape(f"layer {layer}: scores contain NaN or Inf")):
        eng.score(docs, prepared, top_k=3)
    COUNTS["faults injected"] += 1


# ------------------------------------------------------------------------------------------------ safety


def test_remote_code_needs_the_flag(world, tmp_path):
    """A model whose config asks for code from its directory is refused without --trust-remote-code: the
    default never runs code that came with a model."""
    import json

    remote = tmp_path / "remote-code-model"
    shutil.copytree(world["model"], remote)
    config = json.loads((remote / "config.json").read_text())
    config |= {"model_type": "not-a-known-type", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                              "AutoModelForCausalLM": "modeling_x.XModel"}}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    proc = run_in_process(["score", "--model", str(remote), "--train", str(world["train"]), "--queries",
                           str(world["queries"]), "--out", str(tmp_path / "x.parquet")])
    COUNTS["inputs tried"] += 1
    assert proc.returncode == 2, proc.stderr
    assert "remote code ran" not in proc.stderr and "Traceback" not in proc.stderr
    assert "remote-code-model" in proc.stderr and not (tmp_path / "x.parquet").exists()


def test_document_ids_never_name_files(world, tmp_path):
    """Every file the per-shard stages write is named by the shard's index and fingerprint: ids full of path
    syntax go nowhere but into the files' contents."""
    from influence_engine import PreparedQueries
    from tasks.files import write_parquet_atomic
    from tasks.influence import compute as pipeline
    from tasks.inputs.rows import add_content_hashes, data_fingerprint

    df = add_content_hashes(pl.DataFrame({"id": ["../../escaped", "a/b", "/abs", "c"],
                                          "text": ["the cat sat", "a dog ran", "the cat ran", "a dog sat"]}))
    key = data_fingerprint(df)[:16]
    from tasks.inputs.sources import plan_ranges, resolve_sources

    write_parquet_atomic(df, tmp_path / "in" / "shard.parquet")
    (rows,) = plan_ranges(resolve_sources(tmp_path / "in" / "shard.parquet")[0], None)
    shard = pipeline.Shard(0, rows, key, df.height)
    spec = pipeline.EngineSpec(str(world["model"]), device="cpu", max_length=32)
    fdir = tmp_path / "factors"
    basis = pipeline.eigenbasis([pipeline.covariance_partial(spec, shard, str(fdir))], str(fdir))
    pipeline.lambda_partial(spec, shard, str(fdir), basis)
    eng = spec.engine()
    qs = eng.encode([{"id": "../q", "prompt": "the cat", "completion": " sat"}], where="queries")
    prepared = tmp_path / "prepared.safetensors"
    eng.prepare_queries(qs, eng.fit_factors(pipeline.shard_docs(eng, shard), "identity"), rank=0).save(prepared)
    out = tmp_path / "audit"
    scores = pl.read_parquet(pipeline.score_shard(spec, shard, str(prepared), str(out), 4))
    assert set(scores["train_id"]) == set(df["id"]) and PreparedQueries.load(prepared).ids == ["../q"]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted([f"factors/partials/cov-{key}.safetensors", f"factors/partials/lambda-{key}.safetensors",
                              "factors/eigenbasis.safetensors", "factors/covariance-counts.json",
                              f"audit/scores/shard-00000-{key}.parquet", f"audit/scores/shard-00000-{key}.json",
                              "in/shard.parquet", "prepared.safetensors"]), written


def test_ctrl_c_exits_130_with_a_resume_hint(world, monkeypatch, capsys):
    """typer turns Ctrl-C into a returned 130 when not standalone: it must not become exit 0."""
    import tasks.inputs.sources
    from influence_audit import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks.inputs.sources, "read_rows", interrupted)
    monkeypatch.setattr(sys, "argv", ["influence-audit", "score", "--model", str(world["model"]), "--train",
                                      str(world["train"]), "--queries", str(world["queries"]), "--out",
                                      str(world["out"] / "ctrl-c.parquet")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    COUNTS["faults injected"] += 1
    assert exit_info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (world["out"] / "ctrl-c.parquet").exists()

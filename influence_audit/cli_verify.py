"""``influence-audit verify`` and ``influence-audit evaluate``: is a candidate real, and how good are the scores?

Registered on the main app in ``influence_audit/cli.py``; the work is in :mod:`tasks.verify` and
:mod:`tasks.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["evaluate", "verify", "verify_scores"]

err = Console(stderr=True)
out = Console()

HomeOpt = Annotated[Path | None, typer.Option("--home", help="Audit home (default $INFLUENCE_AUDIT_HOME or "
                                                             "./.influence-audit)")]
UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: the audit's)")]
CheckOpt = Annotated[str, typer.Option("--verify-check", help="tail-patch (one optimizer step on the document; any "
                                                               "size) or pbrf (proximal Bregman response; small "
                                                               "models)")]
LrOpt = Annotated[float | None, typer.Option("--verify-lr", help="Tail-patch learning rate (default: chosen so the "
                                                                 "median step moves the weights by 1e-3 of their "
                                                                 "norm; recorded)")]
ParamsOpt = Annotated[str, typer.Option("--verify-params", help="all (what retraining changes) or tracked (the "
                                                                "tracked layers only)")]
OptimizerOpt = Annotated[str, typer.Option("--verify-optimizer", help="Tail-patch step: adam (preconditioned by "
                                                                      "training gradients' second moments) or sgd")]


def _settings(check: str, lr: float | None, params: str, optimizer: str, seed: int = 0):
    from influence_engine.verify import VerifySettings

    return VerifySettings(check=check, lr=lr, params=params, optimizer=optimizer, seed=seed)


def _print_summary(summary: dict[str, Any]) -> None:
    m = summary["metrics"]
    s = summary["settings"]
    how = (f"lr {s['lr']:.3g}{' (chosen)' if s.get('lr_chosen') else ''}, {s['optimizer']}" if s["check"] ==
           "tail-patch" else f"ε {s['epsilon']:.3g}, λ {s['damping']:.3g}")
    out.print(f"verification ({s['check']}: {how}; {s['params']} parameters): "
              f"verified_at_10 = [bold]{m['verified_at_10']:.2f}[/] vs random documents "
              f"{m['verified_random_at_10']:.2f}; Spearman(score, delta) {m['verify_spearman']:.2f}; "
              f"{m['verify_seconds']:.1f} s")


def verify(audit_id: Annotated[str, typer.Option("--audit", help="Audit id (see `review list`)")],
           k: Annotated[int, typer.Option("--k", help="Top candidates per query to check (and as many random "
                                                      "documents)")] = 10,
           verify_check: CheckOpt = "tail-patch", verify_lr: LrOpt = None, verify_params: ParamsOpt = "all",
           verify_optimizer: OptimizerOpt = "adam", home: HomeOpt = None, tracking_uri: UriOpt = None) -> None:
    """Counterfactual check of a finished audit's top candidates: up- and down-weight each, measure the query."""
    from tasks.verify import verify_existing_audit

    settings = _settings(verify_check, verify_lr, verify_params, verify_optimizer)
    summary = verify_existing_audit(home, audit_id, k=k, settings=settings, tracking_uri=tracking_uri,
                                    log=lambda m: err.print(escape(m), highlight=False))
    _print_summary(summary)
    err.print(escape(summary["validation_summary"]), highlight=False)
    if summary["run_id"]:
        err.print(f"recorded on MLflow run {summary['run_id']}")


def verify_scores(eng: Any, out_path: Path, train_df: Any, query_df: Any, prepared: Any, k: int, check: str,
                  lr: float | None) -> None:
    """``score --verify K``: check the written scores' top-K (columns added to ``--out``; details beside it)."""
    from tasks.verify import verify_candidates

    summary = verify_candidates(eng, audit_dir=out_path.parent / f"{out_path.stem}.verification",
                                candidates_path=out_path, train=train_df, queries=query_df, prepared=prepared, k=k,
                                settings=_settings(check, lr, "all", "adam"),
                                log=lambda m: err.print(escape(m), highlight=False))
    _print_summary(summary)


def evaluate(audit_id: Annotated[str, typer.Option("--audit", help="Audit id (see `review list`)")],
             masks: Annotated[Path | None, typer.Option(help="Subset masks, S x N (.pt, .npy or .csv): 1 where "
                                                             "retraining run s kept document n")] = None,
             outputs: Annotated[Path | None, typer.Option(help="Measured query outputs, S x Q, on each retrained "
                                                               "model (.pt, .npy or .csv)")] = None,
             outputs_kind: Annotated[str, typer.Option(help="logprob (log p(completion | prompt)) or loss (its "
                                                            "negative, as kronfluence's losses.pt)")] = "logprob",
             kronfluence: Annotated[Path | None, typer.Option(help="A directory with kronfluence's masks.pt and "
                                                                   "losses.pt (sets --masks, --outputs, "
                                                                   "--outputs-kind loss)")] = None,
             doc_ids: Annotated[Path | None, typer.Option(help="JSON list: the document of each mask column "
                                                               "(default: the audit's training order)")] = None,
             query_ids: Annotated[Path | None, typer.Option(help="JSON list: the query of each output column "
                                                                 "(default: the audit's query order)")] = None,
             planted: Annotated[Path | None, typer.Option(help="JSON {query_id: [train ids]}: planted recall@10 "
                                                               "and MRR")] = None,
             home: HomeOpt = None, tracking_uri: UriOpt = None) -> None:
    """Attribution quality of a finished audit: LDS against retraining results, planted-fact recall."""
    from influence_engine.errors import UserError
    from tasks.evaluate import evaluate_audit

    if kronfluence is not None:
        if masks is not None or outputs is not None:
            raise UserError("--kronfluence replaces --masks/--outputs: give one or the other")
        masks, outputs, outputs_kind = kronfluence / "masks.pt", kronfluence / "losses.pt", "loss"
    result = evaluate_audit(home, audit_id, masks=masks, outputs=outputs, outputs_kind=outputs_kind,
                            doc_ids=doc_ids, query_ids=query_ids, planted=planted, tracking_uri=tracking_uri,
                            log=lambda m: err.print(escape(m), highlight=False))
    for key, value in result["metrics"].items():
        out.print(f"{key} = {value:.4f}")
    if result["run_id"]:
        err.print(f"recorded on MLflow run {result['run_id']}")

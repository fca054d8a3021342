"""``influence-audit verify`` and ``influence-audit evaluate``: is a candidate real, and how good are the scores?

Registered on the main app in ``influence_audit/cli.py``; the work is in :mod:`tasks.influence.verify` and
:mod:`tasks.influence.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from influence_audit.console import err, out
from influence_audit.options import Opts, audit_id_of, takes

__all__ = ["evaluate", "print_verification", "verify"]

WHERE = {"output": ("output_dir", "tracking_uri")}


def print_verification(summary: dict[str, Any]) -> None:
    m = summary["metrics"]
    s = summary["settings"]
    how = (f"lr {s['lr']:.3g}{' (chosen)' if s.get('lr_chosen') else ''}, {s['optimizer']}" if s["check"] ==
           "tail-patch" else f"ε {s['epsilon']:.3g}, λ {s['damping']:.3g}")
    out.print(f"verification ({s['check']}: {how}; {s['params']} parameters): "
              f"verified_at_10 = [bold]{m['verified_at_10']:.2f}[/] vs random documents "
              f"{m['verified_random_at_10']:.2f}; Spearman(score, delta) {m['verify_spearman']:.2f}; "
              f"{m['verify_seconds']:.1f} s")


@takes("audit_ref", fields=WHERE | {"verify": ("verify_k", "verify_check", "verify_lr", "verify_params",
                                               "verify_optimizer")}, defaults={"verify_k": 10})
def verify(opts: Opts = None) -> None:
    """Counterfactual check of a finished audit's top candidates: up- and down-weight each, measure the query
    (--verify K: the top K per query, and as many random documents; 10 here, where the check is the point)."""
    from tasks.influence.verify import settings_from, verify_existing_audit

    v = opts.verify
    settings = settings_from(v.verify_check, v.verify_lr, v.verify_params, v.verify_optimizer)
    summary = verify_existing_audit(opts.output.output_dir, audit_id_of(None, opts), k=v.verify_k, settings=settings,
                                    tracking_uri=opts.output.tracking_uri,
                                    log=lambda m: err.print(escape(m), highlight=False))
    print_verification(summary)
    err.print(escape(summary["validation_summary"]), highlight=False)
    if summary["run_id"]:
        err.print(f"recorded on MLflow run {summary['run_id']}")


@takes("audit_ref", fields=WHERE | {"sampling": ("planted",)})
def evaluate(masks: Annotated[Path | None, typer.Option(help="Subset masks, S x N (.pt, .npy or .csv): 1 where "
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
             opts: Opts = None) -> None:
    """Attribution quality of a finished audit: LDS against retraining results, planted-fact recall."""
    from influence_engine.errors import UserError
    from tasks.influence.evaluate import evaluate_audit

    if kronfluence is not None:
        if masks is not None or outputs is not None:
            raise UserError("--kronfluence replaces --masks/--outputs: give one or the other")
        masks, outputs, outputs_kind = kronfluence / "masks.pt", kronfluence / "losses.pt", "loss"
    result = evaluate_audit(opts.output.output_dir, audit_id_of(None, opts), masks=masks, outputs=outputs,
                            outputs_kind=outputs_kind,
                            doc_ids=doc_ids, query_ids=query_ids, planted=opts.sampling.planted,
                            tracking_uri=opts.output.tracking_uri,
                            log=lambda m: err.print(escape(m), highlight=False))
    for key, value in result["metrics"].items():
        out.print(f"{key} = {value:.4f}")
    if result["run_id"]:
        err.print(f"recorded on MLflow run {result['run_id']}")

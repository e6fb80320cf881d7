"""The aggregate of a k-fold set: mean ± std of its folds' metrics, in the search's records and W&B,
and with the spec's eval_dir the fold-ensemble submission (soft vote of the folds' best checkpoints).

schedule-search publishes a spec with kfold.k = K as K fold jobs plus one aggregate job that
depends on them (RQ `depends_on`, failures allowed so a failed fold is reported rather than
leaving the aggregate waiting forever). The folds' own records (worker.results) are the input:
they outlive RQ's copy of the results.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rq.job import Job

from contracts.job_meta import set_failure, update_job_meta
from contracts.spec import ExperimentSpec, load_spec
from trainer.paths import runs_root
from trainer.store import open_store
from worker.results import get_run, record_run
from worker.search_trial import parse_payload, search_fields

FOLD_METRICS = ("val_f1", "val_acc")


class FoldsMissing(RuntimeError):
    """Some folds of the set did not finish; re-running the search retries them and this aggregate."""


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and (population) standard deviation over the folds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def summarize_folds(records: list[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """Mean ± std of each fold metric (best epoch's F1 and accuracy, and the search's metric)."""
    summary = {name: mean_std([float(record["best"][name]) for record in records]) for name in FOLD_METRICS}
    if metric not in summary:
        summary[metric] = mean_std([float(record["metric"]["best"]) for record in records])
    return summary


def write_fold_ensemble(spec: ExperimentSpec, fold_rows: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """Soft-vote the folds' best checkpoints on the spec's eval_dir into run_dir/submission.csv.

    Scored too when the eval dir has answers (the demo data's eval/answers.csv). Without an
    eval_dir there is nothing to write.
    """
    if not spec.eval_dir:
        return {"written": False, "reason": "the spec has no eval_dir"}
    from trainer.infer import load_runs, score_submission, submit
    from trainer.store import open_store

    # With a run store the folds are read from it by name (they may have trained on other boxes).
    remote = open_store(spec.output_dir).remote
    sources = [row["run_name"] if remote else row["run_dir"] for row in fold_rows]
    runs = load_runs(sources, checkpoint="best", device=spec.device)
    path = submit(runs, spec.eval_dir, voting="soft", tta=spec.tta, output=run_dir / "submission.csv")
    ensemble: dict[str, Any] = {"written": True, "path": str(path), "voting": "soft", "tta": spec.tta}
    answers = Path(spec.eval_dir).expanduser() / "answers.csv"
    if answers.is_file():  # the demo data knows its eval labels
        ensemble["eval"] = score_submission(path, answers, runs[0].num_classes)
    return ensemble


def aggregate(
    job: Job | None, search: dict[str, Any], spec: dict[str, Any], folds: list[dict[str, Any]], run_name: str
) -> dict[str, Any]:
    """Read every fold's record, write the set's mean ± std as its own record and W&B run; return it."""
    payload = parse_payload(search)
    experiment = load_spec(spec)
    connection = job.connection if job is not None else None
    records, missing = [], []
    for fold in sorted(folds, key=lambda fold: fold["fold"]):
        record = get_run(connection, fold["run_name"]) if connection is not None else None
        (records if record else missing).append(record or fold)
    if missing:
        message = (
            f"folds {', '.join(str(fold['fold']) for fold in missing)} of {run_name} did not finish; "
            "re-run the search to retry them (finished folds are kept)"
        )
        if job is not None:
            set_failure(job.meta, "fold_failed", message)
            job.retries_left = 0
            job.save_meta()
        raise FoldsMissing(message)

    metrics = summarize_folds(records, payload.metric.name)
    fold_rows = [
        {
            "fold": fold["fold"],
            "run_name": record["run_name"],
            "status": record.get("status", "finished"),
            **{name: float(record["best"][name]) for name in FOLD_METRICS},
            "best_epoch": record["best"]["epoch"],
            "run_dir": record["run_dir"],
        }
        for fold, record in zip(sorted(folds, key=lambda fold: fold["fold"]), records, strict=True)
    ]
    run_dir = runs_root(experiment.output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    ensemble = write_fold_ensemble(experiment, fold_rows, run_dir)
    wandb_info = _log_to_wandb(experiment, run_name, run_dir, fold_rows, metrics, ensemble)
    best = {"val_f1": metrics["val_f1"]["mean"], "val_acc": metrics["val_acc"]["mean"], "epoch": None}
    result = {
        "run_name": run_name,
        "kind": "kfold",
        "spec_hash": experiment.spec_hash(),
        "model": experiment.model,
        "loss": experiment.loss,
        "k": experiment.kfold.k,
        "folds": fold_rows,
        "mean": {name: value["mean"] for name, value in metrics.items()},
        "std": {name: value["std"] for name, value in metrics.items()},
        "best": best,
        "epochs_completed": sum(record.get("epochs_completed", 0) for record in records),
        "run_dir": str(run_dir),
        "store": open_store(experiment.output_dir).run_url(run_name),
        "ensemble": ensemble,
        "wandb": wandb_info,
        "job_id": job.id if job is not None else None,
        "finished_at": time.time(),
    }
    result |= search_fields(payload, metrics[payload.metric.name]["mean"], "finished")
    result["durations"] = {"total_s": sum(record.get("durations", {}).get("total_s", 0.0) for record in records)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    publish_to_store(experiment, run_name, run_dir, result)
    if connection is not None:
        record_run(connection, result, global_board=False)
        update_job_meta(job.meta, status="finished")
        job.save_meta()
    return result


def publish_to_store(experiment: ExperimentSpec, run_name: str, run_dir: Path, result: dict[str, Any]) -> None:
    """Copy the aggregate's files (result, ensemble submission, W&B run) into the run store."""
    from trainer.store_sync import StoreSync

    store = open_store(experiment.output_dir)
    if store.remote:
        StoreSync(store, run_name, run_dir).finish("finished", {"best": result["best"], "kind": "kfold"})


def _log_to_wandb(
    experiment: ExperimentSpec,
    run_name: str,
    run_dir: Path,
    fold_rows: list[dict[str, Any]],
    metrics: dict[str, dict[str, float]],
    ensemble: dict[str, Any],
) -> dict[str, Any]:
    """One W&B run for the set, in the folds' group: each fold's best as a step, mean ± std as summary,
    the fold-ensemble submission as an artifact."""
    from trainer.tracking import WandbTracker

    tracker = WandbTracker(
        run_name,
        run_dir,
        experiment.to_payload() | {"run_name": run_name, "folds": [row["run_name"] for row in fold_rows]},
        project=experiment.wandb.project,
        entity=experiment.wandb.entity,
        group=experiment.wandb.group,
        tags=experiment.wandb.tags,
        job_type="aggregate",
    )
    try:
        for row in fold_rows:
            tracker.log({f"fold_{name}": row[name] for name in FOLD_METRICS}, step=row["fold"] + 1)
        scored = {f"ensemble_eval_{key}": value for key, value in ensemble.get("eval", {}).items()}
        tracker.summary(
            {f"{name}_{stat}": value[stat] for name, value in metrics.items() for stat in ("mean", "std")}
            | {"k": len(fold_rows)}
            | scored
        )
        if ensemble["written"]:
            tracker.log_artifact(
                Path(ensemble["path"]),
                name=f"{run_name}-submission",
                kind="submission",
                metadata={
                    "voting": "soft",
                    "tta": ensemble["tta"],
                    "folds": len(fold_rows),
                    **ensemble.get("eval", {}),
                },
            )
        return tracker.describe()
    finally:
        tracker.finish()

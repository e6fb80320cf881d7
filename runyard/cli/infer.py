"""`runyard infer`: a submission CSV from one run, the k fold runs of a cross-validation, or an ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import click

from runyard.cli.common import CONTEXT, fail


@click.command("infer", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--eval-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory with images/ and info.csv (ImageID,ans); rows come out in info.csv's order.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("submission.csv"),
    show_default=True,
    help="Where to write the submission CSV (ImageID,ans).",
)
@click.option(
    "--voting",
    type=click.Choice(["auto", "soft", "hard"]),
    default="auto",
    show_default=True,
    help="Combining several runs. soft: mean class probabilities; hard: majority of each run's class, "
    "ties to the class most frequent in training; auto: soft for one run or the folds of one "
    "cross-validation, hard for other ensembles.",
)
@click.option(
    "--tta",
    type=click.Choice(["none", "hflip"]),
    default="none",
    show_default=True,
    help="Test-time augmentation: hflip averages each image's probabilities with its mirror's.",
)
@click.option(
    "--checkpoint",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Which checkpoint of each run: best validation F1, or the last epoch.",
)
@click.option(
    "--batch-size", type=click.IntRange(1, 8192), help="Images per batch.  [default: each run's valid_batch_size]"
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto uses CUDA when a GPU is visible.",
)
@click.option(
    "--answers",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An answers CSV (ImageID,ans) to score the submission against.  [default: EVAL_DIR/answers.csv if present]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the output path, voting and score as JSON.")
def infer_command(runs, eval_dir, output, voting, tta, checkpoint, batch_size, device, answers, as_json):
    """Write a submission CSV (ImageID,ans) for EVAL_DIR from one or more trained RUNS.

    Each RUN is a run dir or a run name under $RUNYARD_HOME/runs; its checkpoints/best.pt (EMA
    weights when the run kept them) and spec (size, crop, heads) are used. All runs must predict
    the same classes.

    \b
    Examples:
      runyard infer RUN_NAME --eval-dir data/eval                          # one run
      runyard infer runs/cv_fold0 runs/cv_fold1 runs/cv_fold2 --eval-dir data/eval --tta hflip
      runyard infer RUN_A RUN_B RUN_C --eval-dir data/eval --voting hard -o ensemble.csv
    """
    from trainer.data import DataError
    from trainer.infer import InferenceError, choose_voting, load_runs, read_eval_dir, score_submission, submit

    def say(message: str) -> None:
        click.echo(message, err=True)

    try:
        read_eval_dir(eval_dir)  # a bad eval dir is reported before any model is loaded
        loaded = load_runs(runs, checkpoint, device)
        for run in loaded:
            if not (run.run_dir / "result.json").is_file():
                # A run writes result.json only when it finishes: this one failed, was cancelled or still runs.
                say(
                    f"warning: run {run.run_dir.name} did not finish (no result.json): its {checkpoint} checkpoint "
                    "may be from an early epoch; `runyard status` says why it stopped"
                )
        used_voting = choose_voting(loaded, voting)
        path = submit(loaded, eval_dir, used_voting, tta, output, batch_size, progress=say)
        answers = answers or (eval_dir / "answers.csv" if (eval_dir / "answers.csv").is_file() else None)
        score = score_submission(path, answers, loaded[0].num_classes) if answers else None
    except (InferenceError, DataError) as error:
        fail(str(error))
    summary = {"submission": str(path), "runs": len(runs), "voting": used_voting, "tta": tta, "score": score}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif score:
        click.echo(f"{path}: macro F1 {score['f1']:.4f}, accuracy {score['acc']:.4f} against {answers}")
    else:
        click.echo(str(path))

"""`runyard train`: run one spec here and now, with no queue and no Redis (the seed's `python train.py`).

The options are the spec's fields, exactly as `publish` has them. Torch is imported only once
the spec is valid, so `runyard --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from contracts.spec import SpecError
from publisher.options import spec_options
from runyard.cli.common import CONTEXT, fail
from runyard.cli.publish import build_spec


@click.command("train", context_settings=CONTEXT)
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML spec file used as the base.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (progress stays on stderr).")
@spec_options
def train_command(config, as_json, **parameters):
    """Train one experiment spec on this machine: no queue, no Redis, no worker.

    Every spec field is an option; a --config YAML file gives the base and options override it.
    One line per epoch goes to stderr; the run dir ($RUNYARD_HOME/runs/<run name>, or
    --output-dir) gets the checkpoints, metrics.csv, train.log, pictures/ and, with --eval-dir,
    submission.csv. W&B logs offline unless WANDB_API_KEY is set.

    \b
    Examples:
      runyard make-demo-data demo && runyard train --data-dir demo/train --model test_efficientnet \\
          --no-pretrained --resize 64x48 --epochs 5 --eval-dir demo/eval
      runyard train --config spec.yaml --lr 3e-4 --json
    """
    try:
        spec = build_spec(config, parameters)
    except SpecError as error:
        fail(f"invalid spec, nothing trained:\n{error}")

    from trainer.data import DataError
    from trainer.models import PretrainedWeightsError
    from trainer.store import StoreError
    from trainer.train import train

    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("runyard")
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    try:
        result = train(spec, context={"command": "runyard train"})
    except DataError as error:
        fail(str(error))
    except PretrainedWeightsError as error:
        fail(str(error), code=1)
    except StoreError as error:
        fail(str(error), code=1)
    except KeyboardInterrupt:
        fail("interrupted; the run dir keeps the checkpoints of the finished epochs", code=130)
    finally:
        logger.removeHandler(progress)

    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    best = result["best"]
    click.echo(f"finished {result['run_name']}: best val F1 {best['val_f1']:.4f} (epoch {best['epoch']})")
    click.echo(f"  run dir {result['run_dir']}")
    submission = result.get("submission")
    if submission:
        scored = submission.get("eval")
        score = f" (macro F1 {scored['f1']:.4f} against answers.csv)" if scored else ""
        click.echo(f"  submission {submission['path']}{score}")
    if result["wandb"].get("sync"):
        click.echo(f"  W&B offline run: upload it with `{result['wandb']['sync']}`")

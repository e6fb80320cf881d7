"""`runyard`: one entry point gathering every command of the product."""

from __future__ import annotations

import json
from pathlib import Path

import click

from contracts.spec import parse_size
from runyard import __version__
from runyard.cli.common import CONTEXT, fail
from runyard.cli.infer import infer_command
from runyard.cli.publish import cancel_command, leaderboard_command, publish_command, status_command
from runyard.cli.schedule_search import compare_command, schedule_search_command
from runyard.cli.sharing import preemption_command, quota_group
from runyard.cli.store import gc_command, pull_command, runs_command
from runyard.cli.train import train_command
from runyard.cli.worker import janitor_command, worker_command
from runyard.dashboard import dashboard_command
from runyard.demo import demo_command
from runyard.doctor import doctor_command
from worker.connection import RedisUnavailable, embedded_server, mask_url, redis_url
from worker.embedded import EmbeddedRedisError


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="runyard")
def main():
    """runyard: publish training experiments to a Redis queue and run them on GPU workers.

    \b
    Quick start (embedded Redis, generated data, CPU):
      runyard demo
    \b
    The usual loop:
      publish --model efficientnet_b2 --loss f1     # queue one experiment
      schedule-search grid.yaml                     # a grid, random or bayes search
      worker --gpus 0,1,2,3                         # on each GPU box
      runyard status                                # what runs, with epoch and F1
      runyard leaderboard                           # best runs first
    \b
    Without a queue:
      runyard train --config spec.yaml              # one spec, here and now
      runyard infer RUN... --eval-dir data/eval     # a submission CSV from runs
    \b
    Runs on every box (RUNYARD_STORE=/mnt/shared/runyard or s3://bucket/prefix):
      runyard runs                                  # what the store holds
      runyard pull RUN                              # a run's files onto this box
      runyard gc --keep-top 5                       # what retention would delete (--yes deletes)
    """


@main.command("make-demo-data", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--profiles", type=click.IntRange(6, 100_000), default=180, show_default=True, help="People in train/.")
@click.option(
    "--eval-profiles", type=click.IntRange(1, 100_000), default=36, show_default=True, help="People in eval/."
)
@click.option("--image-size", default="512x384", show_default=True, help="HEIGHTxWIDTH of each photo.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same images.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def make_demo_data_command(directory, profiles, eval_profiles, image_size, seed, as_json):
    """Generate a synthetic mask-status dataset in the competition's layout.

    DIRECTORY/train/images/<id>_<gender>_<race>_<age>/{mask1..5,incorrect_mask,normal}.jpg,
    DIRECTORY/train/train.csv, DIRECTORY/eval/images/*.jpg and DIRECTORY/eval/info.csv.
    """
    from trainer.demo_data import make_demo_dataset

    try:
        size = parse_size(image_size)
    except ValueError as error:
        fail(f"--image-size: {error}")
    if min(size) < 32:
        fail(f"--image-size {image_size}: faces need at least 32 pixels a side")
    counts = make_demo_dataset(directory, profiles=profiles, eval_profiles=eval_profiles, image_size=size, seed=seed)
    if as_json:
        click.echo(json.dumps({"directory": str(directory), **counts}))
    else:
        click.echo(
            f"wrote {counts['train_images']} train images ({profiles} profiles) and {counts['eval_images']} eval images"
            f" to {directory}; train with --data-dir {directory / 'train'}"
        )


@main.group("redis", context_settings=CONTEXT)
def redis_group():
    """The embedded Redis under $RUNYARD_HOME (used when REDIS_URL is not set)."""


@redis_group.command("url")
def redis_url_command():
    """Print the Redis URL runyard uses (password masked)."""
    try:
        click.echo(mask_url(redis_url(start_embedded=False)))
    except RedisUnavailable as error:
        fail(str(error), code=1)


@redis_group.command("start")
def redis_start_command():
    """Start the embedded Redis if it is not running."""
    try:
        click.echo(embedded_server().ensure_running())
    except EmbeddedRedisError as error:
        fail(str(error), code=1)


@redis_group.command("stop")
def redis_stop_command():
    """Stop the embedded Redis (its data is saved and comes back on the next start)."""
    server = embedded_server()
    click.echo(f"stopped {server.url}" if server.stop() else f"no embedded Redis running at {server.url}")


main.add_command(publish_command)
main.add_command(worker_command)
main.add_command(status_command)
main.add_command(leaderboard_command)
main.add_command(demo_command)
main.add_command(dashboard_command)
main.add_command(doctor_command)
main.add_command(cancel_command)
main.add_command(janitor_command)
main.add_command(train_command)
main.add_command(infer_command)
main.add_command(runs_command)
main.add_command(pull_command)
main.add_command(gc_command)
main.add_command(schedule_search_command)
main.add_command(compare_command)
main.add_command(quota_group)
main.add_command(preemption_command)

"""`runyard quota` and `runyard preemption`: the knobs of sharing the workers between people."""

from __future__ import annotations

import json

import click

from runyard.cli.common import CONTEXT, connect_or_fail, fail
from worker.preemption import queues_without_preemption, set_queue_preemption
from worker.quotas import QuotaError, quotas, set_quota, unset_quota


@click.group("quota", context_settings=CONTEXT, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def quota_group(context: click.Context, as_json: bool) -> None:
    """Per-owner caps on concurrent GPUs; with no subcommand, list them.

    \b
    Examples:
      runyard quota set alice 2
      runyard quota unset alice
      runyard quota --json
    """
    if context.invoked_subcommand is not None:
        return
    caps = quotas(connect_or_fail())
    if as_json:
        click.echo(json.dumps(caps, indent=2))
    elif not caps:
        click.echo("no quotas: every owner may use every free GPU (set one with `runyard quota set OWNER N`)")
    else:
        for owner, gpus in sorted(caps.items()):
            click.echo(f"{owner}\t{gpus}")


@quota_group.command("set")
@click.argument("owner")
@click.argument("gpus", type=click.IntRange(0, 10_000))
def quota_set_command(owner: str, gpus: int) -> None:
    """Let OWNER's jobs hold at most GPUS GPUs at once (0 holds them all queued)."""
    try:
        set_quota(connect_or_fail(), owner, gpus)
    except QuotaError as error:
        fail(str(error))
    click.echo(f"quota for {owner}: {gpus} concurrent GPU(s)")


@quota_group.command("unset")
@click.argument("owner")
def quota_unset_command(owner: str) -> None:
    """Remove OWNER's cap."""
    removed = unset_quota(connect_or_fail(), owner)
    click.echo(f"quota for {owner} removed" if removed else f"{owner} had no quota")


@click.command("preemption", context_settings=CONTEXT)
@click.argument("state", type=click.Choice(["on", "off"]), required=False)
@click.argument("queue", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def preemption_command(state: str | None, queue: str | None, as_json: bool) -> None:
    """Turn preemption of a queue's jobs on or off; with no arguments, list the queues with it off.

    By default a waiting `high` job may stop a `default` or `low` job (see `publish --no-preempt`
    for one job).

    \b
    Examples:
      runyard preemption off default
      runyard preemption on default
    """
    connection = connect_or_fail()
    if state is not None:
        if not queue:
            fail(f"`runyard preemption {state}` needs a QUEUE, e.g. `runyard preemption {state} default`")
        set_queue_preemption(connection, queue, state == "on")
    off = sorted(queues_without_preemption(connection))
    if as_json:
        click.echo(json.dumps({"preemption_off": off}, indent=2))
    else:
        click.echo(f"preemption off for: {', '.join(off)}" if off else "preemption on for every queue")

"""`runyard dashboard`: the stock rq-dashboard, set up for runyard's JSON jobs.

rq-dashboard 0.9 reads jobs with pickle unless told otherwise, and its workers endpoint fetches
each busy worker's job without the serializer (HTTP 500 while a JSON worker trains). Rather than
fork it, this module builds its Flask app with the JSON serializer, replaces that one endpoint,
and shows each job as its run name with the progress the worker writes into the job's meta.
It binds 127.0.0.1 by default: the dashboard can delete and requeue jobs.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import sys
from typing import Any

import click
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.job_meta import read_job_meta
from runyard.cli.common import CONTEXT, connect_or_fail, fail
from worker.connection import mask_url, redis_url

DEFAULT_PORT = 9181

# Rendering the dashboard in Debian's headless chromium (the README's screenshots, the tests):
# no sandbox (root in a container), and nothing that phones home from a box without internet.
HEADLESS_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def describe_job(job: Job) -> str:
    """What the dashboard shows for a job: `run name · epoch 3/10 · val F1 0.8123 · best 0.8400 · ETA 4m09s`."""
    try:
        meta = read_job_meta(job.meta, job.id)
    except Exception:  # a payload that is not runyard's: show what RQ has
        meta = read_job_meta({})
    parts = [meta.run_name or job.description or job.id]
    progress = meta.progress or {}
    if progress:
        parts.append(f"epoch {progress.get('epoch')}/{progress.get('epochs')}")
        if progress.get("val_f1") is not None:
            parts.append(f"val F1 {progress['val_f1']:.4f}")
        if progress.get("best_val_f1") is not None:
            parts.append(f"best {progress['best_val_f1']:.4f}")
        if progress.get("eta_seconds"):
            minutes, seconds = divmod(int(progress["eta_seconds"]), 60)
            hours, minutes = divmod(minutes, 60)
            parts.append(f"ETA {hours}h{minutes:02d}m" if hours else f"ETA {minutes}m{seconds:02d}s")
    elif meta.epochs:
        parts.append(f"{meta.epochs} epochs")
    if meta.failure_reason:
        parts.append(f"failed: {meta.failure_reason}")
    return " · ".join(str(part) for part in parts)


def list_workers(instance_number: int) -> dict[str, Any]:
    """rq-dashboard's workers.json, reading workers and their jobs with the JSON serializer."""
    from flask import current_app

    rows = []
    for worker in Worker.all(connection=current_app.redis_conn, serializer=JSONSerializer):
        job = worker.get_current_job()
        current = "idle"
        if job is not None:
            description = describe_job(job)
            # The dashboard's workers table shows call_string; a run name says more than the call.
            current = {
                "job_id": job.id,
                "description": description,
                "call_string": description,
                "created_at": job.created_at.isoformat() if job.created_at else None,
            }
        rows.append(
            {
                "name": worker.name,
                "hostname": worker.hostname,
                "pid": worker.pid,
                "queues": [queue.name for queue in worker.queues],
                "state": str(worker.get_state()),
                "current_job": current,
                "last_heartbeat": worker.last_heartbeat,
                "birth_date": worker.birth_date,
                "successful_job_count": worker.successful_job_count,
                "failed_job_count": worker.failed_job_count,
                "total_working_time": worker.total_working_time,
                "version": getattr(worker, "version", ""),
                "python_version": getattr(worker, "python_version", ""),
            }
        )
    return {"workers": sorted(rows, key=lambda row: (row["state"], row["queues"], row["name"]))}


def create_app(
    url: str, username: str | None = None, password: str | None = None, url_prefix: str = "", poll_ms: int = 2500
) -> Any:
    """rq-dashboard's Flask app for the Redis at `url`, with runyard's serializer and endpoints."""
    from flask import Response, request
    from rq_dashboard import web
    from rq_dashboard.cli import make_flask_app

    web.config.serializer = JSONSerializer
    # rq-dashboard looks this function up on each request: every job list, job page and worker
    # row then shows run name and progress instead of RQ's description only.
    web.format_job_description = describe_job
    app = make_flask_app(None, None, None, url_prefix)  # basic auth is added below, on the app
    app.config["RQ_DASHBOARD_REDIS_URL"] = url
    app.config["RQ_DASHBOARD_POLL_INTERVAL"] = poll_ms
    app.config["DEPRECATED_OPTIONS"] = []
    web.setup_rq_connection(app)
    app.view_functions["rq_dashboard.list_workers"] = web.jsonify(list_workers)

    if username:

        @app.before_request
        def require_basic_auth():
            auth = request.authorization
            if (
                auth is None
                or not hmac.compare_digest((auth.username or "").encode(), username.encode())
                or not hmac.compare_digest((auth.password or "").encode(), (password or "").encode())
            ):
                return Response("runyard dashboard: log in", 401, {"WWW-Authenticate": 'Basic realm="runyard"'})
            return None

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("dashboard", context_settings=CONTEXT)
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True, help="Port (0: any free)."
)
@click.option("--username", envvar="RQ_DASHBOARD_USERNAME", help="Basic-auth user.  [env: RQ_DASHBOARD_USERNAME]")
@click.option("--password", envvar="RQ_DASHBOARD_PASSWORD", help="Basic-auth password.  [env: RQ_DASHBOARD_PASSWORD]")
@click.option("--url-prefix", default="", help="Path prefix behind a reverse proxy, e.g. /rq.")
@click.option(
    "--poll-interval", type=click.IntRange(250, 600_000), default=2500, show_default=True, help="Page refresh, ms."
)
def dashboard_command(bind, port, username, password, url_prefix, poll_interval):
    """Watch queues, jobs and workers in rq-dashboard, set up for runyard's jobs.

    Redis is REDIS_URL if set, else the embedded server. Jobs show as their run name with epoch,
    validation F1 and ETA. Listens on 127.0.0.1 only unless --bind says otherwise; on any other
    address, set --username and --password (or RQ_DASHBOARD_USERNAME / RQ_DASHBOARD_PASSWORD).

    \b
    Examples:
      runyard dashboard                           # http://127.0.0.1:9181
      ssh -L 9181:localhost:9181 redis-box        # from a laptop, to a dashboard on the Redis box
    """
    if bool(username) != bool(password):
        fail("--username and --password go together: set both (or RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD)")
    try:
        import rq_dashboard  # noqa: F401
    except ImportError:
        fail("rq-dashboard is not installed: pip install 'runyard[dashboard]'", code=1)
    from werkzeug.serving import make_server

    connect_or_fail()
    url = redis_url()
    if not _is_loopback(bind) and not username:
        click.echo(
            f"warning: --bind {bind} without --username/--password: anyone who reaches this port can delete jobs",
            err=True,
        )
    app = create_app(url, username, password, url_prefix.rstrip("/"), poll_interval)
    try:
        server = make_server(bind, port, app, threaded=True)
    except OSError as error:
        fail(f"cannot listen on {bind}:{port} ({error.strerror}): pick another with --port or --bind", code=1)
    shown_host = f"[{bind}]" if ":" in bind else bind
    click.echo(
        f"runyard dashboard: http://{shown_host}:{server.server_port}{url_prefix.rstrip('/')}/ "
        f"for Redis {mask_url(url)}{' (basic auth)' if username else ''}; Ctrl-C stops it",
    )
    sys.stdout.flush()  # a script waiting for the URL line must not wait for a buffer to fill
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per page refresh
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

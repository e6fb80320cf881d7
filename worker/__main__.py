from worker.cli import worker_command

worker_command(prog_name="worker")

from runyard.cli.worker import worker_command

worker_command(prog_name="worker")

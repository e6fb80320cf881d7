from publisher.cli import publish_command

publish_command(prog_name="publish")

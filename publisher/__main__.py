from runyard.cli.publish import publish_command

publish_command(prog_name="publish")

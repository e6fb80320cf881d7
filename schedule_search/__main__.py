from runyard.cli.schedule_search import schedule_search_command

schedule_search_command(prog_name="schedule-search")

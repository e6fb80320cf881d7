from schedule_search.cli import schedule_search_command

schedule_search_command(prog_name="schedule-search")

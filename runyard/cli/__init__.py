"""Every command line of runyard, one module per command family.

- `publish` (runyard.cli.publish, also `runyard status|leaderboard|cancel`), `worker` and
  `runyard janitor` (runyard.cli.worker), `schedule-search` and `runyard compare`
  (runyard.cli.schedule_search): the commands the card names;
- `runyard` (runyard.cli.main) gathers them with `train`, `infer`, `runs|pull|gc`, `quota`,
  `preemption`, `demo`, `doctor` and `dashboard`;
- runyard.cli.common: click's settings, the console, `fail` and connecting to Redis.

The packages below (publisher/, worker/, schedule_search/, trainer/) hold no command-line code;
their `python -m` entries only call the commands here.
"""

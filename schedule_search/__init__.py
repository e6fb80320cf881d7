"""schedule-search: a W&B-sweep YAML file -> validated points -> jobs, each point exactly once.

config (the file) -> parameters (each searched field) -> search (expand: grid, random, bayes
slots; kfold fan-out) -> publish (atomic claims in Redis, pipelined enqueue). The worker's side
of a point (pruner, bayes sampling, records) is worker.search_trial; k-fold aggregates run
worker.fold_aggregate.
"""

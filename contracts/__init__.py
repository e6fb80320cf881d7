"""The contracts every layer of runyard shares, in one torch-free, redis-free package.

- `contracts.keys`: every Redis key name runyard writes under its own prefix.
- `contracts.job_meta`: the typed meta of an RQ job (`JobMeta`), the failure reasons, and
  lenient read / checked write helpers.
- `contracts.epoch_report`: what one epoch of training reports (`EpochReport`).
- `contracts.plugins`: the names of the plug-ins a spec may ask for (losses, optimizers,
  schedulers, augmentations, search methods, pruners), each checked against its factory by a test.
- `contracts.spec`: the experiment spec (`ExperimentSpec`) every command validates and a worker
  trains, with `contracts.loss_formula`, the grammar of `--loss` formulas.
- `contracts.search_payload`: the `search` argument of a search point's job (`SearchPayload`).

Modules here import only the standard library and pydantic.
"""

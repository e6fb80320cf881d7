"""The worker side: RQ worker processes (one per GPU), the allow-listed job entry points, results.

Nothing here imports torch at module level: the worker's parent process never touches CUDA, and
the publisher imports `worker.results` and `worker.connection` on boxes without torch.
"""

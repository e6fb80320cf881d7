"""runyard: a Redis-queued (RQ) training job server for image classification experiments."""

__version__ = "0.1.0"

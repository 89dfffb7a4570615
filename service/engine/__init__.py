"""The anytime engine: stage queues and their scheduler, stage runners (eager, CUDA graphs), the worker
thread, online stage times, and the drift guard's shadow checks."""

from service.engine.engine import Engine, EngineConfig
from service.engine.jobs import Answer, DeadlineUnreachable, EngineFailure, EngineStopped, Job, QueueFull

__all__ = [
    "Answer",
    "DeadlineUnreachable",
    "Engine",
    "EngineConfig",
    "EngineFailure",
    "EngineStopped",
    "Job",
    "QueueFull",
]

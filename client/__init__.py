"""A deadline-aware client for the Anytime server (httpx only, no torch), and the load generator."""

from client.client import AnytimeClient, AsyncAnytimeClient
from client.errors import AnytimeError, BadInput, DeadlineExceeded, Overloaded, ServerError, Unreachable
from client.result import Result, TopK

__all__ = [
    "AnytimeClient",
    "AsyncAnytimeClient",
    "AnytimeError",
    "BadInput",
    "DeadlineExceeded",
    "Overloaded",
    "Result",
    "ServerError",
    "TopK",
    "Unreachable",
]

"""The anytime inference server: stage-wise engine, exit policy, deadlines, HTTP API, metrics."""

"""Several request processes in front of one engine process (ANYTIME_WORKERS > 1): the supervisor,
the engine process, the request processes' view of it, and what crosses between them."""

"""Answers from an exit's probabilities: the class, confidence, top-k and timings of each row.

Pure functions of tensors and jobs. They run on the worker thread (rows that stop at an exit, rows
that a deadline or brownout answers from the exit they passed, and the answer a row with a client's
deadline carries past an exit, `prepare_fallbacks`) and on the event loop (the answer at a deadline,
`answer_passed`: that carried answer timed, or for a row without one, made then), in whichever
process runs the engine.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from models.exit_policy import DEADLINE, reason
from service.engine.jobs import Answer, Job
from service.engine.scheduler import Chunk


def answer_rows(jobs: list[Job], p: Tensor, conf: np.ndarray, codes: np.ndarray, k: int, now: float) -> list[Answer]:
    """Answers of `jobs` at 0-based exit `k` from their probabilities `p`, with their top-k classes."""
    width = min(max(j.options.top_k for j in jobs), p.shape[1])
    top_p, top_i = p.topk(width, dim=1)
    top_p, top_i = top_p.cpu().tolist(), top_i.cpu().tolist()
    full = p.cpu().tolist() if any(j.options.probabilities for j in jobs) else None
    answers: list[Answer] = []
    for r, job in enumerate(jobs):
        n = min(job.options.top_k, width)
        pairs = list(zip(top_i[r][:n], top_p[r][:n], strict=True))
        started = job.started if job.started is not None else now
        queue_s, compute_s = started - job.options.received, now - started
        answer = Answer(pairs[0][0], float(conf[r]), k + 1, reason(int(codes[r])), pairs, queue_s, compute_s)
        answer.probabilities = full[r] if full is not None and job.options.probabilities else None
        answers.append(answer)
    return answers


def answer_chunk(chunk: Chunk, code: int, now: float) -> list[tuple[Job, Answer]]:
    """Answer a chunk's live rows from the exit they passed (stage - 1) with exit-rule code `code`."""
    live = [i for i, j in enumerate(chunk.jobs) if not j.settled]
    if not live:
        return []
    idx = np.array(live, dtype=np.int64)
    p = chunk.p if len(live) == len(chunk) else chunk.p.index_select(0, torch.from_numpy(idx).to(chunk.p.device))
    jobs = [chunk.jobs[i] for i in live]
    answers = answer_rows(jobs, p, chunk.conf[idx], np.full(len(live), code), chunk.stage - 1, now)
    return list(zip(jobs, answers, strict=True))


def prepare_fallbacks(jobs: list[Job], p: Tensor, conf: np.ndarray, k: int, now: float) -> None:
    """Rows going on past 0-based exit `k`: the answer from it (reason `deadline`) of each with a client's
    deadline (`Job.fallback`). Made by the worker beside the stage, in either process model, so that the
    answer at the deadline costs the event loop next to nothing: made by the loop at the deadline, a
    stalled core pushed it past the answer margin (docs/server.md, "The answer at the deadline"). Rows
    without a client's deadline are answered so only at the server's cap, from `passed`."""
    rows = [r for r, job in enumerate(jobs) if job.options.client_deadline]
    if not rows:
        return
    pick = p if len(rows) == len(jobs) else p.index_select(0, torch.tensor(rows, device=p.device))
    chosen = [jobs[r] for r in rows]
    answers = answer_rows(chosen, pick, conf[rows], np.full(len(rows), DEADLINE), k, now)
    for job, answer in zip(chosen, answers, strict=True):
        job.fallback = answer


def timed_at(answer: Answer, job: Job, now: float) -> Answer:
    """`answer`, prepared earlier for `job`, with its compute time counted to `now`."""
    started = job.options.received + answer.queue_s
    return dataclasses.replace(answer, compute_s=now - started)


def answer_passed(job: Job, now: float) -> Answer | None:
    """The answer from the last exit `job` passed (reason `deadline`), timed as of `now`: the one the
    worker prepared (`prepare_fallbacks`), else made now; None if it passed none."""
    if job.fallback is not None:
        return timed_at(job.fallback, job, now)
    passed = job.passed
    if passed is None:
        return None
    p = passed.p[passed.row : passed.row + 1]
    return answer_rows([job], p, np.array([passed.confidence]), np.array([DEADLINE]), passed.exit, now)[0]

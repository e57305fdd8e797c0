"""The fast fitter's driver: chunks of curves, worker threads, and the curves still going.

Per block of curves: the grid start (:func:`kinpet.fastfit.grid.grid_start`) and the
first LM steps, while the block is in cache. Most curves have converged by then; the rest
join one pool of unconverged curves, polished together (:func:`kinpet.fastfit.lm.
polish`) until fewer than :data:`CARRY` are left, which wait for the next chunk's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from kinpet.fastfit.basis import make_basis
from kinpet.fastfit.grid import grid_start
from kinpet.fastfit.lm import Polish, polish, start
from kinpet.kinetics import KineticModel

LM_BLOCK = 4096  # curves per block of the start: its working arrays stay in cache
# The first steps go block by block, the rest on the pool of curves not yet converged.
LM_FIRST_STEPS = 2
# A step costs a fixed overhead (an exact E and the Newton system: a few hundred tensor
# operations) however few curves take it: fewer curves than this wait for the next
# chunk's instead of stepping on their own.
CARRY = 256


def fit_curves(
    tacs,
    model: KineticModel,
    w,
    lo,
    hi,
    *,
    start_beta: float,
    tie_tolerance: float,
    beta_grid,
    device,
    chunk_size: int,
    lm_iterations: int,
    workers=None,
):
    """Fit valid curves; returns params [N, 4] and weighted SSE [N] (numpy, float64).

    Parameters
    ----------
    tacs : array_like, shape [N, F]
        Curves that passed :func:`kinpet.fitting.screen_curves` (any float dtype: chunks
        are converted to float64 one at a time).
    model, w, lo, hi, start_beta, tie_tolerance, beta_grid, device
        See :func:`kinpet.fastfit.basis.make_basis`.
    chunk_size : int
        Curves per chunk.
    lm_iterations : int
        At most this many LM steps per curve.
    workers : int, optional
        On the CPU: threads fitting parts of each chunk, each with one torch thread
        (default ``torch.get_num_threads()``). Most tensors here are too small for
        torch's own threads to pay (and on a busy machine their waiting for each other
        costs far more than they gain); torch releases the GIL inside each operation, so
        parts fitted in parallel keep the cores busy. A curve's result does not depend
        on the split beyond round-off.
    """
    n = tacs.shape[0]
    params = np.empty((n, 4))
    sse = np.empty(n)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cpu":
        workers = 1
    elif workers is None:
        workers = torch.get_num_threads()
    # Worker threads asked for: one torch thread each, even where the curves are too few to
    # be split (torch's own threads would only wait for each other on such small tensors).
    threads = 1 if workers > 1 else None
    workers = max(1, min(workers, min(chunk_size, n) // LM_BLOCK))
    first = min(lm_iterations, LM_FIRST_STEPS)
    with torch_threads(threads), executor(workers) as run:
        basis = make_basis(model, w, lo, hi, start_beta=start_beta, tie_tolerance=tie_tolerance,
                           beta_grid=beta_grid, device=device)  # fmt: skip
        _fit_chunks(basis, tacs, params, sse, run, workers, chunk_size, first, lm_iterations)
    return params, sse


def _fit_chunks(basis, tacs, params, sse, run, workers, chunk_size, first, lm_iterations):
    """:func:`fit_curves` once the basis is built and the threads are set; writes the
    results into ``params`` and ``sse``."""

    def start_part(y_w):
        """Grid start and first steps of y_w [m, F], block by block. Returns params
        [m, 4], SSE [m], and the state and indices of the curves not converged."""
        x, sse, going, stragglers = [], [], [], []
        for offset in range(0, y_w.shape[0], LM_BLOCK):
            block = y_w[offset : offset + LM_BLOCK]
            s = start(basis, block, *grid_start(basis, block))
            g = polish(basis, s, first)
            # Only the stragglers' state is kept: all of it would be ~1.5 kB per curve.
            x.append(s.x)
            sse.append(s.sse)
            going.append(g + offset)
            stragglers.append(s.take(g))
        return torch.cat(x), torch.cat(sse), Polish.cat(stragglers), torch.cat(going)

    n = tacs.shape[0]
    pool, pool_idx = None, np.empty(0, dtype=np.int64)
    for begin in range(0, n, chunk_size):
        y = torch.as_tensor(np.asarray(tacs[begin : begin + chunk_size]), device=basis.device)
        y_w = y.to(torch.float64) * basis.sqrt_w
        parts = y_w.tensor_split(max(1, min(workers, y_w.shape[0] // LM_BLOCK)))
        offsets = np.cumsum([begin] + [len(p) for p in parts[:-1]])
        for (x, part_sse, stragglers, going), offset in zip(
            run(start_part, parts), offsets, strict=True
        ):
            params[offset : offset + len(x)] = x.cpu().numpy()
            sse[offset : offset + len(x)] = part_sse.cpu().numpy()
            if lm_iterations > first and going.numel():
                pool = Polish.cat([p for p in (pool, stragglers) if p is not None])
                pool_idx = np.concatenate([pool_idx, going.cpu().numpy() + offset])
        last = begin + chunk_size >= n
        pool, pool_idx = _polish_pool(
            basis, pool, pool_idx, run, workers, lm_iterations, last, params, sse
        )


def _polish_pool(basis, pool, pool_idx, run, workers, steps, last, params, sse):
    """Polish the pool (all of it after the ``last`` chunk, else down to :data:`CARRY`
    curves), write its results, and return the curves still going with their indices."""
    if pool is None:
        return None, pool_idx
    stop = 0 if last else CARRY
    k = max(1, min(workers, len(pool) // CARRY))
    pieces = np.array_split(np.arange(len(pool)), k)
    states = [pool.take(torch.as_tensor(p, device=basis.device)) for p in pieces]
    goings = run(lambda s: polish(basis, s, steps, stop_below=stop // k), states)
    keep_states, keep_idx = [], []
    for s, going, piece in zip(states, goings, pieces, strict=True):
        idx = pool_idx[piece]
        params[idx], sse[idx] = s.x.cpu().numpy(), s.sse.cpu().numpy()
        going = going[s.taken[going] < steps]
        if going.numel():
            keep_states.append(s.take(going))
            keep_idx.append(idx[going.cpu().numpy()])
    if not keep_states:
        return None, np.empty(0, dtype=np.int64)
    return Polish.cat(keep_states), np.concatenate(keep_idx)


@contextmanager
def torch_threads(count):
    """torch's thread count set once, here, for the whole fit (``None``: left as it is).

    It is process-wide, and worker threads take it up when they start: set inside them
    it would change it under the other threads' feet.
    """
    if count is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def executor(workers):
    """``run(fn, items)`` -> list of results: in ``workers`` threads, or in this one."""
    if workers == 1:
        yield lambda fn, items: [fn(item) for item in items]
        return
    with ThreadPoolExecutor(workers) as pool:
        yield lambda fn, items: list(pool.map(fn, items))

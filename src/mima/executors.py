"""Where a benchmark's pieces run: one small interface, a local process pool or a Ray cluster.

A piece is any picklable object whose `run()` writes its own output atomically under a folder that every worker
sees (a shared file system on a cluster); an executor only decides where pieces run and how many at a time. The
benchmark's orchestration (which pieces, in which order, which are finished) is the same for both executors.
`local` needs nothing beyond mima; `ray` needs the optional extra (`pip install -e .[ray]`) and is imported only
when chosen.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from types import TracebackType
from typing import Literal, Protocol

from mima.errors import ConfigError, MimaError

EXECUTORS = ("local", "ray")


class Piece(Protocol):
    """One unit of a benchmark: an immunization, an attack run or the evaluation of one attack run."""

    def run(self) -> None:
        """Make the piece's output (resuming its own checkpoint if there is one)."""


def _run_piece(piece: Piece, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    piece.run()


def _quiet_worker() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # the parent's bar counts pieces; set before tqdm is first imported here


class Executor(ABC):
    """Runs pieces that do not depend on each other; a benchmark calls it once per phase (models, attacks,
    evaluations), so a phase starts when the one before it has ended. Use it as a context manager."""

    @abstractmethod
    def run(self, pieces: Sequence[Piece], what: str = "pieces") -> None:
        """Run every piece, with a progress bar counting finished pieces.

        Args:
            pieces (`Sequence[Piece]`):
                Independent pieces.
            what (`str`, defaults to `"pieces"`):
                What the pieces are, for the progress bar.

        Raises:
            The first piece's failure; the pieces not finished by then are left for a re-run to resume.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the workers or the cluster connection this executor holds."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class LocalExecutor(Executor):
    """`jobs` pieces at a time in worker processes of this machine, which share this process's torch threads;
    one job runs the pieces here, one after the other.

    A failure is raised once the pieces already running have finished; pieces not started yet are dropped.
    """

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = jobs

    def run(self, pieces: Sequence[Piece], what: str = "pieces") -> None:
        if self.jobs <= 1 or len(pieces) <= 1:
            from mima.utils.device import free_memory

            for piece in pieces:
                piece.run()
                free_memory()  # the finished piece's models are garbage: hand their accelerator memory back
            return
        import torch
        from tqdm import tqdm

        threads = max(1, torch.get_num_threads() // self.jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_quiet_worker) as pool:
            futures = [pool.submit(_run_piece, piece, threads) for piece in pieces]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=f"{what} ({self.jobs} jobs)"):
                    future.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise

    def close(self) -> None:
        """Nothing to release: each `run` starts and ends its own pool."""


class RayExecutor(Executor):
    """Each piece a Ray task declaring `cpus` CPUs (also its torch threads) and `gpus` GPUs; Ray places them.

    Joins the Ray of this process if one is initialised, else the cluster at `address` (`"auto"`: the one that
    `ray start` started on this machine), else starts a local one for this run. A failure cancels the pieces still
    queued or running and is raised once they have stopped (what they checkpointed stays; a re-run resumes them).

    Args:
        address (`str`, *optional*):
            A Ray cluster address (`"auto"`, `"HOST:6379"`, `"ray://HOST:10001"`); `None` starts a Ray of this
            machine for this run, even if a cluster runs here.
        cpus (`int`, defaults to 1):
            CPUs each piece declares.
        gpus (`float`, defaults to 0):
            GPUs each piece declares (a fraction shares one GPU between pieces).

    Raises:
        [`~mima.errors.ConfigError`]: If Ray is not installed or the cluster cannot be reached.
    """

    def __init__(self, address: str | None = None, cpus: int = 1, gpus: float = 0.0) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray, which is not installed: pip install 'mima[ray]'") from None
        self.cpus, self.gpus = cpus, gpus
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            options = {"address": address} if address else {"address": "local", "include_dashboard": False}
            try:
                ray.init(**options)
            except (ConnectionError, ValueError) as e:  # no cluster there; an address Ray cannot parse
                raise ConfigError(f"cannot reach the Ray cluster at '{address}': {e}") from None

    def run(self, pieces: Sequence[Piece], what: str = "pieces") -> None:
        if not pieces:
            return
        import ray
        from tqdm import tqdm

        task = ray.remote(_run_piece).options(
            num_cpus=self.cpus, num_gpus=self.gpus, runtime_env={"env_vars": {"TQDM_DISABLE": "1"}},
        )
        pending = [task.remote(piece, self.cpus) for piece in pieces]
        try:
            with tqdm(total=len(pending), desc=f"{what} (ray)") as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)
                    bar.update(len(done))
        except BaseException as error:
            for ref in pending:
                ray.cancel(ref)
            for ref in pending:  # until each has stopped; their errors would otherwise be logged as unhandled
                with contextlib.suppress(Exception):
                    ray.get(ref)
            cause = getattr(error, "cause", None)
            if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, MimaError | OSError):
                raise cause from None  # the piece's own one-line error, as the local executor raises it
            raise

    def close(self) -> None:
        import ray

        if self._owns_ray:
            ray.shutdown()


def make_executor(
    kind: Literal["local", "ray"], *, jobs: int = 1, address: str | None = None, cpus: int = 1, gpus: float = 0.0
) -> Executor:
    """The executor named `kind`: `local` takes `jobs`, `ray` takes `address`, `cpus` and `gpus` (see each class)."""
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "ray":
        return RayExecutor(address, cpus, gpus)
    raise ConfigError(f"unknown executor '{kind}'; valid: {', '.join(EXECUTORS)}")

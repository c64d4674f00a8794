"""What a training process needs to know about the others: its rank in a data-parallel job
(`Distributed`), and stop requests (SIGTERM/SIGINT) that every rank honours at the same
step (`StopRequest`). The launcher that starts the processes is `simtune.training.launch`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class Distributed:
    """This process's place in a data-parallel job (world 1 when it is alone)."""

    def __init__(self, world: int, rank: int, device: Any = None) -> None:
        self.world, self.rank, self.device = world, rank, device
        self.is_main = rank == 0

    @classmethod
    def start(cls) -> Distributed:
        from simtune.training.launch import rank, world_size

        if world_size() == 1:
            return cls(1, 0)
        # accelerate's PartialState sets up torch.distributed the way the Trainer and
        # Accelerator will then reuse it: NCCL on GPUs, gloo on CPU. Without a GPU it
        # must be told to use the CPU, or each process silently trains alone; the
        # variable tells the Trainer and PPO's Accelerator the same.
        import torch
        from accelerate import PartialState

        cpu = not torch.cuda.is_available()
        if cpu:
            os.environ["ACCELERATE_USE_CPU"] = "true"
        state = PartialState(cpu=cpu)
        return cls(world_size(), rank(), state.device)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as tdist

        box = [value]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (one tiny all-reduce)."""
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as tdist

        t = torch.tensor([1 if flag else 0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())


class NoTracker:
    """What ranks > 0 log to: nothing (rank 0 logs the job's metrics)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def metrics_callback(self) -> Any:
        from transformers import TrainerCallback

        return TrainerCallback()


class StopRequest:
    """Set by the first SIGTERM/SIGINT during training; the trainers poll it (calling it)
    at step ends and save a checkpoint before they stop.

    In a job of several processes, `sync` makes every process see the request at the
    same step (a process that steps past it would wait forever for its peers at the
    next collective); it is then called on every process at every step end."""

    def __init__(self, sync: Callable[[bool], bool] | None = None) -> None:
        self.signum: int | None = None
        self.sync = sync

    def __call__(self) -> bool:
        asked = self.signum is not None
        if self.sync is not None and self.sync(asked) and not asked:
            self.signum = int(signal.SIGTERM)  # a peer process was signalled
        return self.signum is not None

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")


@contextlib.contextmanager
def stop_on_signal(sync: Callable[[bool], bool] | None = None) -> Iterator[StopRequest]:
    """Turn SIGTERM/SIGINT into a stop request for the duration of training, instead of
    an exception raised wherever the interpreter happens to be (mid optimizer step,
    mid checkpoint write). A second signal raises at once: the user insists."""
    from simtune.util import on_stop_signals

    stop = StopRequest(sync)

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        stop.signum = signum
        log.warning(
            "signal %d: saving a checkpoint at the end of this step, then stopping "
            "(send it again to stop at once)",
            signum,
        )

    with on_stop_signals(handler):
        yield stop

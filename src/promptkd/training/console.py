"""What whoever watches a run sees and does: the progress bar's summary of a step, and SIGINT /
SIGTERM (Ctrl-C, a scheduler's stop), which end the run after the current step with a checkpoint.

    with StopSignals() as signals:
        ...  # one optimizer step
        stop, checkpoint_due = signals.agreed(accelerator, checkpoint_due=...)
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import torch

logger = logging.getLogger(__name__)

# metric key -> its short label on the progress bar, shown when a step reports it
PROGRESS_EXTRAS = {"prompt/kl_to_student": "kl_to_student", "prompt/drift": "drift"}


def progress_postfix(record: dict) -> dict[str, str]:
    """What the progress bar shows of a step's metrics record: the student's loss (a method's
    first `*loss` key when it reports none), PromptKD's two distances, seconds and tokens/s."""
    loss_key = "student/loss" if "student/loss" in record else next((k for k in record if k.endswith("loss")), None)
    return {
        **({loss_key: f"{record[loss_key]:.4f}"} if loss_key else {}),
        # PromptKD: the two distances of the prompted teacher (collapse when kl_to_student < drift)
        **{label: f"{record[key]:.3g}" for key, label in PROGRESS_EXTRAS.items() if key in record},
        "s/step": f"{record['step_time']:.2f}",
        "tok/s": f"{record['trained_tokens_per_s']:.0f}",
    }


def say(message: str, *, above_bar: bool) -> None:
    """One line for whoever watches the run: above the progress bar when it is shown, else an
    INFO log record."""
    if above_bar:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


class StopSignals:
    """While training: SIGINT and SIGTERM only set `signum`, which the loop reads after each step
    (it then checkpoints and stops). A second SIGINT raises KeyboardInterrupt at once. Handlers
    are installed only in the main thread and the previous ones are restored on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            logger.warning("%s received: finishing step, then checkpointing (Ctrl-C again to stop now)",
                           signal.Signals(signum).name)
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator, *, checkpoint_due: bool) -> tuple[int, bool]:
        """(signal to stop on or 0, whether a time-based checkpoint is due), agreed by every process.

        A signal that reached any process stops all of them (SIGTERM before SIGINT); the main
        process's `checkpoint_due` decides the time-based checkpoint. Every process must call it.
        """
        flags = torch.tensor(
            [self.signum == signal.SIGINT, self.signum == signal.SIGTERM,
             checkpoint_due and accelerator.is_main_process],
            dtype=torch.float64, device=accelerator.device,
        )
        flags = accelerator.reduce(flags, "sum") if accelerator.num_processes > 1 else flags
        stop = signal.SIGTERM if flags[1] > 0 else signal.SIGINT if flags[0] > 0 else 0
        return int(stop), bool(flags[2] > 0)

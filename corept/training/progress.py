"""The progress bar of ``corept train``: the HF Trainer's own tqdm bar, with the loss in its postfix.

transformers' ``ProgressCallback`` prints every log dict on its own line; with ``logging_steps=1``
that buries the bar. :class:`CompactProgress` keeps the bar and shows the latest loss (and the
learning rate) next to it; the full curve is summarized at the end of the run.
"""
from __future__ import annotations

from transformers.trainer_callback import ProgressCallback


class CompactProgress(ProgressCallback):
    """``ProgressCallback`` whose log handler updates the bar's postfix instead of printing dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {}
        for key in ("loss", "rewards/margins", "kl"):
            if isinstance(logs.get(key), (int, float)):
                shown[key.split("/")[-1]] = f"{logs[key]:.4f}"
        if isinstance(logs.get("learning_rate"), (int, float)):
            shown["lr"] = f"{logs['learning_rate']:.2e}"
        if shown:
            self.training_bar.set_postfix(shown, refresh=True)


def use_progress(trainer, callback: ProgressCallback) -> None:
    """Replace the trainer's progress callback (if any) with ``callback``."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(callback)

"""Training corept models with TRL (SFT, DPO, KTO) and the ``corept train`` pipeline.

* :mod:`.data`: read jsonl/json/csv/parquet/datasets folders, check the schema per method.
* :mod:`.chat_templates`, :mod:`.responses_only`: chat templates (the tokenizer's or a shipped one)
  and the loss on assistant turns only (``corept.train_on_responses_only``).
* :mod:`.options`, :mod:`.profiles`: run options, ``--profile`` presets and the planner hook.
* :mod:`.trainers`: TRL trainer construction for corept models (LoRA, QLoRA, full).
* :mod:`.compat`: how TRL's fused LM head, bitsandbytes and corept's checkpointing coexist.
* :mod:`.run`: one run end to end; :mod:`.defaults`: the embedded no-argument run.
* :mod:`.generation`, :mod:`.summary`, :mod:`.progress`: answers, loss summary, progress bar.

Importing this package imports neither TRL nor datasets; the functions do, when called.
"""
from corept.training.data import DataError, check_rows, load_training_data
from corept.training.options import TrainOptions, finalize, validate
from corept.training.profiles import PLANNERS, PROFILES, Profile, register_planner

__all__ = ["DataError", "check_rows", "load_training_data", "TrainOptions", "finalize", "validate", "PROFILES",
           "PLANNERS", "Profile", "register_planner", "run_training", "build_trainer", "shipped_data",
           "default_model", "HELD_OUT_QUESTION"]


def run_training(*args, **kwargs):
    """Run one training end to end; see :func:`corept.training.run.run_training`."""
    from corept.training.run import run_training as _run

    return _run(*args, **kwargs)


def build_trainer(*args, **kwargs):
    """A TRL trainer for a corept model; see :func:`corept.training.trainers.build_trainer`."""
    from corept.training.trainers import build_trainer as _build

    return _build(*args, **kwargs)


def __getattr__(name):
    if name in ("shipped_data", "default_model", "HELD_OUT_QUESTION", "embedded_options"):
        from corept.training import defaults

        return getattr(defaults, name)
    raise AttributeError(name)

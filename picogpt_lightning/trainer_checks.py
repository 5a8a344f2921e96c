"""Trainer arguments and the data a stage needs, checked before the Trainer exists.

Lightning takes some values it cannot run and refuses them only once fit starts, with a
traceback (accumulate_grad_batches 0, val_check_interval 0), and runs others wrongly without
a word: a negative gradient_clip_val multiplies every gradient by a negative factor (the step
climbs the loss), and a val_check_interval (counted in batches) past the run's last batch never
validates, so no best.ckpt is ever chosen. Each is refused here in one line naming the flag and
the fix (a val_check_interval past a shortened run's end instead validates at its last step,
saying so in one line); the refusals Lightning can make only once a stage runs become one line too.
"""

import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from picogpt_lightning.errors import UserError, first_line

LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
STAGE_LOADERS = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}


class TrainerArgumentError(UserError):
    """A Trainer argument out of its range, or one that would silently train wrongly."""


def refuse(name: str, value: Any, rule: str) -> None:
    raise TrainerArgumentError(f"--trainer.{name} is {value!r}; {rule}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_arguments(subcommand: str, trainer: Mapping[str, Any]) -> None:
    """Refuses, in one line, each value of `trainer` (the parsed trainer: config) out of range for `subcommand`."""
    get = trainer.get
    accumulate = get("accumulate_grad_batches", 1)
    if not is_int(accumulate) or accumulate < 1:
        refuse("accumulate_grad_batches", accumulate, "it must be an int >= 1 (1: one batch per optimizer step)")
    clip = get("gradient_clip_val")
    if clip is not None and clip < 0:
        refuse("gradient_clip_val", clip, "a negative value flips the gradient's sign; give a value > 0, or 0 or null for no clipping")
    for name, lowest in (("log_every_n_steps", 0), ("min_steps", 0), ("min_epochs", 0), ("num_sanity_val_steps", -1)):
        value = get(name)
        if value is not None and (not is_int(value) or value < lowest):
            refuse(name, value, f"it must be an int >= {lowest}")
    for name in ("max_steps", "max_epochs"):
        check_training_length(subcommand, name, get(name))
    for name in LIMITS:
        check_batch_limit(name, get(name))
    check_validation_interval(subcommand, trainer)


def check_training_length(subcommand: str, name: str, value: Optional[int]) -> None:
    """-1 means no limit; 0 would make `fit` train nothing."""
    if value is None:
        return
    if not is_int(value) or value < -1:
        refuse(name, value, "it must be an int >= 1, or -1 for no limit")
    if value == 0 and subcommand == "fit":
        refuse(name, value, "fit would train nothing; give a value >= 1, or -1 for no limit")


def check_batch_limit(name: str, value: Any) -> None:
    """An int counts batches, a float is a fraction of them."""
    if value is None:
        return
    if is_int(value) and value >= 0:
        return
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return
    refuse(name, value, "give a number of batches (an int >= 0) or a fraction of them (a float from 0.0 to 1.0)")


def check_validation_interval(subcommand: str, trainer: Mapping[str, Any]) -> None:
    """val_check_interval: an int counts training batches, a float in (0, 1] is a fraction of an epoch."""
    interval, every_epochs = trainer.get("val_check_interval"), trainer.get("check_val_every_n_epoch")
    if every_epochs is not None and (not is_int(every_epochs) or every_epochs < 1):
        refuse("check_val_every_n_epoch", every_epochs, "it must be an int >= 1, or null to count val_check_interval across epochs")
    if is_int(interval) and interval < 1:
        refuse("val_check_interval", interval, "it must be an int >= 1 (training batches) or a float in (0.0, 1.0] (a fraction of an epoch)")
    if isinstance(interval, float) and not 0.0 < interval <= 1.0:
        refuse("val_check_interval", interval, "a float is a fraction of an epoch, in (0.0, 1.0]; an int counts training batches")
    if subcommand != "fit" or every_epochs is not None or not is_int(interval) or trainer.get("limit_val_batches") == 0:
        return
    # with check_val_every_n_epoch null the interval counts batches over the whole run
    max_steps, accumulate = trainer.get("max_steps", -1), trainer.get("accumulate_grad_batches", 1)
    if is_int(max_steps) and max_steps > 0 and interval > max_steps * accumulate:
        # a recipe shortened with --trainer.max_steps (Lightning would never validate, and keep no best.ckpt):
        # it runs, validating at its last step, as nanoGPT's and Lightning's shortened runs do
        trainer["val_check_interval"] = max_steps * accumulate
        print(f"note: --trainer.val_check_interval {interval} is past the run's last step ({max_steps}); "
              f"validating at step {max_steps} instead", file=sys.stderr, flush=True)


def check_stage_data(subcommand: str, datamodule, model) -> None:
    """validate, test and predict need data with that stage's loader; predict also a model with predict_step."""
    hook = STAGE_LOADERS.get(subcommand)
    if hook is None:
        return
    if not any(source is not None and is_overridden(hook, source) for source in (datamodule, model)):
        given = "no --data" if datamodule is None else f"--data {type(datamodule).__name__}, which has no {hook}"
        fix = ("to continue text, use `python -m picogpt_lightning generate --ckpt CKPT --prompt TEXT`"
               if subcommand == "predict" else "pass --data (a recipe's --config gives one) with a data module that has it")
        raise TrainerArgumentError(f"{subcommand} needs data with a {hook}, but it was given {given}; {fix}")
    if subcommand == "predict" and not is_overridden("predict_step", model):
        raise TrainerArgumentError(
            f"predict needs a model with a predict_step, and {type(model).__name__} has none; "
            "to continue text, use `python -m picogpt_lightning generate --ckpt CKPT --prompt TEXT`"
        )


@contextmanager
def refusals_in_one_line() -> Iterator[None]:
    """Lightning's refusals of its arguments that come only once a stage runs, as one line.

    A val_check_interval (in batches, per epoch) longer than an epoch, for one, is known only
    when the train loader exists; Lightning raises a ValueError for it, or a
    MisconfigurationException, its type for misuse, for others.
    """
    try:
        yield
    except UserError:
        raise
    except MisconfigurationException as error:
        raise TrainerArgumentError(f"trainer: {first_line(error)}") from error
    except ValueError as error:
        if "`val_check_interval`" not in str(error):
            raise
        raise TrainerArgumentError(f"--trainer.val_check_interval: {first_line(error)}") from error

"""Which training steps Lightning writes logged values for, read from the Trainer's public state."""


def logs_at_step(trainer, step: int) -> bool:
    """Whether Lightning's loggers receive the values logged for optimizer step `step` (1 = the first).

    Every `log_every_n_steps` steps, and on the step where the run stops, as Lightning's logger
    connector decides. Its count of batches that stepped is `global_step` here: one optimizer,
    automatic optimization.
    """
    if trainer.log_every_n_steps == 0:
        return False
    return step % trainer.log_every_n_steps == 0 or trainer.should_stop

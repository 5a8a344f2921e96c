"""No run destroys another, a resume that would train nothing is refused, a shortened recipe runs.

The runs go through `cli.main` in this process, as tests/test_faults_resume.py does: the command
line as `python -m picogpt_lightning fit` runs it.
"""

import pytest

from picogpt_lightning import checkpoints
from test_faults_resume import _corpus, corpus, fit, refusal, write_config  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*val_dataloader",
                                        "ignore:.*could not find the monitored key", "ignore:resuming a run whose")


def test_an_explicit_version_holding_a_run_is_refused_unless_resumed(tmp_path):
    config = write_config(tmp_path)
    fit(config)
    version = tmp_path / "runs" / "tiny" / "version_0"
    before = {path: path.read_bytes() for path in version.rglob("*") if path.is_file()}
    message = refusal(config, "--trainer.logger.init_args.version=0")
    assert f"{version} already holds a run" in message and "--ckpt_path" in message
    assert {path: path.read_bytes() for path in version.rglob("*") if path.is_file()} == before  # untouched
    fit(config, "--trainer.logger.init_args.version=0", "--trainer.max_steps=3",
        "--ckpt_path", str(version / "checkpoints" / "last.ckpt"))  # resuming it is allowed
    assert checkpoints.load(version / "checkpoints" / "last.ckpt").global_step == 3
    fit(config, "--trainer.logger.init_args.version=7")  # a new version of one's choosing, too
    assert (tmp_path / "runs" / "tiny" / "version_7" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("max_steps", [1, 2])
def test_resuming_at_or_past_max_steps_is_refused_and_changes_nothing(tmp_path, max_steps):
    config = write_config(tmp_path)
    fit(config)  # 2 steps
    version = tmp_path / "runs" / "tiny" / "version_0"
    before = {path: path.read_bytes() for path in version.rglob("*") if path.is_file()}
    message = refusal(config, f"--trainer.max_steps={max_steps}", "--ckpt_path", str(version / "checkpoints" / "last.ckpt"))
    assert f"--trainer.max_steps {max_steps} is at or below the step of" in message and "(2)" in message
    assert {path: path.read_bytes() for path in version.rglob("*") if path.is_file()} == before  # config.yaml too


def test_a_recipe_shortened_below_its_validation_interval_validates_at_its_last_step(tmp_path, capsys):
    config = write_config(tmp_path)
    fit(config, "--trainer.max_steps=3", "--trainer.val_check_interval=500", "--trainer.check_val_every_n_epoch=null",
        "--trainer.limit_val_batches=1")
    notes = [line for line in capsys.readouterr().err.splitlines() if "val_check_interval" in line]
    assert notes == ["note: --trainer.val_check_interval 500 is past the run's last step (3); validating at step 3 instead"]
    best = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "best.ckpt"
    assert checkpoints.load(best).global_step == 3  # validated at the last step, so a best.ckpt was kept

"""DPO: the loss against its formulas, sequence log-probs against a hand loop, the frozen reference, the CLI."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.cli import main as cli_main
from picogpt_lightning.data import Tokenizer
from picogpt_lightning.data.collate import PromptCompletionCollator
from picogpt_lightning.losses import dpo_loss, sequence_log_probs
from picogpt_lightning.modules import DPOModule
from test_preference_data import tiny_char_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 20


# ---- dpo_loss against the formulas --------------------------------------------------------


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def formula(pc, pr, rc, rr, beta, e, loss_type):
    """The three losses of the issue, one pair at a time, in plain Python."""
    d = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -(1 - e) * log_sigmoid(beta * d) - e * log_sigmoid(-beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * d)


CASES = [("sigmoid", beta, e) for beta in (0.05, 0.1, 0.5, 2.0) for e in (0.0, 0.1, 0.3)]
CASES += [(loss_type, beta, 0.0) for loss_type in ("ipo", "hinge") for beta in (0.05, 0.1, 0.5, 2.0)]


@pytest.mark.parametrize("loss_type, beta, label_smoothing", CASES)
def test_dpo_loss_matches_the_formulas(loss_type, beta, label_smoothing):
    generator = torch.Generator().manual_seed(int(beta * 100) + int(label_smoothing * 10))
    logps = [(-20 * torch.rand(6, generator=generator, dtype=torch.float64)) for _ in range(4)]
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    for i in range(6):
        pc, pr, rc, rr = (float(x[i]) for x in logps)
        assert losses[i].item() == pytest.approx(formula(pc, pr, rc, rr, beta, label_smoothing, loss_type), rel=1e-5, abs=1e-6)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc - rc), rel=1e-5, abs=1e-6)
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr - rr), rel=1e-5, abs=1e-6)


def test_rewards_are_detached_and_the_loss_is_not():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[:1], policy[1:], torch.tensor([-4.0]), torch.tensor([-4.0]))
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descending raises the chosen log-prob, lowers the rejected


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(loss_type="kto"), "loss_type must be one of"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(label_smoothing=0.5), "label_smoothing must be in"),
        (dict(loss_type="ipo", label_smoothing=0.1), "applies to loss_type='sigmoid' only"),
    ],
)
def test_bad_dpo_options_are_one_line_errors(options, message):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=message) as error:
        dpo_loss(x, x, x, x, **options)
    assert "\n" not in str(error.value)


# ---- sequence_log_probs against a hand loop -------------------------------------------------


def test_sequence_log_probs_sums_completion_tokens_only():
    # three prompt/completion pairs of different lengths, padded into one batch by the collator
    samples = [
        {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]},
        {"prompt_ids": [6], "completion_ids": [7, 8, 9, 10]},
        {"prompt_ids": [11, 12, 13, 14, 15], "completion_ids": [16]},
    ]
    batch = PromptCompletionCollator(["completion"])(samples)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB, generator=torch.Generator().manual_seed(3))

    expected_sums, expected_means = [], []
    for row, sample in enumerate(samples):
        sequence = sample["prompt_ids"] + sample["completion_ids"]
        log_probs = torch.log_softmax(logits[row].double(), dim=-1)
        # token k (a completion token) is predicted from position k - 1
        terms = [log_probs[k - 1, sequence[k]].item() for k in range(len(sample["prompt_ids"]), len(sequence))]
        expected_sums.append(sum(terms))
        expected_means.append(sum(terms) / len(terms))

    assert torch.allclose(sequence_log_probs(logits, batch["labels"]), torch.tensor(expected_sums), atol=1e-5)
    assert torch.allclose(sequence_log_probs(logits, batch["labels"], average=True), torch.tensor(expected_means), atol=1e-5)
    assert sequence_log_probs(logits.bfloat16(), batch["labels"]).dtype == torch.float32


def test_sequence_log_probs_compiles_in_one_graph():
    labels = torch.tensor([[-100, 3, 4, -100], [-100, -100, 5, 6]])
    logits = torch.randn(2, 4, VOCAB)
    compiled = torch.compile(sequence_log_probs, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(logits, labels), sequence_log_probs(logits, labels))


# ---- the module: a frozen reference ---------------------------------------------------------


def tiny_checkpoint(directory: Path, seed: int = 0, name: str = "start.pt", **overrides) -> str:
    values = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_embd=16, n_head=2, n_query_groups=1, dropout=0.3)
    values.update(overrides)
    torch.manual_seed(seed)
    path = str(directory / name)
    PicoGPT(PicoGPTConfig(**values)).save(path)
    return path


def preference_batch() -> dict:
    samples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6], "rejected_ids": [7, 8], "index": 0},
        {"prompt_ids": [9], "chosen_ids": [10, 11], "rejected_ids": [12, 13, 14, 15, 16], "index": 1},
    ]
    return PromptCompletionCollator(["chosen", "rejected"])(samples)


def test_reference_is_frozen_out_of_the_optimizer_and_the_checkpoint(tmp_path):
    module = DPOModule(init_from=tiny_checkpoint(tmp_path), lr_decay_steps=10)
    module.train()  # what Lightning does each epoch
    assert module.model.training and not any(m.training for m in module.reference.modules())
    assert module.reference is not module.model
    for mine, theirs in zip(module.model.parameters(), module.reference.parameters()):
        assert torch.equal(mine, theirs)  # the default reference is the starting policy

    with torch.no_grad():  # without the policy's dropout, policy == reference: rewards 0, sigmoid loss log 2
        losses, _ = module.eval().compute_losses(preference_batch())
    assert losses["rewards/chosen"].item() == 0 and losses["rewards/margins"].item() == 0
    assert losses["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    losses, _ = module.train().compute_losses(preference_batch())
    losses["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in module.reference.parameters())
    assert all(p.grad is not None for p in module.model.parameters())

    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(key.startswith("reference.") for key in checkpoint["state_dict"])
    assert all(key.startswith("model.") for key in checkpoint["state_dict"])
    module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)


def test_losses_and_logged_rewards_against_a_second_path(tmp_path):
    module = DPOModule(init_from=tiny_checkpoint(tmp_path), reference=tiny_checkpoint(tmp_path, seed=1, name="ref.pt"),
                       beta=0.2, loss_type="ipo")
    module.eval()
    batch = preference_batch()
    losses, _ = module.compute_losses(batch)
    policy, reference = PicoGPT.from_checkpoint(tmp_path / "start.pt").eval(), PicoGPT.from_checkpoint(tmp_path / "ref.pt").eval()

    def mean_logps(model, rows):  # ipo averages over completion tokens
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = []
        for row in rows:
            real = batch["labels"][row] != -100
            out.append(F.log_softmax(logits[row], -1)[real].gather(-1, batch["labels"][row][real, None]).mean())
        return torch.stack(out)

    pc, pr = mean_logps(policy, [0, 1]), mean_logps(policy, [2, 3])
    rc, rr = mean_logps(reference, [0, 1]), mean_logps(reference, [2, 3])
    d = (pc - pr) - (rc - rr)
    assert losses["loss"].item() == pytest.approx(((d - 1 / 0.4) ** 2).mean().item(), rel=1e-4)
    chosen, rejected = 0.2 * (pc - rc), 0.2 * (pr - rr)
    assert losses["rewards/chosen"].item() == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert losses["rewards/margins"].item() == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert losses["rewards/accuracies"].item() == pytest.approx((chosen > rejected).float().mean().item())
    assert losses["logps/rejected"].item() == pytest.approx(pr.mean().item(), abs=1e-5)


def test_a_reference_of_another_vocabulary_is_a_clear_error(tmp_path):
    other = tiny_checkpoint(tmp_path, name="other.pt", vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="reference's vocabulary has 21 tokens"):
        DPOModule(init_from=tiny_checkpoint(tmp_path), reference=other)


# ---- through the CLI --------------------------------------------------------------------------


@pytest.fixture
def char_checkpoint(tmp_path, corpus_path) -> str:
    """A tiny untrained model saved with the corpus's char tokenizer, as a pretraining run leaves one."""
    return tiny_char_checkpoint(tmp_path, corpus_path)


def dpo_cli_args(tmp_path, corpus_path, init_from, *extra) -> list:
    return [
        "fit", "--config", str(REPO_ROOT / "configs" / "dpo.yaml"),
        "--model.init_args.init_from", init_from,
        "--model.init_args.learning_rate", "1e-2",
        "--model.init_args.warmup_steps", "0",
        "--data.init_args.corpus_path", str(corpus_path),
        "--data.init_args.prompt_chars", "16",
        "--data.init_args.completion_chars", "8",
        "--data.init_args.prompts_per_speech", "2",  # the recipe's 6 need longer prompts than this tiny block holds
        "--data.init_args.batch_size", "8",
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "4",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "2",  # training metrics are logged on logging steps only
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--checkpoint.dirpath", str(tmp_path / "checkpoints"),
        *extra,
    ]


@pytest.mark.parametrize("precompute, rpo_alpha", [(False, "1.0"), (True, "null")])
def test_dpo_recipe_trains_through_the_cli(tmp_path, corpus_path, char_checkpoint, precompute, rpo_alpha):
    from picogpt_lightning.lightning_cli import run_lightning

    cli = run_lightning(dpo_cli_args(tmp_path, corpus_path, char_checkpoint,
                                     "--model.init_args.precompute_reference", str(precompute).lower(),
                                     "--model.init_args.rpo_alpha", rpo_alpha))
    module = cli.model
    assert (module.reference is None) == precompute
    if precompute:  # one [chosen, rejected] pair of reference log-probs for every train and val example
        size = len(cli.datamodule.train_dataset) + len(cli.datamodule.val_dataset)
        assert module.reference_table.shape == (size, 2) and not module.reference_table.isnan().any()
    metrics = cli.trainer.callback_metrics
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert f"train/{name}" in metrics and f"val/{name}" in metrics
    assert metrics["val/rewards/margins"] != 0  # the policy moved away from the reference
    if rpo_alpha == "null":
        assert metrics["train/loss"] < math.log(2) + 0.5 and "train/nll" not in metrics
    else:  # the chosen completions' next-token loss is logged beside the total
        assert "train/nll" in metrics and "val/nll" in metrics

    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("reference") for key in saved["state_dict"])
    trained = PicoGPT.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    start = PicoGPT.from_checkpoint(char_checkpoint)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)
    assert Tokenizer.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt").vocab_size == start.config.vocab_size


def test_dpo_without_a_checkpoint_is_a_one_line_error(tmp_path, corpus_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(dpo_cli_args(tmp_path, corpus_path, str(tmp_path / "missing.ckpt")))
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "missing.ckpt" in text and "\n" not in text


@pytest.mark.parametrize("precompute", [False, True])
def test_the_dpo_step_compiles_in_one_graph(tmp_path, precompute):
    """No graph break and no host sync: torch.compile(fullgraph=True) traces the whole loss."""
    module = DPOModule(init_from=tiny_checkpoint(tmp_path), precompute_reference=precompute).eval()
    batch = preference_batch()
    if precompute:  # what precompute_reference() fills before training: [chosen, rejected] per example
        module.reference_table = torch.tensor([[-30.0, -20.0], [-25.0, -40.0]])
    expected, _ = module.compute_losses(batch)
    # the step leaves out the attention mask (right padding): the log-probs are those with the mask
    with_mask = module.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = sequence_log_probs(with_mask, batch["labels"]).chunk(2)
    torch.testing.assert_close(expected["logps/chosen"], chosen.mean())
    torch.testing.assert_close(expected["logps/rejected"], rejected.mean())
    compiled, _ = torch.compile(module.compute_losses, fullgraph=True, backend="eager")(batch)
    for name, value in expected.items():
        torch.testing.assert_close(compiled[name], value, msg=name)


def test_rpo_alpha_adds_the_next_token_loss_on_the_chosen_completions(tmp_path):
    start = tiny_checkpoint(tmp_path)
    batch = preference_batch()
    plain = DPOModule(init_from=start).eval()
    rpo = DPOModule(init_from=start, rpo_alpha=0.5).eval()
    dpo_only, _ = plain.compute_losses(batch)
    with_nll, logits = rpo.compute_losses(batch)
    # by hand: mean -log p over the chosen rows' completion tokens (rows 0 and 1)
    terms = []
    for row in (0, 1):
        real = batch["labels"][row] != -100
        terms.append(-F.log_softmax(logits[row], -1)[real].gather(-1, batch["labels"][row][real, None]).squeeze(-1))
    nll = torch.cat(terms).mean()
    assert with_nll["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert with_nll["loss"].item() == pytest.approx(dpo_only["loss"].item() + 0.5 * nll.item(), rel=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha must be > 0"):
        DPOModule(init_from=start, rpo_alpha=0.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_logged_rewards_follow_the_named_convention(tmp_path, loss_type):
    """rewards = beta * (policy - reference) of the log-probs the loss reads: summed over the
    completion's tokens for sigmoid and hinge, averaged for ipo (trl 0.28's convention)."""
    beta = 0.3
    module = DPOModule(init_from=tiny_checkpoint(tmp_path), reference=tiny_checkpoint(tmp_path, seed=1, name="ref.pt"),
                       beta=beta, loss_type=loss_type).eval()
    batch = preference_batch()
    losses, _ = module.compute_losses(batch)
    policy, reference = PicoGPT.from_checkpoint(tmp_path / "start.pt").eval(), PicoGPT.from_checkpoint(tmp_path / "ref.pt").eval()

    def completion_logps(model, row):
        logits = model(batch["input_ids"]).logits[row]
        real = batch["labels"][row] != -100
        token_logps = F.log_softmax(logits, -1)[real].gather(-1, batch["labels"][row][real, None])
        return token_logps.mean() if loss_type == "ipo" else token_logps.sum()

    with torch.no_grad():
        chosen = [beta * (completion_logps(policy, r) - completion_logps(reference, r)) for r in (0, 1)]
        rejected = [beta * (completion_logps(policy, r) - completion_logps(reference, r)) for r in (2, 3)]
    assert losses["rewards/chosen"].item() == pytest.approx(torch.stack(chosen).mean().item(), abs=1e-5)
    assert losses["rewards/rejected"].item() == pytest.approx(torch.stack(rejected).mean().item(), abs=1e-5)

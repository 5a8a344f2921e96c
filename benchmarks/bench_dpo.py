"""DPO on held-out Shakespeare preference pairs, from the pretrained pretrain_cpu checkpoint.

    python -m benchmarks.bench_dpo --init_from /path/to/pretrain_cpu/last.ckpt [--steps 300]

Runs configs/dpo.yaml through the CLI on a copy of the checkpoint (pairs derived from
tiny_shakespeare, validation pairs from its validation part only) and reports, before and
after: the implicit reward accuracy and margin on the held-out pairs, the model's own
preference (log p(chosen) > log p(rejected)), the held-out language-model loss (the
validation windows pretraining scored) and a greedy sample; written into BENCHMARKS.md.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.data import PreferenceDataModule, TinyShakespeareDataModule, Tokenizer
from picogpt_lightning.data.source import find_corpus
from picogpt_lightning.losses import dpo_loss, sequence_log_probs
from picogpt_lightning.modules.base import next_token_loss
from picogpt_lightning.generation import generate_texts
from picogpt_lightning.lightning_cli import run_lightning

REPO_ROOT = Path(__file__).resolve().parent.parent
DPO_YAML = REPO_ROOT / "configs" / "dpo.yaml"
OPENING_CHARS = 16  # free samples start from a speech's first characters


@torch.no_grad()
def preference_scores(policy: PicoGPT, reference: PicoGPT, loader, beta: float) -> dict:
    """Means over the held-out pairs of the implicit rewards, their accuracy, and the policy's own preference."""
    rewards, own = [], []
    for batch in loader:
        chosen, rejected = sequence_log_probs(policy(batch["input_ids"], batch.get("attention_mask")).logits, batch["labels"]).chunk(2)
        ref_chosen, ref_rejected = sequence_log_probs(
            reference(batch["input_ids"], batch.get("attention_mask")).logits, batch["labels"]
        ).chunk(2)
        _, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
        rewards.append(torch.stack([chosen_rewards, rejected_rewards], dim=-1))
        own.append(chosen > rejected)
    rewards, own = torch.cat(rewards), torch.cat(own)
    return {
        "pairs": len(own),
        "accuracy": (rewards[:, 0] > rewards[:, 1]).float().mean().item(),
        "margin": (rewards[:, 0] - rewards[:, 1]).mean().item(),
        "own_preference": own.float().mean().item(),
    }


@torch.no_grad()
def lm_loss(model: PicoGPT, loader) -> float:
    losses = [next_token_loss(model(batch["input_ids"]).logits, batch["labels"]) for batch in loader]
    return torch.stack(losses).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init_from", default="runs/pretrain_cpu/version_0/checkpoints/last.ckpt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--beta", type=float, default=None, help="default: the recipe's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = str(find_corpus(None))

    with tempfile.TemporaryDirectory() as work:
        start_ckpt = str(Path(work) / "pretrained.ckpt")
        shutil.copy(args.init_from, start_ckpt)  # the original is never written to
        start = checkpoints.load(start_ckpt)
        pretrained = PicoGPT.from_checkpoint(start).eval()
        tokenizer = Tokenizer.from_checkpoint(start)
        block_size = pretrained.config.block_size

        recipe = yaml.safe_load(DPO_YAML.read_text())
        beta = recipe["model"]["init_args"]["beta"] if args.beta is None else args.beta
        recipe = recipe["data"]["init_args"]  # the pairs the run trains on
        pairs = PreferenceDataModule(
            tokenizer=start_ckpt, corpus_path=corpus, max_length=block_size + 1, batch_size=64,
            prompt_chars=recipe["prompt_chars"], completion_chars=recipe["completion_chars"],
        )
        pairs.setup("validate")
        windows = TinyShakespeareDataModule(data_path=corpus, block_size=block_size, batch_size=64, val_samples=2400)
        windows.setup("validate")
        held_out = [pairs.val_dataset[i] for i in (0, 100)]
        prompts = [tokenizer.decode(example["prompt_ids"]) for example in held_out]
        true_continuations = [tokenizer.decode(example["chosen_ids"]) for example in held_out]
        openings = [prompt[:OPENING_CHARS] for prompt in prompts]

        def evaluate(policy):
            torch.manual_seed(0)
            return (
                preference_scores(policy, pretrained, pairs.val_dataloader(), beta),
                lm_loss(policy, windows.val_dataloader()),
                # the pair's own task (continue the held-out prompt) and a longer free sample from its opening
                generate_texts(policy, tokenizer, prompts, max_new_tokens=len(held_out[0]["chosen_ids"])),
                generate_texts(policy, tokenizer, openings, max_new_tokens=block_size - OPENING_CHARS),
            )

        before = evaluate(pretrained)
        began = time.perf_counter()
        cli = run_lightning([
            "fit", "--config", str(DPO_YAML),
            "--model.init_args.init_from", start_ckpt,
            "--model.init_args.beta", str(beta),
            "--data.init_args.corpus_path", corpus,
            "--trainer.accelerator", "cpu",
            "--trainer.max_steps", str(args.steps),
            "--trainer.val_check_interval", str(args.steps),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(Path(work) / "runs"),
            "--checkpoint.dirpath", str(Path(work) / "checkpoints"),
        ])
        train_seconds = time.perf_counter() - began
        policy = cli.model.model.eval()
        after = evaluate(policy)
        logged = {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith("val/")}

    hp, data = cli.model.hparams, cli.datamodule.hparams
    rows = []
    for label, (scores, loss, _, _) in (("pretrained (= reference)", before), (f"after {args.steps} DPO steps", after)):
        rows.append([
            label, f"{scores['accuracy']:.3f}", f"{scores['margin']:.3f}", f"{scores['own_preference']:.3f}", f"{loss:.4f}",
        ])
    samples = "\n".join(
        f"Held-out prompt `{prompt!r}`, true continuation `{truth!r}`; greedy before `{b[len(prompt):]!r}`, "
        f"after `{a[len(prompt):]!r}`.\n\nFree sample from `{opening!r}`:\n- before: `{fb[len(opening):]!r}`\n"
        f"- after: `{fa[len(opening):]!r}`\n"
        for prompt, truth, b, a, opening, fb, fa in zip(
            prompts, true_continuations, before[2], after[2], openings, before[3], after[3]
        )
    )
    body = (
        f"`python -m benchmarks.bench_dpo --steps {args.steps}` on {machine_description()}: configs/dpo.yaml from the "
        f"pretrain_cpu checkpoint (4 layers x 128, char tokenizer, block 64), beta {hp.beta}, rpo_alpha {hp.rpo_alpha}, "
        f"lr {hp.learning_rate}, "
        f"batch {data.batch_size} pairs, {args.steps} steps in {train_seconds:.0f} s (one thread). "
        f"Pairs from tiny_shakespeare: prompt = a speech's first {data.prompt_chars} characters, "
        f"chosen = its next {data.completion_chars}, rejected = the same stretch of a speech of "
        f"similar length; {len(cli.datamodule.train_dataset)} training pairs ({data.prompts_per_speech} prompt(s) per "
        f"speech, each {data.completion_chars} characters shorter than the last, and {data.rejected_per_prompt} "
        f"rejected per prompt), {before[0]['pairs']} held-out pairs from the validation part of the corpus "
        "(one per speech, its first prompt_chars characters).\n\n"
        + markdown_table(
            ["model", "reward accuracy", "reward margin", "log p(chosen) > log p(rejected)", "held-out LM loss"], rows
        )
        + "\n\n"
        "Reward accuracy and margin are DPO's implicit rewards beta * (log pi - log ref) against the pretrained "
        "model as reference; before training the policy is the reference, so every reward is 0 and the accuracy "
        "(strictly greater) is 0 by construction. The model's own preference is the share of held-out pairs it "
        "already finds the true continuation more likely. Held-out LM loss: next-token loss on the 2400 validation "
        f"windows pretraining scored; DPO moved it by {after[1] - before[1]:+.4f}. "
        f"The run's own validation logged rewards/accuracies {logged.get('val/rewards/accuracies', float('nan')):.3f}, "
        f"rewards/margins {logged.get('val/rewards/margins', float('nan')):.3f}.\n\n"
        f"Greedy samples:\n\n{samples}"
    )
    write_section("dpo", "DPO: preference alignment from the pretrained CPU model", body)


if __name__ == "__main__":
    main()

"""DPO on held-out Shakespeare preference pairs, from pretrained checkpoints, over several seeds.

    python -m benchmarks.bench_dpo --init_from A/best.ckpt B/best.ckpt [--seeds 1337 1 2] [--config configs/dpo.yaml]
    python -m benchmarks.bench_dpo --init_from A/best.ckpt --smoke   # 2 steps, one batch scored, nothing written
    ... --results runs.json   # each finished run saved there; the same call again runs only the missing ones

Runs the DPO recipe (configs/dpo.yaml unless --config names another) through the CLI once per
(checkpoint, seed), each on a copy of the checkpoint (pairs derived from tiny_shakespeare,
validation pairs from its validation part only), and reports per run: the implicit reward
accuracy and margin on the held-out pairs, the model's own preference (log p(chosen) >
log p(rejected)), the held-out language-model loss (the validation windows pretraining scored)
and the training time; then the mean and range of the reward accuracy against the target, and
greedy samples of the first run. Written into BENCHMARKS.md after every run, one section per config file
(named after its stem), keeping the section's recipe notes (between `<!-- notes -->` and
`<!-- /notes -->`) as they are.
"""

import argparse
import json
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path
from statistics import mean

import torch
import yaml

from benchmarks.report import BENCHMARKS_MD, machine_description, markdown_table, write_section
from picogpt_lightning import PicoGPT, checkpoints
from picogpt_lightning.checkpoints import write_atomically
from picogpt_lightning.data import PreferenceDataModule, TinyShakespeareDataModule, Tokenizer
from picogpt_lightning.data.source import find_corpus
from picogpt_lightning.losses import dpo_loss, sequence_log_probs
from picogpt_lightning.modules.base import next_token_loss
from picogpt_lightning.generation import generate_texts
from picogpt_lightning.lightning_cli import run_lightning

REPO_ROOT = Path(__file__).resolve().parent.parent
DPO_YAML = REPO_ROOT / "configs" / "dpo.yaml"
OPENING_CHARS = 16  # free samples start from a speech's first characters
TARGET_MEAN, TARGET_EACH = 0.90, 0.88  # configs/dpo.yaml's held-out reward accuracy: the mean over runs, and every run
NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


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


def pretrain_val_loss(start: checkpoints.Checkpoint) -> float:
    """The val/loss its pretraining run kept this checkpoint for (ModelCheckpoint's best score), nan if none."""
    for name, state in start.contents.get("callbacks", {}).items():
        if name.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return float("nan")


def checkpoint_label(path: str) -> str:
    # runs/<name>/version_N/checkpoints/best.ckpt -> <name>/best.ckpt, the part that tells runs apart
    parts = Path(path).parts
    return f"{parts[-4]}/{parts[-1]}" if len(parts) >= 4 else path


class HeldOut:
    """A starting checkpoint (a copy, never written to) and the held-out data it is scored on."""

    def __init__(self, path: str, copy: Path, recipe: dict, corpus: str, eval_batches):
        self.label, self.path = checkpoint_label(path), str(copy)
        shutil.copy(path, self.path)
        start = checkpoints.load(self.path)
        self.val_loss, self.step = pretrain_val_loss(start), start.contents.get("global_step")
        self.reference = PicoGPT.from_checkpoint(start).eval()
        self.tokenizer = Tokenizer.from_checkpoint(start)
        self.block_size = self.reference.config.block_size
        data = recipe["data"]["init_args"]
        self.pairs = PreferenceDataModule(
            tokenizer=self.path, corpus_path=corpus, max_length=self.block_size + 1, batch_size=64,
            prompt_chars=data["prompt_chars"], completion_chars=data["completion_chars"],
        )
        self.pairs.setup("validate")
        self.windows = TinyShakespeareDataModule(data_path=corpus, block_size=self.block_size, batch_size=64, val_samples=2400)
        self.windows.setup("validate")
        self.eval_batches = eval_batches  # None: all of them

    def scores(self, policy: PicoGPT, beta: float) -> dict:
        scores = preference_scores(policy, self.reference, islice(self.pairs.val_dataloader(), self.eval_batches), beta)
        scores["lm_loss"] = lm_loss(policy, islice(self.windows.val_dataloader(), self.eval_batches))
        return scores

    def samples(self, policy: PicoGPT) -> tuple:
        """Greedy continuations of two held-out prompts (the pair's own task) and longer free samples from their openings."""
        torch.manual_seed(0)
        held_out = [self.pairs.val_dataset[i] for i in (0, 100)]
        prompts = [self.tokenizer.decode(example["prompt_ids"]) for example in held_out]
        openings = [prompt[:OPENING_CHARS] for prompt in prompts]
        truths = [self.tokenizer.decode(example["chosen_ids"]) for example in held_out]
        return (
            prompts, truths, openings,
            generate_texts(policy, self.tokenizer, prompts, max_new_tokens=len(held_out[0]["chosen_ids"])),
            generate_texts(policy, self.tokenizer, openings, max_new_tokens=self.block_size - OPENING_CHARS),
        )


def train(config: Path, start: HeldOut, seed: int, beta: float, steps: int, corpus: str, run_dir: Path, smoke: bool):
    """One DPO run of the recipe from `start`'s checkpoint; returns the CLI (.model, .trainer, .datamodule) and its seconds."""
    began = time.perf_counter()
    cli = run_lightning([
        "fit", "--config", str(config),
        # the data module keeps a seed of its own (the pairs' rejected speeches, the batch order), so both are set
        "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed),
        "--model.init_args.init_from", start.path,
        "--model.init_args.beta", str(beta),
        "--data.init_args.corpus_path", corpus,
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1" if smoke else "1.0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(run_dir / "runs"),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
    ])
    return cli, time.perf_counter() - began


def recipe_summary(cli) -> dict:
    hp, data = cli.model.hparams, cli.datamodule.hparams
    names = ("prompt_chars", "completion_chars", "prompts_per_speech", "rejected_per_prompt", "batch_size")
    return {"beta": hp.beta, "rpo_alpha": hp.get("rpo_alpha"), "learning_rate": hp.learning_rate,
            "train_pairs": len(cli.datamodule.train_dataset), **{name: data[name] for name in names}}


def load_results(args, beta: float, steps: int) -> dict:
    """The runs finished earlier into --results (a rerun skips them), or a fresh record."""
    setting = {"config": args.config_name, "steps": steps, "beta": beta}
    saved = {**setting, "runs": [], "samples": None, "recipe": None}
    if args.results and Path(args.results).is_file():
        saved = json.loads(Path(args.results).read_text())
        if {key: saved.get(key) for key in setting} != setting:
            raise SystemExit(f"--results {args.results} holds runs of {saved.get('config')}, {saved.get('steps')} steps, "
                             f"beta {saved.get('beta')}; pass another --results file for {setting}")
    return saved


def save_results(args, saved: dict) -> None:
    if args.results:
        write_atomically(args.results, lambda file: file.write(json.dumps(saved, indent=1).encode()))


def run_all(args, recipe: dict, beta: float, steps: int) -> tuple:
    """Every (checkpoint, seed) run, scored on the held-out pairs; after each, the report so far is written."""
    corpus = str(find_corpus(None))
    saved, starts = load_results(args, beta, steps), []
    with tempfile.TemporaryDirectory() as work:
        for index, path in enumerate(args.init_from):
            start = HeldOut(path, Path(work) / f"start{index}.ckpt", recipe, corpus, 1 if args.smoke else None)
            starts.append((start, start.scores(start.reference, beta)))
            for seed in args.seeds:
                if any(run["start"] == start.label and run["seed"] == seed for run in saved["runs"]):
                    continue  # finished by an earlier call into the same --results
                run_dir = Path(work) / f"run{index}_{seed}"
                cli, seconds = train(args.config, start, seed, beta, steps, corpus, run_dir, args.smoke)
                policy = cli.model.model.eval()
                after = start.scores(policy, beta)
                saved["runs"].append({"start": start.label, "seed": seed, "seconds": seconds, **after})
                print(f"{start.label} seed {seed}: reward accuracy {after['accuracy']:.3f}, margin {after['margin']:.3f}, "
                      f"own preference {after['own_preference']:.3f}, LM loss {after['lm_loss']:.4f}, {seconds:.0f} s", flush=True)
                saved["recipe"] = recipe_summary(cli)
                if saved["samples"] is None:
                    saved["samples"] = {"start": start.label, "seed": seed,
                                        "before": start.samples(start.reference), "after": start.samples(policy)}
                save_results(args, saved)
                if not args.smoke:
                    write_report(args, starts, saved, steps)
    return starts, saved


def recipe_notes(name: str) -> str:
    """The hand-written notes of the section `name` (what was tried, and why), kept across reruns."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    section = text.split(f"<!-- bench:{name} -->", 1)[-1].split(f"<!-- /bench:{name} -->", 1)[0]
    if NOTES_START not in section or NOTES_END not in section:
        return ""
    return NOTES_START + section.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0] + NOTES_END


def ordered_runs(args, saved: dict) -> list:
    # in the order of --init_from and --seeds, whichever call of the benchmark ran them
    order = {(checkpoint_label(path), seed): i for i, (path, seed) in
             enumerate((path, seed) for path in args.init_from for seed in args.seeds)}
    return sorted((run for run in saved["runs"] if (run["start"], run["seed"]) in order),
                  key=lambda run: order[(run["start"], run["seed"])])


def tables(starts: list, runs: list) -> str:
    start_rows = [
        [start.label, start.step, f"{start.val_loss:.4f}", f"{before['own_preference']:.3f}", f"{before['lm_loss']:.4f}"]
        for start, before in starts
    ]
    run_rows = [
        [run["start"], run["seed"], f"{run['accuracy']:.3f}", f"{run['margin']:.3f}", f"{run['own_preference']:.3f}",
         f"{run['lm_loss']:.4f}", f"{run['seconds']:.0f}"]
        for run in runs
    ]
    return (
        "Starting checkpoints (each is its runs' reference model, so its rewards are 0 and its reward accuracy "
        "0 by construction):\n\n"
        + markdown_table(["checkpoint", "step", "pretraining val/loss", "log p(chosen) > log p(rejected)", "held-out LM loss"], start_rows)
        + "\n\nAfter DPO, one row per (checkpoint, seed):\n\n"
        + markdown_table(["checkpoint", "seed", "reward accuracy", "reward margin", "log p(chosen) > log p(rejected)",
                          "held-out LM loss", "s"], run_rows)
    )


def verdict(runs: list, planned: int, section: str) -> str:
    accuracies = [run["accuracy"] for run in runs]
    summary = (f"Held-out reward accuracy over {len(runs)} of {planned} runs: mean {mean(accuracies):.3f}, range "
               f"{min(accuracies):.3f}-{max(accuracies):.3f}")
    if section != "dpo":  # another recipe's target is its own (DPO with LoRA: against full DPO, in the notes)
        return summary + "."
    met = mean(accuracies) >= TARGET_MEAN and min(accuracies) >= TARGET_EACH
    short = ", ".join(f"{run['start']} seed {run['seed']} ({run['accuracy']:.3f})" for run in runs if run["accuracy"] < TARGET_EACH)
    status = ("met" if met else "NOT met") if len(runs) == planned else f"so far {'on track' if met else 'NOT met'}"
    return (
        f"{summary}. Target: mean >= {TARGET_MEAN:.2f} and every run >= {TARGET_EACH:.2f}: **{status}**"
        + (f" (below {TARGET_EACH:.2f}: {short})." if short else ".")
    )


def samples_text(samples: dict) -> str:
    (prompts, truths, openings, before, free_before), after, free_after = samples["before"], *samples["after"][3:]
    return f"Greedy samples ({samples['start']}, seed {samples['seed']}):\n\n" + "\n".join(
        f"Held-out prompt `{prompt!r}`, true continuation `{truth!r}`; greedy before `{b[len(prompt):]!r}`, "
        f"after `{a[len(prompt):]!r}`.\n\nFree sample from `{opening!r}`:\n- before: `{fb[len(opening):]!r}`\n"
        f"- after: `{fa[len(opening):]!r}`\n"
        for prompt, truth, b, a, opening, fb, fa in zip(prompts, truths, before, after, openings, free_before, free_after)
    )


def report(args, starts: list, saved: dict, steps: int) -> str:
    recipe, runs, (start, before) = saved["recipe"], ordered_runs(args, saved), starts[0]
    seeds = " ".join(map(str, args.seeds))
    command = f"python -m benchmarks.bench_dpo --config {args.config_name} --steps {steps} --seeds {seeds}"
    return (
        f"`{command}` on {machine_description()}: {args.config_name} from each pretrain_cpu checkpoint below "
        f"(4 layers x 128, char tokenizer, block {start.block_size}) and each seed (seed_everything and the data module's "
        "seed: which speech each training prompt's rejected continuation comes from, and the batch order; the held-out "
        f"pairs are the same for every run), beta {recipe['beta']}, rpo_alpha {recipe['rpo_alpha']}, lr "
        f"{recipe['learning_rate']}, batch {recipe['batch_size']} pairs, {steps} steps (one thread of a shared machine: "
        f"the seconds vary with its load). Pairs from tiny_shakespeare: prompt = a speech's first {recipe['prompt_chars']} "
        f"characters, chosen = its next {recipe['completion_chars']}, rejected = the same stretch of a speech of similar "
        f"length; {recipe['train_pairs']} training pairs ({recipe['prompts_per_speech']} prompt(s) per speech, each "
        f"{recipe['completion_chars']} characters shorter than the last, and {recipe['rejected_per_prompt']} rejected per "
        f"prompt), {before['pairs']} held-out pairs from the validation part of the corpus (one per speech, its first "
        "prompt_chars characters).\n\n"
        + tables(starts, runs) + "\n\n" + verdict(runs, len(args.init_from) * len(args.seeds), args.section) + "\n\n"
        "Reward accuracy and margin are DPO's implicit rewards beta * (log pi - log ref) against the starting "
        "checkpoint as reference (accuracy: chosen reward strictly greater). The model's own preference is the share "
        "of held-out pairs it finds the true continuation more likely. Held-out LM loss: next-token loss on the 2400 "
        f"validation windows pretraining scored. With {before['pairs']} pairs the standard error of one run's accuracy "
        f"near 0.9 is about {(0.9 * 0.1 / before['pairs']) ** 0.5:.3f}.\n\n"
        + (recipe_notes(args.section) + "\n\n" if recipe_notes(args.section) else "")
        + samples_text(saved["samples"])
    )


def write_report(args, starts: list, saved: dict, steps: int) -> None:
    title = "DPO: preference alignment from the pretrained CPU model"
    title += "" if args.section == "dpo" else f" ({args.config_name})"
    body = report(args, starts, saved, steps)
    if args.smoke:
        print(f"<!-- bench:{args.section} -->\n## {title}\n\n{body}\n(smoke run: BENCHMARKS.md left as it was)")
    else:
        write_section(args.section, title, body)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DPO_YAML, help="the DPO recipe (default configs/dpo.yaml)")
    parser.add_argument("--init_from", nargs="+", default=["runs/pretrain_cpu/version_0/checkpoints/best.ckpt"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's trainer.max_steps")
    parser.add_argument("--beta", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--results", default=None, help="a JSON file of finished runs: a rerun skips them")
    parser.add_argument("--smoke", action="store_true", help="2 steps, one batch scored, the section printed, not written")
    args = parser.parse_args()
    for path in [args.config, *args.init_from]:
        if not Path(path).is_file():
            parser.error(f"file not found: {path}; pass an existing --config recipe and --init_from checkpoints")
    args.section = args.config.stem  # dpo.yaml -> "dpo", dpo_lora.yaml -> "dpo_lora": one section per recipe
    resolved = args.config.resolve()
    args.config_name = str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(args.config)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    recipe = yaml.safe_load(args.config.read_text())
    beta = recipe["model"]["init_args"]["beta"] if args.beta is None else args.beta
    steps = 2 if args.smoke else args.steps or recipe.get("trainer", {}).get("max_steps", 300)
    starts, saved = run_all(args, recipe, beta, steps)
    write_report(args, starts, saved, steps)


if __name__ == "__main__":
    main()

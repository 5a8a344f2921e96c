"""Starting from a Hugging Face folder: fine-tuning it (full and LoRA), and loading it against transformers.

    python -m benchmarks.bench_hf_start [--pretrain_steps 600] [--steps 300] [--smoke]

1. A base worth fine-tuning: configs/pretrain_cpu.yaml trained for --pretrain_steps, exported with
   `export` as a LlamaForCausalLM folder (config.json, safetensors, tokenizer files). The full fine-tune
   and LoRA (configs/lora.yaml) then start from that folder with `--model.init_args.init_from FOLDER`
   alone, as bench_lora.py runs them from the checkpoint: val loss, trainable parameters, training memory.
2. Loading: a ~100M-parameter bf16 Llama folder (random weights, written with safetensors), loaded in a
   fresh process by `PicoGPT.from_checkpoint` and by transformers' `AutoModelForCausalLM.from_pretrained`
   (dtype "auto": the folder's bf16), alternately, --rounds times each: seconds and peak memory over the
   process's own before the load (Linux's VmHWM, reset first), against the weights' bytes.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from benchmarks.bench_lora import fine_tune
from benchmarks.report import machine_description, markdown_table, write_section
from picogpt_lightning.commands.export import export_checkpoint
from picogpt_lightning.lightning_cli import run_lightning

REPO_ROOT = Path(__file__).resolve().parent.parent
LOAD = textwrap.dedent(
    """
    import sys, time, torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM  # each loader's libraries, imported first
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    if sys.argv[2] == "picogpt":
        from picogpt_lightning import PicoGPT, PicoGPTConfig
        load = lambda: PicoGPT.from_checkpoint(sys.argv[1])
        with torch.device("meta"):  # torch's meta-device machinery, loaded once per process (~150 MB): not the load's
            PicoGPT(PicoGPTConfig(vocab_size=8, block_size=8, n_layer=1, n_embd=8, n_head=2))
    else:
        from transformers import AutoModelForCausalLM
        load = lambda: AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
        with torch.device("meta"):  # the same warm-up: transformers builds its models on the meta device too
            LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    open("/proc/self/clear_refs", "w").write("5")
    before, began = status("VmRSS:"), time.perf_counter()
    model = load()
    seconds, loaded = time.perf_counter() - began, status("VmHWM:") - before
    with torch.no_grad():  # every weight touched once: memory a lazily mapped file takes only when used
        model(torch.zeros(1, 8, dtype=torch.long))
    print(seconds, loaded, status("VmHWM:") - before)
    """
)


def pretrained_folder(root: Path, steps: int) -> Path:
    """pretrain_cpu trained for `steps`, exported as a transformers folder."""
    cli = run_lightning([
        "fit", "--config", str(REPO_ROOT / "configs" / "pretrain_cpu.yaml"), "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
    ])
    checkpoint = Path(cli.trainer.checkpoint_callback.best_model_path)
    export_checkpoint(str(checkpoint), str(root / "hf_base"))
    return root / "hf_base"


def big_folder(root: Path, layers: int) -> tuple:
    """A Llama folder of about 100M bf16 parameters (random weights): its path and weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    width, groups, ffn, vocab = 768, 4, 2048, 32000
    LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=12, num_key_value_heads=groups, tie_word_embeddings=False).save_pretrained(root)
    kv = width // 12 * groups
    shapes = {"model.embed_tokens.weight": (vocab, width), "lm_head.weight": (vocab, width), "model.norm.weight": (width,)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        shapes |= {layer + "self_attn.q_proj.weight": (width, width), layer + "self_attn.k_proj.weight": (kv, width),
                   layer + "self_attn.v_proj.weight": (kv, width), layer + "self_attn.o_proj.weight": (width, width),
                   layer + "mlp.gate_proj.weight": (ffn, width), layer + "mlp.up_proj.weight": (ffn, width),
                   layer + "mlp.down_proj.weight": (width, ffn), layer + "input_layernorm.weight": (width,),
                   layer + "post_attention_layernorm.weight": (width,)}
    weights = {name: (torch.randn(shape) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(weights, root / "model.safetensors")
    return root, sum(t.numel() * t.element_size() for t in weights.values())


def load_rounds(folder: Path, rounds: int) -> dict:
    results = {"picogpt": [], "transformers": []}
    for _ in range(rounds):  # alternated, so a busy moment falls on both
        for loader in results:
            out = subprocess.run([sys.executable, "-c", LOAD, str(folder), loader], capture_output=True, text=True,
                                 check=True, cwd=REPO_ROOT)
            seconds, loaded, used = out.stdout.split()[-3:]
            results[loader].append((float(seconds), int(loaded), int(used)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--full_lr", type=float, default=1e-3)
    parser.add_argument("--lora_lr", type=float, default=6e-3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few steps, a small folder: checks the script")
    args = parser.parse_args()
    pretrain, steps = (4, 3) if args.smoke else (args.pretrain_steps, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = pretrained_folder(root, pretrain)
        full = fine_tune("lora", str(base), steps, args.full_lr, root, args.smoke, full=True)
        lora = fine_tune("lora", str(base), steps, args.lora_lr, root, args.smoke)
        (root / "big").mkdir()
        folder, weight_bytes = big_folder(root / "big", 1 if args.smoke else 10)
        loads = load_rounds(folder, 1 if args.smoke else args.rounds)
    tune_rows = [[f"full fine-tune, lr {args.full_lr:g}", *cells(full)], [f"LoRA r=8, lr {args.lora_lr:g}", *cells(lora)]]
    tune_table = markdown_table(["run from the folder", "val loss", "trainable params", "training memory", "s"], tune_rows)
    load_rows = []
    for loader, runs in loads.items():
        seconds = statistics.median(run[0] for run in runs)
        loaded, used = max(run[1] for run in runs), max(run[2] for run in runs)
        load_rows.append([loader, f"{seconds:.2f}", f"{loaded / 2**20:.0f} MiB ({loaded / weight_bytes:.2f}x)",
                          f"{used / 2**20:.0f} MiB ({used / weight_bytes:.2f}x)"])
    load_table = markdown_table(
        ["loader", "load s (median)", "peak after loading (x weight bytes)", "peak after a first forward"], load_rows
    )
    ratio = max(run[2] for run in loads["picogpt"]) / weight_bytes
    text = (
        f"`python -m benchmarks.bench_hf_start --pretrain_steps {pretrain} --steps {steps}` on {machine_description()}.\n\n"
        f"Fine-tuning from a Hugging Face folder: pretrain_cpu trained {pretrain} steps and exported as a "
        "LlamaForCausalLM folder; each run is `fit --config configs/lora.yaml --model.init_args.init_from FOLDER` "
        f"(the full fine-tune with `--model.init_args.lora null`), {steps} steps on tiny_shakespeare's speeches, "
        "architecture and tokenizer read from the folder. Training memory: parameters, gradients and AdamW state at "
        f"an optimizer step.\n\n{tune_table}\n\n"
        f"Loading a {weight_bytes / 2 / 1e6:.0f}M-parameter bf16 Llama folder ({weight_bytes / 2**20:.0f} MiB of "
        f"weights), {len(loads['picogpt'])} alternating rounds of fresh processes; peak: memory over the process's "
        f"own before the load (each process imports its loader's libraries first). transformers maps the safetensors "
        "file and reads its pages when a forward first touches them, so its memory comes with the first forward; "
        f"PicoGPT reads every tensor into the model at once (q, k and v into one fused projection).\n\n{load_table}\n\n"
        "Target: PicoGPT's peak at most 1.3x the weight bytes: "
        f"{ratio:.2f}x, {'met' if ratio <= 1.3 else 'MISSED'}."
    )
    if args.smoke:
        print(text)
    else:
        write_section("hf_start", "Starting from a Hugging Face folder", text)


def cells(run: dict) -> list:
    return [f"{run['val']:.4f}", f"{run['trainable']:,}", f"{run['memory'] / 2**20:.2f} MiB", f"{run['seconds']:.0f}"]


if __name__ == "__main__":
    main()

"""Hugging Face Llama-family folders as starting points: loaded exactly, in their dtype, without a second copy;
every recipe from them (and from a small checkpoint of this project) with init_from alone; fine-tunes that stop."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from picogpt_lightning import PicoGPT, PicoGPTConfig, checkpoints
from picogpt_lightning.data import Tokenizer
from picogpt_lightning.errors import UserError
from picogpt_lightning.lightning_cli import run_lightning
from picogpt_lightning.tokenizer import build_tokenizer

from hf_folders import llama_folder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ("lora", "qlora", "sft", "dpo", "dpo_lora", "bitnet_distill")


@pytest.fixture(scope="module")
def corpus_text(corpus_path) -> str:
    return corpus_path.read_text()[:200_000]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, corpus_text) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama") / "model", corpus_text)


def test_llama_folder_computes_transformers_logits_and_greedy_tokens(folder):
    from transformers import LlamaForCausalLM

    model = PicoGPT.from_checkpoint(str(folder))
    assert next(model.parameters()).dtype == torch.bfloat16  # the folder's own dtype
    config = model.config
    assert (config.head_dim, config.tie_weights, config.bias, config.mlp_bias) == (24, False, True, False)
    assert config.rope_scaling["rope_type"] == "llama3"
    model = model.float().eval()
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 60 positions: past the 32 the llama3 scaling keeps unscaled
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    prompt = ids[:, :8]
    ours = model.generate(prompt, max_new_tokens=24, do_sample=False)
    theirs = reference.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_mistral_sliding_window_and_sharded_safetensors(tmp_path, corpus_text):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    config = MistralConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=16)
    reference = MistralForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards and their index
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = PicoGPT.from_checkpoint(str(tmp_path)).eval()
    assert model.config.block_size == 16  # the window
    ids = torch.randint(0, 120, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # 48 tokens: three windows long
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)


def test_the_tokenizer_comes_with_the_folder(folder):
    checkpoint = checkpoints.load(str(folder))
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder)
    text = "ROMEO: What light?"
    assert tokenizer.encode(text, add_special_tokens=True) == theirs(text)["input_ids"]  # BOS as it adds it
    assert tokenizer.encode(text, add_special_tokens=True)[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id == theirs.eos_token_id
    messages = [{"role": "user", "content": "Who?"}]
    assert tokenizer.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_own_tokenizers_carry_a_default_chat_template_through_checkpoints(tmp_path, corpus_text):
    tokenizer = build_tokenizer("char", text=corpus_text)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Nay."}], add_generation_prompt=False
    )
    assert rendered == "User:\nSpeak.\n\nAssistant:\nNay.\n\n"  # every character is in the corpus's vocabulary
    model = PicoGPT(PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_embd=16, n_head=2))
    checkpoints.save(tmp_path / "m.pt", model, tokenizer)
    assert Tokenizer.from_checkpoint(tmp_path / "m.pt").chat_template == tokenizer.chat_template
    tokenizer.save(tmp_path / "exported")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "exported").chat_template == tokenizer.chat_template


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_what_picogpt_cannot_compute_is_refused_in_one_line(tmp_path, corpus_text, change, field):
    llama_folder(tmp_path, corpus_text, **change)
    with pytest.raises(UserError) as error:
        checkpoints.load(str(tmp_path))
    assert field in str(error.value) and "\n" not in str(error.value)


def test_other_architectures_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="model_type 'gpt2'"):
        checkpoints.load(str(tmp_path))


LOAD_PEAK = textwrap.dedent(
    """
    import sys, torch
    from picogpt_lightning import PicoGPT, PicoGPTConfig
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    from transformers import AutoConfig  # the libraries the load uses, imported before the count starts
    with torch.device("meta"):  # torch's meta-device machinery, loaded on first use (~150 MB, whatever the size)
        PicoGPT(PicoGPTConfig(vocab_size=8, block_size=8, n_layer=1, n_embd=8, n_head=2))
    open("/proc/self/clear_refs", "w").write("5")  # the peak counts from here
    before = status("VmRSS:")
    model = PicoGPT.from_checkpoint(sys.argv[1])
    print(status("VmHWM:") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_a_100m_parameter_bf16_folder_loads_within_1_3x_its_weights(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                         num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    shapes = {"model.embed_tokens.weight": (32000, 768), "lm_head.weight": (32000, 768), "model.norm.weight": (768,)}
    for i in range(10):
        layer = f"model.layers.{i}."
        shapes |= {layer + "self_attn.q_proj.weight": (768, 768), layer + "self_attn.k_proj.weight": (256, 768),
                   layer + "self_attn.v_proj.weight": (256, 768), layer + "self_attn.o_proj.weight": (768, 768),
                   layer + "mlp.gate_proj.weight": (2048, 768), layer + "mlp.up_proj.weight": (2048, 768),
                   layer + "mlp.down_proj.weight": (768, 2048), layer + "input_layernorm.weight": (768,),
                   layer + "post_attention_layernorm.weight": (768,)}
    weights = {name: torch.randn(shape).to(torch.bfloat16) for name, shape in shapes.items()}
    weight_bytes = sum(tensor.numel() * 2 for tensor in weights.values())
    assert 95e6 < weight_bytes / 2 < 130e6  # about 100M parameters
    save_file(weights, tmp_path / "model.safetensors")
    del weights
    result = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True, check=True)
    peak, loaded = map(int, result.stdout.split())
    assert loaded == weight_bytes  # bf16 kept, every tensor once
    assert peak <= 1.3 * weight_bytes, f"peak {peak / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB of weights"


# ---- every recipe from init_from alone ----------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, corpus_path) -> Path:
    """A 2-layer, width-32 checkpoint of this project, with the corpus's char tokenizer."""
    tokenizer = build_tokenizer("char", text=corpus_path.read_text())
    torch.manual_seed(0)
    model = PicoGPT(PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_embd=32, n_head=2))
    path = tmp_path_factory.mktemp("small") / "small.pt"
    checkpoints.save(path, model, tokenizer)
    return path


def recipe_flags(recipe: str, init_from: Path, corpus: Path, out: Path) -> list:
    flags = [
        "fit", "--config", str(CONFIGS / f"{recipe}.yaml"),
        "--model.init_args.init_from", str(init_from),
        "--data.init_args.batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(out),
    ]
    if recipe in ("lora", "qlora", "bitnet_distill"):
        flags += ["--data.init_args.data_path", str(corpus), "--data.init_args.train_samples", "4",
                  "--data.init_args.val_samples", "2"]
    else:
        flags += ["--data.init_args.corpus_path", str(corpus)]
    return flags


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("base", ["hf_folder", "small_checkpoint"])
def test_every_recipe_runs_from_init_from_alone(recipe, base, request, tmp_path, corpus_path):
    init_from = request.getfixturevalue("folder" if base == "hf_folder" else "small_checkpoint")
    cli = run_lightning(recipe_flags(recipe, init_from, corpus_path, tmp_path))
    assert cli.trainer.global_step == 2
    start = checkpoints.load(str(init_from)).config
    trained = cli.model.config
    assert (trained.n_layer, trained.n_embd, trained.head_size) == (start.n_layer, start.n_embd, start.head_size)
    assert trained.linear == ("bitnet1.58" if recipe == "bitnet_distill" else "linear")
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


# ---- completions end with EOS; trl's conversational formats -------------------------------


def test_completions_end_with_eos_and_conversations_render_through_the_template(folder):
    from transformers import AutoTokenizer

    from picogpt_lightning.data.truncate import tokenize

    tokenizer = Tokenizer.from_checkpoint(str(folder))
    theirs = AutoTokenizer.from_pretrained(folder)
    eos = theirs.eos_token_id
    plain = tokenize({"prompt": ["To be"], "completion": [" or not"]}, tokenizer, ("completion",), 64, 32)
    assert plain["prompt_ids"][0] == theirs("To be")["input_ids"]  # BOS, as the tokenizer adds it
    assert plain["completion_ids"][0] == theirs(" or not", add_special_tokens=False)["input_ids"] + [eos]

    conversation = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}]
    whole = theirs.apply_chat_template(conversation, tokenize=True, return_dict=False)
    sft = tokenize({"messages": [conversation]}, tokenizer, ("completion",), 64, 32)
    ids = sft["prompt_ids"][0] + sft["completion_ids"][0]
    assert ids == whole + ([eos] if whole[-1] != eos else [])  # trl: EOS appended unless the template ended with it
    assert sft["prompt_ids"][0] == theirs.apply_chat_template(conversation[:1], add_generation_prompt=True,
                                                              tokenize=True, return_dict=False)

    prompt, chosen, rejected = conversation[:1], conversation[1:], [{"role": "assistant", "content": "Stand."}]
    dpo = tokenize({"prompt": [prompt], "chosen": [chosen], "rejected": [rejected]}, tokenizer, ("chosen", "rejected"), 64, 32)
    assert dpo["prompt_ids"][0] + dpo["chosen_ids"][0] == ids
    assert dpo["rejected_ids"][0][-1] == eos


def test_a_model_sft_trained_on_short_answers_stops_at_eos(folder, tmp_path, corpus_path):
    answers = ["ay", "no", "anon", "farewell", "good night", "alas"]
    rows = [{"prompt": f"Question {i}: say {word}.\nAnswer:", "completion": f" {word}"} for i, word in enumerate(answers)]
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cli = run_lightning([
        "fit", "--config", str(CONFIGS / "sft.yaml"), "--model.init_args.init_from", str(folder),
        "--data.init_args.data_path", str(data), "--data.init_args.val_data_path", str(data),
        "--data.init_args.batch_size", "6", "--model.init_args.learning_rate", "3e-3",
        "--model.init_args.min_lr", "3e-3", "--model.init_args.warmup_steps", "0", "--model.init_args.weight_decay", "0",
        "--trainer.max_steps", "80", "--trainer.val_check_interval", "80", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ])
    model, tokenizer = cli.model.model.eval(), cli.model.tokenizer
    for row in rows:
        prompt = torch.tensor([tokenizer.encode(row["prompt"], add_special_tokens=True)])
        out = model.generate(prompt, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)[0, prompt.shape[1]:]
        assert out[-1].item() == tokenizer.eos_token_id and len(out) < 12, tokenizer.decode(out)  # it stopped
        assert tokenizer.decode(out[:-1]) == row["completion"]

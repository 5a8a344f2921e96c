"""python -m picogpt_lightning generate / export, end to end on a tiny trained checkpoint."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from picogpt_lightning import PicoGPT, PicoGPTConfig
from picogpt_lightning.cli import main
from picogpt_lightning.tokenizer import Tokenizer, build_tokenizer
from picogpt_lightning.modules import LanguageModelModule
from picogpt_lightning.generation import generate_texts

TEXT = "to be, or not to be, that is the question:\nwhether 'tis nobler in the mind to suffer\n" * 4


pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def train_tiny_checkpoint(path, tokenizer, **overrides) -> None:
    """A few real optimizer steps through Lightning, so the checkpoint is what `fit` writes."""
    config = PicoGPTConfig(
        **{**dict(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_embd=32, n_head=4, n_query_groups=2), **overrides}
    )
    module = LanguageModelModule(config, learning_rate=1e-2, warmup_steps=0)
    module.tokenizer = tokenizer
    ids = torch.tensor(tokenizer.encode(TEXT))
    windows = [ids[i : i + 33] for i in range(0, len(ids) - 33, 16)]
    batches = [
        {"input_ids": w[:-1], "labels": w[1:], "attention_mask": torch.ones(32, dtype=torch.long)} for w in windows
    ]
    trainer = L.Trainer(
        max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(module, DataLoader(batches, batch_size=8, shuffle=True))
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    train_tiny_checkpoint(path, build_tokenizer("char", TEXT))
    return str(path)


def run_cli(capsys, *args) -> str:
    main(list(args))
    return capsys.readouterr().out


def test_generate_greedy_prints_what_the_model_generates(checkpoint, capsys):
    out = run_cli(capsys, "generate", "--ckpt", checkpoint, "--prompt", "to be", "--max_new_tokens", "20")
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
    expected = model.generate(torch.tensor([tokenizer.encode("to be")]), max_new_tokens=20)[0]
    assert out == tokenizer.decode(expected) + "\n"
    assert out.startswith("to be") and len(out) == len("to be") + 20 + 1


def test_generate_prompts_file_is_one_left_padded_batch(checkpoint, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("to be\n\nwhether 'tis\\n\n")  # a blank line is skipped; \n is a newline
    out = run_cli(
        capsys, "generate", "--ckpt", checkpoint, "--prompts_file", str(prompts), "--max_new_tokens", "12",
        "--num_beams", "3", "--num_return_sequences", "2",
    )
    texts = out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(texts) == 4  # 2 prompts x 2 sequences
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
    for number, prompt in enumerate(["to be", "whether 'tis\n"]):
        alone = model.generate(torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=12, num_beams=3, num_return_sequences=2)
        assert texts[2 * number : 2 * number + 2] == [tokenizer.decode(row) for row in alone]


def test_generate_streams_seeded_samples(checkpoint, capsys):
    args = ["generate", "--ckpt", checkpoint, "--prompt", "to", "--max_new_tokens", "30", "--do_sample", "true",
            "--temperature", "0.9", "--top_k", "10", "--seed", "5"]
    streamed = run_cli(capsys, *args)
    batched = run_cli(capsys, *args, "--stream", "false")
    assert streamed == batched  # the streamer prints exactly the sampled text
    assert streamed != run_cli(capsys, *args[:-1], "6")


def test_generate_writes_samples_past_block_size(checkpoint, capsys):
    # nanoGPT's sample.py: 500 new tokens by default; this model's block_size is 48
    out = run_cli(capsys, "generate", "--ckpt", checkpoint, "--prompt", "to be", "--num_samples", "3", "--top_k", "5")
    samples = out.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and len(set(samples)) == 3  # sampled, each its own
    assert all(len(text) == len("to be") + 500 for text in samples[:2])  # char tokens: one character each
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)
    torch.manual_seed(1337)  # the command's default seed: the first sample is this draw
    first = model.generate(torch.tensor([tokenizer.encode("to be")]), max_new_tokens=500, do_sample=True, top_k=5)
    assert samples[0] == tokenizer.decode(first[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "to be", "--num_samples", "0"], "--num_samples must be a positive integer"),
        (["--prompt", "to be", "--num_samples", "2", "--do_sample", "false"], "greedy decoding gives one"),
        (["--prompt", "to be", "--num_samples", "2", "--num_beams", "2"], "for several beams use"),
        ([], "exactly one of --prompt"),
        (["--prompt", "to be", "--num_beams", "2", "--num_return_sequences", "3"], "num_return_sequences"),
        (["--prompt", "XYZ"], "not in the 'char' tokenizer"),
        (["--prompts_file", "/nonexistent/prompts.txt"], "prompts file not found"),
    ],
)
def test_generate_user_errors_are_one_line(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", checkpoint, *args])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_export_then_transformers_generates_the_same_text(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = tmp_path / "hf"
    run_cli(capsys, "export", "--ckpt", checkpoint, "--out", str(out_dir))
    llama = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    model, tokenizer = PicoGPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_checkpoint(checkpoint)

    batch = hf_tokenizer(["to be", "whether"], add_special_tokens=False)
    ids = batch["input_ids"]
    assert ids == [tokenizer.encode("to be"), tokenizer.encode("whether")]
    input_ids = torch.tensor([ids[1]])
    with torch.no_grad():
        assert (llama(input_ids).logits - model(input_ids).logits).abs().max() <= 1e-4
    theirs = llama.generate(input_ids, max_new_tokens=15, num_beams=3, do_sample=False)  # stops at eos, the newline
    ours = generate_texts(model, tokenizer.for_export(), ["whether"], max_new_tokens=15, num_beams=3)[0]
    assert hf_tokenizer.decode(theirs[0]).split("\n")[0] == ours


def test_export_refuses_to_overwrite_and_gelu(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already exists"):
        main(["export", "--ckpt", checkpoint, "--out", str(out_dir)])
    assert (out_dir / "keep.txt").read_text() == "mine"

    gelu_ckpt = tmp_path / "gelu.ckpt"
    train_tiny_checkpoint(gelu_ckpt, build_tokenizer("char", TEXT), mlp="gelu")
    with pytest.raises(SystemExit, match="mlp='gelu' has no Llama equivalent"):
        main(["export", "--ckpt", str(gelu_ckpt), "--out", str(tmp_path / "gelu")])
    assert not (tmp_path / "gelu").exists()


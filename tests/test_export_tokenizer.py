"""The exported tokenizer carries bos, eos and pad: transformers' batched generation and lm-eval's
HFLM work on the export with their defaults, and agree with this project's own numbers."""

import pytest
import torch
import torch.nn.functional as F

from picogpt_lightning.generation import generate_texts
from picogpt_lightning.hf import save_pretrained
from picogpt_lightning.tokenizer import build_tokenizer
from factories import tiny_model

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me!\n"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tokenizer = build_tokenizer("char", TEXT)
    model = tiny_model(seed=4, vocab_size=tokenizer.vocab_size, block_size=48).train()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):  # enough to learn where lines end, so eos really ends rows
        loss = F.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    directory = tmp_path_factory.mktemp("export") / "hf"
    save_pretrained(model, str(directory), tokenizer)
    return model, tokenizer, directory


def test_a_char_export_takes_the_newline_as_bos_eos_and_pad(export):
    from transformers import AutoTokenizer

    _, tokenizer, directory = export
    hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    newline = tokenizer.encode("\n")[0]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (newline, newline, newline)
    assert tokenizer.eos_token_id is None  # the project's own tokenizer is unchanged
    batch = hf(["ROMEO:", "Ay me"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist()[1] == [newline] + tokenizer.encode("Ay me")  # padded on the left
    assert batch["attention_mask"].tolist() == [[1] * 6, [0] + [1] * 5]
    assert "newline serves as bos, eos and pad" in (directory / "README.md").read_text()


def test_transformers_batched_generation_with_defaults_equals_generate(export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, directory = export
    llama = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    prompts = ["ROMEO:", "But so", "Ay"]
    batch = hf(prompts, padding=True, return_tensors="pt")
    outputs = llama.generate(**batch, max_new_tokens=20, do_sample=False)  # eos and pad from the export
    newline = tokenizer.encode("\n")[0]
    # eos, and the pad after it, are the newline: a row's text ends at its first one
    theirs = [hf.decode(row[batch["input_ids"].shape[1]:]).split("\n")[0] for row in outputs]
    exported = tokenizer.for_export()  # the same tokens the export holds: its eos ends our rows too
    ours = [generate_texts(model, exported, [prompt], max_new_tokens=20)[0][len(prompt):] for prompt in prompts]
    assert theirs == ours
    assert newline in outputs[:, batch["input_ids"].shape[1]:]  # some row really stopped at the newline


def test_lm_eval_hflm_scores_a_passage_with_default_arguments(export):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, directory = export
    lm = HFLM(pretrained=str(directory), device="cpu")
    passage = "But soft, what light"
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (passage,), 0)])
    [(continuation, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, ("JULIET:\nAy", " me!"), 0)])

    def log_prob(context: str, text: str) -> float:  # sum of log p(token | everything before it)
        ids = torch.tensor([tokenizer.encode(context + text)])
        with torch.no_grad():
            log_probs = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        return log_probs[torch.arange(len(targets)), targets][-len(tokenizer.encode(text)):].sum().item()

    assert rolling == pytest.approx(log_prob("\n", passage), abs=1e-3)  # the bos (newline) comes first
    assert continuation == pytest.approx(log_prob("JULIET:\nAy", " me!"), abs=1e-3)
    assert isinstance(greedy, bool)

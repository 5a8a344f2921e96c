"""BitNet Distillation's pieces: SubLN, the MiniLM-v2 attention-relation loss, the warm start, a fit, packing."""

import math

import pytest
import torch
import torch.nn.functional as F

import factories
from picogpt_lightning import PicoGPT, PicoGPTConfig, checkpoints
from picogpt_lightning.commands.quantize import quantize_checkpoint
from picogpt_lightning.errors import UserError
from picogpt_lightning.hf import to_hf
from picogpt_lightning.losses import attention_relation_loss
from picogpt_lightning.modules import DistillationModule
from picogpt_lightning.quant import BitLinear, PackedBitLinear
from tiny_training import quiet_trainer, tiny_config, tiny_datamodule

EPS = 1e-5


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS) * weight


def written_out_forward(model: PicoGPT, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a plain-MHA PicoGPT with SubLN, every step by hand."""
    c = model.config
    (B, T), H, hs = ids.shape, c.n_head, c.head_size
    angles = torch.arange(T).float()[:, None] / c.rope_theta ** (torch.arange(0, hs, 2).float() / hs)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def heads(t, rotate):
        t = t.view(B, T, H, hs).transpose(1, 2)
        return t * cos + torch.cat([-t[..., hs // 2:], t[..., : hs // 2]], -1) * sin if rotate else t

    x = model.tok_embeddings.weight[ids]
    for block in model.blocks:
        q, k, v = (rms_norm(x, block.attn_norm.weight) @ block.attn.qkv.weight.T).split(H * hs, dim=-1)
        scores = heads(q, True) @ heads(k, True).transpose(-1, -2) / math.sqrt(hs)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ heads(v, False)).transpose(1, 2).reshape(B, T, H * hs)
        x = x + rms_norm(y, block.attn.sub_norm.weight) @ block.attn.proj.weight.T  # SubLN before attn.proj
        h, mlp = rms_norm(x, block.mlp_norm.weight), block.mlp
        if c.mlp == "swiglu":
            hidden, down = F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T), mlp.down_proj
        else:
            hidden, down = F.gelu(h @ mlp.fc.weight.T), mlp.proj
        x = x + rms_norm(hidden, mlp.sub_norm.weight) @ down.weight.T  # SubLN before the down projection
    return rms_norm(x, model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_sub_norm_forward_is_the_written_out_formula(mlp):
    model = factories.randomize(factories.tiny_model(n_query_groups=4, mlp=mlp, sub_norm=True), only_norms_and_biases=True)
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, written_out_forward(model, ids))


def test_sub_norm_is_off_by_default_validated_and_refused_by_to_hf():
    assert not any("sub_norm" in key for key in factories.tiny_model().state_dict())
    with pytest.raises(UserError, match="sub_norm must be true or false"):
        PicoGPTConfig(sub_norm="yes")
    with pytest.raises(UserError, match="sub_norm=True .* no Llama equivalent"):
        to_hf(factories.tiny_model(sub_norm=True))


def reference_relation_loss(student, teacher, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM-v2 by loops: per relation head, softmax over the real keys of x_i . x_j / sqrt(d_r), KL(teacher || student)."""
    relations = []
    for s, t in zip(student, teacher):
        s, t = s.transpose(1, 2).flatten(2), t.transpose(1, 2).flatten(2)  # (B, T, heads * head_size)
        terms = []
        for b in range(s.shape[0]):
            real = mask[b].bool()
            for i in torch.nonzero(real).flatten():
                per_head = []
                for r in range(heads):
                    def relation(x):
                        d = x.shape[-1] // heads
                        part = x[b, :, r * d:(r + 1) * d]
                        return torch.softmax(part[real] @ part[i] / math.sqrt(d), dim=0)

                    p, q = relation(t), relation(s)
                    per_head.append((p * (p.log() - q.log())).sum())
                terms.append(torch.stack(per_head).mean())
        relations.append(torch.stack(terms).mean())
    return torch.stack(relations).mean()


def test_attention_relation_loss_is_minilm_v2_across_widths_and_masks_padding():
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 2, 6, 4, generator=generator, requires_grad=True) for _ in range(3)]  # width 8
    teacher = [torch.randn(2, 4, 6, 6, generator=generator) for _ in range(3)]  # width 24, other heads
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    loss = attention_relation_loss(student, teacher, relation_heads=2, mask=mask)
    torch.testing.assert_close(loss, reference_relation_loss(student, teacher, 2, mask))
    loss.backward()
    assert all(torch.isfinite(s.grad).all() for s in student)
    same = [t.clone() for t in teacher]
    assert attention_relation_loss(same, teacher, relation_heads=4, mask=mask).abs() < 1e-6
    with pytest.raises(UserError, match="not divisible by relation_heads=3"):
        attention_relation_loss(student, teacher, relation_heads=3)


def bitnet_student(**overrides) -> PicoGPTConfig:
    return tiny_config(linear="bitnet1.58", sub_norm=True, **overrides)


def saved_fp_model(path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = factories.randomize(PicoGPT(tiny_config()), only_norms_and_biases=True)
    checkpoints.save(str(path), model)
    return str(path)


def test_warm_start_copies_the_fp_weights_exactly_into_the_bitlinear_student(tmp_path):
    fp_path = saved_fp_model(tmp_path / "fp.pt")
    module = DistillationModule(bitnet_student(), teacher=fp_path, init_from=fp_path, lr_decay_steps=10)
    fp = PicoGPT.from_checkpoint(fp_path).state_dict()
    assert not torch.equal(module.model.state_dict()["blocks.0.attn.qkv.weight"], fp["blocks.0.attn.qkv.weight"])
    module.setup("fit")
    student = module.model.state_dict()
    assert isinstance(module.model.blocks[0].attn.qkv, BitLinear)
    assert {key for key in student if ".sub_norm." in key} == set(student) - set(fp)
    assert all(torch.equal(student[key], value) for key, value in fp.items())
    assert all(torch.equal(student[key], torch.ones_like(student[key])) for key in set(student) - set(fp))

    wider = DistillationModule(bitnet_student(n_embd=64), teacher=fp_path, init_from=fp_path, lr_decay_steps=10)
    with pytest.raises(checkpoints.CheckpointError, match="n_embd 32 vs 64") as error:
        wider.setup("fit")
    assert "\n" not in str(error.value)


def test_distillation_fit_with_attention_relations_logs_its_loss_parts(tmp_path, corpus_path):
    fp_path = saved_fp_model(tmp_path / "fp.pt")
    torch.manual_seed(1)  # a teacher of another depth, width and head count: relations still compare
    teacher = PicoGPT(tiny_config(n_layer=3, n_embd=48, n_head=4, n_query_groups=2))
    teacher_path = str(tmp_path / "teacher.pt")
    teacher.save(teacher_path)
    module = DistillationModule(
        bitnet_student(), teacher=teacher_path, init_from=fp_path, alpha_ce=0.5, alpha_kd=1.0, alpha_attn=2.0,
        attn_layer=(0, -1), warmup_steps=1, lr_decay_steps=4,
    )
    trainer = quiet_trainer(max_steps=4, log_every_n_steps=1)
    trainer.fit(module, datamodule=tiny_datamodule(corpus_path, batch_size=4))
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert {"train/loss", "train/ce", "train/kd", "train/attn"} <= set(logged)
    assert logged["train/attn"] > 0 and all(math.isfinite(value) for value in logged.values())
    assert logged["train/loss"] == pytest.approx(
        0.5 * logged["train/ce"] + logged["train/kd"] + 2.0 * logged["train/attn"], rel=1e-4
    )


def test_attention_relations_refuse_bad_layers_and_heads(tmp_path):
    fp_path = saved_fp_model(tmp_path / "fp.pt")
    with pytest.raises(UserError, match="attn_layer's teacher block 5 is out of range"):
        DistillationModule(bitnet_student(), teacher=fp_path, alpha_attn=1.0, attn_layer=(0, 5))
    with pytest.raises(UserError, match="relation_heads must divide"):
        DistillationModule(bitnet_student(), teacher=fp_path, alpha_attn=1.0, relation_heads=3)


def test_sub_norm_bitnet_model_packs_and_its_packed_logits_are_the_fake_quantized_ones(tmp_path):
    torch.manual_seed(0)
    model = factories.randomize(PicoGPT(bitnet_student()), only_norms_and_biases=True).eval()
    source, packed_path = str(tmp_path / "bitnet.pt"), str(tmp_path / "packed.pt")
    checkpoints.save(source, model)
    quantize_checkpoint(source, packed_path, "bitnet")
    packed = PicoGPT.from_checkpoint(packed_path).eval()
    assert isinstance(packed.blocks[0].mlp.down_proj, PackedBitLinear)
    assert torch.equal(packed.blocks[1].mlp.sub_norm.weight, model.blocks[1].mlp.sub_norm.weight)
    ids = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        # the int8 kernel rounds each layer's integer sums to bfloat16 (tests/test_quant.py's bound)
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=0, atol=0.05)

"""Built-in target maps beyond BERT: prune -> factorize -> finalize -> save -> load on tiny random models.

Each architecture is a small random config (hidden 32, 2 layers, vocab 100) trained a few steps with its real loss
while FirstOrderPruner prunes; the reference for the reloaded model is the in-memory finalized model, and for the
GPT-2 Conv1D orientation a float64 truncated SVD of the transposed (out x in) pruned weight.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
)
from transformers.pytorch_utils import Conv1D

from lrsparse.factorization import factorize_model
from lrsparse.io import load_compressed, save_compressed
from lrsparse.layers import LowRankLinear, MixedRankLinear, finalize_low_rank
from lrsparse.pruning import FirstOrderPruner
from lrsparse.targets import find_targets, linear_shape, out_in_weight
from pipeline_helpers import VOCAB, random_batches

torch.set_num_threads(1)

SEQ_CLS, CAUSAL_LM = AutoModelForSequenceClassification, AutoModelForCausalLM


def roberta():
    return SEQ_CLS, RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=2)


def distilbert():
    return SEQ_CLS, DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                                     max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
                                     seq_classif_dropout=0.0, num_labels=2)


def gpt2():
    return CAUSAL_LM, GPT2Config(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=VOCAB, n_positions=40,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


LLAMA_STYLE_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=40)


def llama():
    # Grouped-query attention: 4 query heads share 2 key/value heads (k_proj, v_proj are 32 -> 16).
    return CAUSAL_LM, LlamaConfig(**LLAMA_STYLE_SIZES)


def mistral():
    return CAUSAL_LM, MistralConfig(**LLAMA_STYLE_SIZES)


def qwen2():
    return CAUSAL_LM, Qwen2Config(**LLAMA_STYLE_SIZES)  # q/k/v_proj have biases here


LLAMA_BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
# Expected targets: the block projections, by name suffix, per layer index.
ARCHITECTURES = {
    "roberta": (roberta, "roberta.encoder.layer.{i}.",
                ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]),
    "distilbert": (distilbert, "distilbert.transformer.layer.{i}.",
                   ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1",
                    "ffn.lin2"]),
    "gpt2": (gpt2, "transformer.h.{i}.", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "llama": (llama, "model.layers.{i}.", LLAMA_BLOCK),
    "mistral": (mistral, "model.layers.{i}.", LLAMA_BLOCK),
    "qwen2": (qwen2, "model.layers.{i}.", LLAMA_BLOCK),
}


def build(arch: str, seed: int = 0):
    factory, config = ARCHITECTURES[arch][0]()
    torch.manual_seed(seed)
    return factory, factory.from_config(config).float()


def expected_targets(arch: str) -> list[str]:
    _, prefix, suffixes = ARCHITECTURES[arch]
    return [prefix.format(i=i) + suffix for i in range(2) for suffix in suffixes]


def batches(factory, count: int) -> list[dict]:
    data = random_batches(count, length=10)
    if factory is CAUSAL_LM:
        return [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in data]
    return data


def prune(model, factory, steps: int = 6) -> FirstOrderPruner:
    pruner = FirstOrderPruner(model, final_density=0.5, total_steps=steps, initial_warmup_fraction=1,
                              final_warmup_fraction=1, delta_t=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for batch in batches(factory, steps):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        pruner.step()
        optimizer.zero_grad()
    return pruner


@torch.no_grad()
def outputs(model, factory) -> torch.Tensor:
    model.eval()
    batch = batches(factory, 1)[0]
    return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_default_targets_are_the_block_projections(arch):
    _, model = build(arch)
    targets = find_targets(model)
    assert list(targets) == expected_targets(arch)
    wanted = Conv1D if arch == "gpt2" else nn.Linear
    assert all(type(m) is wanted for m in targets.values())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_style_grouped_query_projection_shapes(arch):
    _, model = build(arch)
    targets = find_targets(model)
    # head_dim 8: q_proj 32 -> 32, k/v_proj 32 -> 2 * 8 = 16.
    assert linear_shape(targets["model.layers.0.self_attn.q_proj"]) == (32, 32)
    assert linear_shape(targets["model.layers.0.self_attn.k_proj"]) == (32, 16)
    assert linear_shape(targets["model.layers.0.self_attn.v_proj"]) == (32, 16)
    assert linear_shape(targets["model.layers.0.self_attn.o_proj"]) == (32, 32)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prune_factorize_save_load_round_trip(arch, tmp_path):
    factory, model = build(arch)
    names = expected_targets(arch)
    shapes = {name: linear_shape(model.get_submodule(name)) for name in names}
    pruner = prune(model, factory)
    assert pruner.density() == pytest.approx(0.5, abs=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    untouched_types = {name: type(m) for name, m in model.named_modules()
                       if name and not any(name == t or name.startswith(t + ".") for t in names)}

    reports = factorize_model(model, keep=0.5, pruner=pruner, solver_options={"max_iters": 20})
    assert [r.name for r in reports] == names
    for report in reports:
        assert (report.in_features, report.out_features) == shapes[report.name]
        assert report.density == pytest.approx(
            float(pruner.masks[report.name].float().mean()), abs=1e-6)
    finalize_low_rank(model)

    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is LowRankLinear, name
        assert (layer.in_features, layer.out_features) == shapes[name]
    assert {name for name, m in model.named_modules() if isinstance(m, LowRankLinear)} == set(names)
    # Embeddings, norms, heads and every other module are the same kind of module as before, with equal weights.
    for name, kind in untouched_types.items():
        assert type(model.get_submodule(name)) is kind, name
    target_param = re.compile("^(" + "|".join(re.escape(n) for n in names) + r")\.")
    after = model.state_dict()
    for key, value in before.items():
        if not target_param.match(key):
            assert torch.equal(after[key], value), key

    expected = outputs(model, factory)
    save_compressed(model, tmp_path / "model")
    loaded = load_compressed(tmp_path / "model")
    assert {name for name, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == set(names)
    torch.testing.assert_close(outputs(loaded, factory), expected, atol=1e-5, rtol=0)


def test_gpt2_conv1d_factorization_orientation():
    factory, model = build("gpt2", seed=3)
    pruner = prune(model, factory)
    pruned_logits = outputs(model, factory)
    pruned = {name: module.weight.detach().double().t().clone() for name, module in pruner.targets.items()}
    reports = factorize_model(model, keep=0.5, pruner=pruner, method="svd")

    # alpha = 0 (the sparse path alone) must reproduce the pruned Conv1D model.
    for name in pruned:
        layer = model.get_submodule(name)
        assert isinstance(layer, MixedRankLinear)
        assert layer.alpha == 0.0
        torch.testing.assert_close(layer.sparse_weight.detach().double(), pruned[name], atol=0, rtol=0)
        assert torch.equal(layer.sparse_mask, pruner.masks[name].t())
    torch.testing.assert_close(outputs(model, factory), pruned_logits, atol=1e-5, rtol=0)

    # The low-rank path is the truncated SVD of the out x in pruned weight (float64 reference).
    for report in reports:
        layer = model.get_submodule(report.name)
        U, S, Vh = torch.linalg.svd(pruned[report.name], full_matrices=False)
        r = report.rank
        reference = (U[:, :r] * S[:r]) @ Vh[:r]
        got = layer.U.detach().double() @ layer.V.detach().double()
        assert got.shape == (report.out_features, report.in_features)
        assert torch.linalg.matrix_norm(got - reference) <= 1e-4 * torch.linalg.matrix_norm(reference)


def test_gpt2_fwsvd_uses_fisher_rows_of_the_output_dimension():
    # FWSVD weights the rows (outputs) of the out x in matrix: the Conv1D Fisher (in x out) must be transposed, or
    # the row scale would have the wrong length (c_fc is 32 -> 64) and factorize_model would raise.
    factory, model = build("gpt2", seed=4)
    pruner = prune(model, factory)
    reports = factorize_model(model, keep=0.5, pruner=pruner, method="fwsvd")
    name = "transformer.h.0.mlp.c_fc"
    report = next(r for r in reports if r.name == name)
    assert (report.in_features, report.out_features) == (32, 64)
    layer = model.get_submodule(name)
    # Reference: Fisher-weighted truncated SVD in float64 with row scale sqrt(sum_j F_ij) over the out x in Fisher.
    weight = layer.sparse_weight.detach().double()
    scale = pruner.fisher(name).double().t().sum(dim=1).sqrt()
    scale = scale.clamp_min(float(scale.max()) * 1e-6)
    U, S, Vh = torch.linalg.svd(scale[:, None] * weight, full_matrices=False)
    r = report.rank
    reference = ((U[:, :r] * S[:r]) @ Vh[:r]) / scale[:, None]
    got = layer.U.detach().double() @ layer.V.detach().double()
    assert torch.linalg.matrix_norm(got - reference) <= 1e-3 * torch.linalg.matrix_norm(reference)


def test_out_in_weight_rejects_other_modules():
    with pytest.raises(TypeError, match="module must be an nn.Linear or a transformers Conv1D"):
        out_in_weight(nn.Embedding(4, 3))
    conv = Conv1D(5, 3)
    assert out_in_weight(conv).shape == (5, 3)
    assert linear_shape(conv) == (3, 5)

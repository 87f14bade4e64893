"""Training-loop safeguards of the pipeline: non-finite gradients (skip or error), a tokenizer that does not fit the
model, and the options that control them."""
from __future__ import annotations

import re

import pytest
import torch

from lrsparse import modeling, pipeline
from lrsparse.cli import build_parser, config_from_args, main
from lrsparse.data import PaddingCollator
from lrsparse.recipe import RecipeConfig
from lrsparse.training import train
from pipeline_helpers import VOCAB, tiny_bert

POISONED = "bert.encoder.layer.0.attention.self.query.weight"


def _dataset(count: int = 16, length: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(1, VOCAB, (length,), generator=gen),
             "labels": torch.randint(0, 2, (), generator=gen)} for _ in range(count)]


def _config(tmp_path, **overrides) -> RecipeConfig:
    settings = dict(task="sst2", keep=0.5, output_dir=str(tmp_path), batch_size=4, lr=1e-3, checkpoint_every=0)
    settings.update(overrides)
    return RecipeConfig.create(**settings)


def _poison_gradient_at(model, name: str, backward_call: int) -> None:
    """Makes the gradient of parameter ``name`` +inf in its ``backward_call``-th backward pass."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == backward_call else grad

    model.get_parameter(name).register_hook(hook)


def test_nonfinite_gradient_error_names_step_and_parameter(tmp_path):
    model = tiny_bert()
    _poison_gradient_at(model, POISONED, backward_call=3)
    config = _config(tmp_path, nonfinite_grads="error")
    with pytest.raises(FloatingPointError, match=rf"finetune step 3: non-finite gradient in parameter\(s\) "
                                                 rf"\['{POISONED}'\]"):
        train(model, _dataset(), config, 4, 7, "finetune", PaddingCollator(0), torch.device("cpu"))


def test_nonfinite_gradient_step_is_skipped_without_touching_the_weights(tmp_path):
    model = tiny_bert()
    _poison_gradient_at(model, POISONED, backward_call=3)
    optimizers, hook_calls, before_forward = [], [], []

    class Compressor:  # records the loop's calls of compressor.step(optimizer)
        def step(self, optimizer, grads_finite=False):
            hook_calls.append(1)
            if not optimizers:
                optimizers.append(optimizer)

    # Snapshot of the weights entering each forward: the skipped step 3 must leave them as step 2 did.
    model.register_forward_pre_hook(
        lambda module, args: before_forward.append({k: v.detach().clone() for k, v in module.state_dict().items()}))
    stats = train(model, _dataset(), _config(tmp_path), 4, 7, "finetune", PaddingCollator(0), torch.device("cpu"),
                  compressor=Compressor())

    assert (stats["skipped_steps"], stats["nonfinite_grad_steps"], len(hook_calls)) == (1, 1, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(before_forward[2][k], before_forward[3][k]) for k in before_forward[2])
    assert not all(torch.equal(before_forward[1][k], before_forward[2][k]) for k in before_forward[1])
    # Adam counted 3 updates (steps 1, 2, 4) for every parameter.
    assert {float(state["step"]) for state in optimizers[0].state.values()} == {3.0}


def test_options_from_the_command_line(tmp_path):
    base = ["compress", "--task", "sst2", "--keep", "0.5", "--output", str(tmp_path)]
    config = config_from_args(build_parser().parse_args([*base, "--checkpoint-every", "0", "--nonfinite-grads",
                                                         "error"]))
    assert (config.checkpoint_every, config.nonfinite_grads) == (0, "error")
    defaults = config_from_args(build_parser().parse_args(base))
    assert (defaults.checkpoint_every, defaults.nonfinite_grads) == (200, "skip")
    # Neither changes the result, so a run may be resumed with other values.
    assert "checkpoint_every" not in config.identity() and "nonfinite_grads" not in config.identity()


@pytest.mark.parametrize("overrides, message", [
    ({"checkpoint_every": -1}, r"checkpoint_every must be an integer >= 0 \(0 disables\), got -1"),
    ({"checkpoint_every": 2.5}, "checkpoint_every must be an integer"),
    ({"nonfinite_grads": "ignore"}, r"nonfinite_grads must be one of \['skip', 'error'\], got 'ignore'"),
])
def test_bad_options_are_refused(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides).validate()


def test_negative_checkpoint_every_is_refused_naming_the_option(capsys):
    assert main(["compress", "--task", "sst2", "--keep", "0.5", "--output", "x", "--checkpoint-every", "-3"]) == 2
    assert "checkpoint_every must be an integer >= 0 (0 disables), got -3" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ tokenizer fit
@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def _save_tiny_bert(folder, tokenizer, **config):
    from transformers import BertConfig, BertModel

    settings = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=512)
    settings.update(config)
    BertModel(BertConfig(**settings)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mismatch was reported")

    monkeypatch.setattr(pipeline, "load_task_model", refuse)


@pytest.mark.parametrize("model_config, max_seq_len, message", [
    ({"vocab_size": 1000}, 32,
     r"tokenizer of '.*' has 30522 tokens \(ids up to 30521\) but the model's vocab_size is 1000"),
    ({"max_position_embeddings": 64}, 128,
     r"max_seq_len 128 exceeds what '.*' supports \(model max_position_embeddings 64, tokenizer model_max_length "
     r"512\)"),
    ({}, 600, r"max_seq_len 600 exceeds .*max_position_embeddings 512, tokenizer model_max_length 512"),
])
def test_tokenizer_that_does_not_fit_the_model_is_refused_before_training(model_config, max_seq_len, message,
                                                                          tmp_path, data_dir, minilm_tokenizer,
                                                                          no_model_loading, capsys):
    model = _save_tiny_bert(tmp_path / "model", minilm_tokenizer, **model_config)
    argv = ["compress", "--model", str(model), "--task", "sst2", "--keep", "0.5", "--output", str(tmp_path / "out"),
            "--data-dir", str(data_dir / "glue"), "--max-train-samples", "8", "--max-eval-samples", "8",
            "--max-seq-len", str(max_seq_len)]
    capsys.readouterr()  # drop the saving progress bar
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrsparse compress: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_fitting_tokenizer_is_accepted(minilm_tokenizer):
    from transformers import BertConfig

    config = BertConfig(vocab_size=len(minilm_tokenizer), max_position_embeddings=512)
    modeling.check_tokenizer_fits(minilm_tokenizer, config, 512, "m")  # exactly at both limits
    with pytest.raises(ValueError, match="max_seq_len 513"):
        modeling.check_tokenizer_fits(minilm_tokenizer, config, 513, "m")

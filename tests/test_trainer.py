"""lrsparse.hf.CompressorCallback inside a real transformers.Trainer: the pruning phase on real MiniLM and SST-2
reaches the cubic schedule's density at every step and gives the same masks and weights as the plain loop with
FirstOrderPruner; the mixed-rank phase (a new Trainer after compressor.factorize()) ends low-rank within budget;
every misuse fails loudly."""
from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import lrsparse
from lrsparse.data import PaddingCollator, TokenizedDataset, load_glue
from lrsparse.hf import CompressorCallback, low_rank_parameter_budget
from lrsparse.layers import LowRankLinear, MixedRankLinear, finalize_low_rank
from lrsparse.pruning import FirstOrderPruner
from pipeline_helpers import VOCAB, tiny_bert

STEPS, BATCH, FINAL, WARM_I, WARM_F, DELTA = 12, 8, 0.3, 2, 4, 2
# The warm-ups as fractions of STEPS (WARM_I and WARM_F steps); "uniform" ranks fit keep exactly ("budget" may give a
# heavily pruned tiny matrix its minimum rank 1).
CONFIG = lrsparse.PRESETS["lpaf"].replace(keep=FINAL, delta_t=DELTA, initial_warmup_fraction=WARM_I / STEPS,
                                          final_warmup_fraction=WARM_F / STEPS, rank_allocation="uniform",
                                          factorization_iters=5)
LR = 5e-4
LAYERS = 2

pytestmark = pytest.mark.usefixtures("single_thread")


def training_args(tmp_path, steps=STEPS, **overrides) -> TrainingArguments:
    # Constant LR, no weight decay, sequential batches, no dropout in the models: the plain loop below can repeat
    # exactly what Trainer does (AdamW, clip_grad_norm_ 1.0) without re-implementing its scheduler or sampler.
    settings = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                    optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
                    max_grad_norm=1.0, train_sampling_strategy="sequential", report_to="none", save_strategy="no",
                    logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


@pytest.fixture(scope="module")
def sst2(minilm_path, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    examples = load_glue("sst2", "train", data_dir / "glue", max_samples=STEPS * BATCH, seed=0)
    return TokenizedDataset(examples, tokenizer, max_seq_len=32), PaddingCollator(tokenizer.pad_token_id)


def minilm(minilm_path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_hidden_layers=LAYERS)  # the first LAYERS of the 6 real layers keep the test fast


def closed_form_live(step: int, total: int) -> int:
    """Kept weights after ``step`` steps: round(total * cubic density) at the last mask step (every DELTA steps
    after the initial warmup, and the step the cubic reaches FINAL), all of them before."""
    end = STEPS - WARM_F
    last = end if step >= end else step - step % DELTA
    if last <= WARM_I:
        return total
    density = FINAL + (1 - FINAL) * (1 - (last - WARM_I) / (end - WARM_I)) ** 3
    return round(density * total)


class LiveCountProbe(TrainerCallback):
    """Counts the nonzero entries of the target weights in the model after every optimizer step."""

    def __init__(self, names):
        self.names, self.counts = names, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        modules = dict(model.named_modules())
        self.counts.append(sum(int(torch.count_nonzero(modules[n].weight)) for n in self.names))


def test_trainer_pruning_matches_schedule_and_plain_loop(minilm_path, sst2, tmp_path):
    dataset, collate = sst2
    model = minilm(minilm_path)
    reference = copy.deepcopy(model)
    names = [f"bert.encoder.layer.{i}.{part}" for i in range(LAYERS)
             for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense", "intermediate.dense", "output.dense")]
    total = LAYERS * (4 * 384 * 384 + 2 * 384 * 1536)

    compressor = lrsparse.prepare(model, CONFIG)  # total_steps: the Trainer's max_steps, at on_train_begin
    probe = LiveCountProbe(names)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset, data_collator=collate,
                      callbacks=[CompressorCallback(compressor), probe])
    trainer.train()

    assert compressor.total_steps == STEPS and compressor.phase == "prune"
    assert sorted(compressor.targets) == sorted(names)
    assert probe.counts == [closed_form_live(step, total) for step in range(1, STEPS + 1)]
    assert probe.counts[-1] == round(FINAL * total)
    assert compressor.pruner.mask_updates == 3  # steps 4, 6 and 8 (= STEPS - WARM_F)
    assert compressor.density() == round(FINAL * total) / total

    # Independent reference: the documented plain loop, same batches, same optimizer, same clipping, with the
    # warm-ups given as step counts.
    pruner = FirstOrderPruner(reference, FINAL, STEPS, initial_warmup_fraction=WARM_I, final_warmup_fraction=WARM_F,
                              delta_t=DELTA)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False, collate_fn=collate)
    reference.train()
    for batch in loader:
        reference(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        pruner.step()
        optimizer.zero_grad()
    assert pruner.step_count == STEPS
    for name in names:
        assert torch.equal(compressor.pruner.masks[name], pruner.masks[name]), name
        torch.testing.assert_close(model.get_submodule(name).weight, reference.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- tiny model
class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count=64, length=8, seed=1):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, length), generator=gen)
        self.labels = torch.randint(0, 2, (count,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


CALIBRATION = [{"input_ids": torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(5))}]


def tiny_trainer(model, tmp_path, callbacks, steps=STEPS, **overrides):
    return Trainer(model=model, args=training_args(tmp_path, steps, per_device_train_batch_size=4, **overrides),
                   train_dataset=TokenDataset(), callbacks=callbacks)


def test_two_phases_end_low_rank_within_budget(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard not installed (optional dependency)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_bert()
    compressor = lrsparse.prepare(model, CONFIG)
    # One callback drives both phases, each in its own Trainer.train().
    callback = CompressorCallback(compressor, tensorboard_dir=str(tmp_path / "tb"), check_budget=True)
    pruning = tiny_trainer(model, tmp_path, [callback])
    pruning.train()
    shapes = {name: tuple(m.weight.shape) for name, m in compressor.targets.items()}
    # The default factorizer fits each layer's outputs on the inputs the compressor gathered in the last pruning steps
    # (no calibration= needed: the Trainer's forwards went through its hooks).
    # The masks are final after STEPS - WARM_F steps: the last WARM_F steps of 4 examples each are gathered.
    assert compressor.calibration.window_start == STEPS - WARM_F and compressor.calibration.seen == WARM_F * 4
    records = compressor.factorize()  # phase 2's length: max_steps
    assert compressor.phase == "mixed_rank" and [r.kind for r in records] == ["mixed"] * len(shapes)

    trainer = tiny_trainer(model, tmp_path, [callback], steps=8)  # a new Trainer: a new optimizer over U, V
    trainer.train()
    callback.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    alpha = events.Scalars("mixed_rank/alpha")
    assert [(e.step, e.value) for e in alpha] == [(t, min(1.0, t / 4)) for t in range(1, 9)]  # t / (0.5 * 8)
    assert [e.step for e in events.Scalars("pruning/density")] == list(range(1, STEPS + 1))
    assert compressor.phase == "done" and callback.phases_run == ["prune", "mixed_rank"]
    # Alpha reached 1 at step 4 (the sparse path left then); the callback stepped the compressor all 8 steps.
    assert compressor.scheduler.finalized and compressor.scheduler.step_count == 4 and callback.steps == 8
    assert not any(isinstance(m, MixedRankLinear) for m in model.modules())
    low_rank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert sorted(low_rank) == sorted(shapes)
    assert {r.name: (r.kind, r.rank) for r in compressor.records} == {n: ("low-rank", m.rank)
                                                                      for n, m in low_rank.items()}
    used = sum(m.rank * (m.in_features + m.out_features) for m in low_rank.values())
    assert used <= math.floor(FINAL * sum(a * b for a, b in shapes.values()))
    assert low_rank_parameter_budget(shapes.values(), FINAL) == math.floor(FINAL * sum(a * b for a, b in
                                                                                       shapes.values()))
    # The dropped sparse weights left the optimizer too; every factor is still trained by it.
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(m.U) in held and id(m.V) in held for m in low_rank.values())
    assert len(held) == sum(1 for p in model.parameters())


# --------------------------------------------------------------------------------------------------- loud failures
def pruning_callback(model, config=CONFIG, **options):
    return CompressorCallback(lrsparse.prepare(model, config), **options)


def test_frozen_targets_are_refused(tmp_path):
    model = tiny_bert()
    for module in model.bert.encoder.layer[0].attention.self.query.parameters():
        module.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        tiny_trainer(model, tmp_path, [pruning_callback(model)]).train()


class ZeroLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch) * 0.0


def test_zero_gradients_fail_at_first_mask_update(tmp_path):
    model = tiny_bert()
    trainer = ZeroLossTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=4),
                              train_dataset=TokenDataset(), callbacks=[pruning_callback(model)])
    with pytest.raises(RuntimeError, match=f"importance is zero in every target at mask step {WARM_I + DELTA}"):
        trainer.train()


def test_hook_that_never_fires_is_detected(tmp_path, monkeypatch):
    from transformers.trainer_callback import CallbackHandler

    # As with a transformers (or a custom loop) that does not call on_optimizer_step.
    monkeypatch.setattr(CallbackHandler, "on_optimizer_step", lambda self, args, state, control: control)
    model = tiny_bert()
    with pytest.raises(RuntimeError, match="0 on_optimizer_step calls for 1 optimizer steps"):
        tiny_trainer(model, tmp_path, [pruning_callback(model)]).train()


def test_skipped_mask_update_is_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(FirstOrderPruner, "update_mask", lambda self, density=None: False)
    model = tiny_bert()
    with pytest.raises(RuntimeError, match=f"scheduled mask update skipped: after step {WARM_I + DELTA}"):
        tiny_trainer(model, tmp_path, [pruning_callback(model)]).train()


def test_masks_not_reapplied_are_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(FirstOrderPruner, "apply_masks", lambda self: None)
    model = tiny_bert()
    with pytest.raises(RuntimeError, match="pruned weights of target .* are nonzero"):
        tiny_trainer(model, tmp_path, [pruning_callback(model)]).train()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_early_stop_before_final_density_fails(tmp_path):
    model = tiny_bert()
    callbacks = [pruning_callback(model), StopAt(5)]
    with pytest.raises(RuntimeError, match="final density not reached: .* after 5 of 12 steps"):
        tiny_trainer(model, tmp_path, callbacks).train()


def test_mixed_rank_phase_refusals(tmp_path):
    model = tiny_bert()
    compressor = lrsparse.prepare(model, CONFIG)
    callback = CompressorCallback(compressor)
    trainer = tiny_trainer(model, tmp_path, [callback])
    trainer.train()
    # Phase 2 without compressor.factorize(): the same callback, or a new one on the same compressor.
    with pytest.raises(RuntimeError, match="already ran the 'prune' phase: call compressor.factorize()"):
        tiny_trainer(model, tmp_path, [callback]).train()
    with pytest.raises(RuntimeError, match="pruning phase already ran 12 steps: call compressor.factorize()"):
        tiny_trainer(model, tmp_path, [CompressorCallback(compressor)]).train()

    compressor.factorize(calibration=CALIBRATION)
    # Reusing the first Trainer: its optimizer was built for the unfactorized model.
    with pytest.raises(RuntimeError, match="does not hold the factors U, V"):
        trainer.train()
    # A refused start is not a run: the same callback then runs phase 2 in a new Trainer (stopped early here).
    with pytest.raises(RuntimeError, match="mixed-rank phase ended at alpha 0.5000 after 2 of 8 steps"):
        tiny_trainer(model, tmp_path, [callback, StopAt(2)], steps=8).train()
    with pytest.raises(RuntimeError, match="already ran the 'mixed_rank' phase: one Trainer.train"):
        tiny_trainer(model, tmp_path, [callback], steps=8).train()
    compressor.convert()
    with pytest.raises(RuntimeError, match="the compressor is done"):
        tiny_trainer(model, tmp_path, [CompressorCallback(compressor)], steps=8).train()

    # Converted by hand outside the compressor.
    model = tiny_bert()
    compressor = lrsparse.prepare(model, CONFIG)
    tiny_trainer(model, tmp_path, [CompressorCallback(compressor)]).train()
    compressor.factorize(calibration=CALIBRATION)
    finalize_low_rank(model)
    with pytest.raises(ValueError, match="no MixedRankLinear"):
        tiny_trainer(model, tmp_path, [CompressorCallback(compressor)], steps=4).train()

    # A rank floor over the keep budget (32 x 32 and 32 x 64 matrices at rank >= 8 hold more than 0.3 of them).
    model = tiny_bert()
    compressor = lrsparse.prepare(model, CONFIG.replace(min_rank=8))
    tiny_trainer(model, tmp_path, [CompressorCallback(compressor)]).train()
    compressor.factorize(calibration=CALIBRATION)
    with pytest.raises(ValueError, match="rank budget exceeded"):
        tiny_trainer(model, tmp_path, [CompressorCallback(compressor, check_budget=True)], steps=4).train()


def test_callback_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="compressor must be a lrsparse Compressor"):
        CompressorCallback(CONFIG)
    with pytest.raises(ValueError, match="keep"):
        CONFIG.replace(keep=1.5)
    with pytest.raises(ValueError, match="blend_fraction"):
        CONFIG.replace(blend_fraction=2.0)
    # A compressor prepared for another length than the Trainer's max_steps.
    model = tiny_bert()
    with pytest.raises(ValueError, match=f"prepared for total_steps=10, got {STEPS}"):
        tiny_trainer(model, tmp_path, [CompressorCallback(lrsparse.prepare(model, CONFIG, total_steps=10))]).train()
    # A Trainer over another model than the compressor's.
    with pytest.raises(ValueError, match="not the model the compressor was prepared on"):
        tiny_trainer(tiny_bert(), tmp_path, [CompressorCallback(lrsparse.prepare(model, CONFIG))]).train()


# --------------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard not installed (optional dependency)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_bert()
    compressor = lrsparse.prepare(model, CONFIG)
    callback = CompressorCallback(compressor, tensorboard_dir=str(tmp_path / "tb"))
    trainer = tiny_trainer(model, tmp_path, [callback], logging_strategy="steps", logging_steps=4)
    trainer.train()
    metrics = trainer.evaluate(TokenDataset(count=16, seed=5))  # after train(): still logged
    callback.close()
    pruner = compressor.pruner
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    density = [(e.step, e.value) for e in events.Scalars("pruning/density")]
    assert [step for step, _ in density] == list(range(1, STEPS + 1))
    assert density[-1][1] == pytest.approx(pruner.density(), abs=1e-7)
    assert density[-1][1] == pytest.approx(round(FINAL * pruner.total_params) / pruner.total_params, abs=1e-7)
    scheduled = [(e.step, e.value) for e in events.Scalars("pruning/scheduled_density")]
    assert [step for step, _ in scheduled] == list(range(1, STEPS + 1))
    assert scheduled[-1][1] == pytest.approx(FINAL, abs=1e-6)
    assert [e.step for e in events.Scalars("pruning/train/loss")] == [4, 8, 12]
    assert [(e.step, e.value) for e in events.Scalars("pruning/eval/loss")] == [
        (STEPS, pytest.approx(metrics["eval_loss"], rel=1e-6))]


def test_tensorboard_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="TensorBoard logging to .* was requested but TensorBoard is not installed.*pip install tensorboard"):
        CompressorCallback(lrsparse.prepare(tiny_bert(), CONFIG), tensorboard_dir=str(tmp_path))


def test_pipeline_cli_tensorboard_scalars(tmp_path, data_dir, minilm_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lrsparse.cli import main

    output, board = tmp_path / "run", tmp_path / "tb"
    argv = ["compress", "--model", str(minilm_path), "--task", "sst2", "--keep", "0.5", "--output", str(output),
            "--data-dir", str(data_dir / "glue"), "--max-train-samples", "16", "--max-eval-samples", "16",
            "--max-seq-len", "16", "--batch-size", "8", "--epochs", "1", "--delta-t", "1",
            "--dense-finetune", "skip", "--allow-random-head", "--blend-fraction", "1.0",
            "--factorization-iters", "2", "--threads", "1", "--no-inspect", "--tensorboard", str(board)]
    assert main(argv) == 0
    report = json.loads((output / "report.json").read_text())
    events = EventAccumulator(str(board)).Reload()
    density = events.Scalars("prune/density")
    assert [e.step for e in density] == [1, 2]
    assert density[-1].value == pytest.approx(0.5, abs=1e-6)
    assert [e.value for e in events.Scalars("mixed_rank/alpha")] == [0.5, 1.0]  # t / (blend_fraction * steps)
    for stage in ("prune", "mixed_rank"):
        assert [e.step for e in events.Scalars(f"{stage}/loss")] == [1, 2]
    main_metric = events.Scalars("eval/main")
    assert [e.step for e in main_metric] == [0, 1, 2, 3]
    assert [e.value for e in main_metric] == pytest.approx([s["metrics"]["main"] for s in report["stages"]],
                                                           abs=1e-6)


def test_pipeline_tensorboard_missing_is_a_clear_error(monkeypatch, tmp_path):
    from lrsparse.recipe import RecipeConfig

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="TensorBoard logging to .* was requested but TensorBoard is not installed"):
        RecipeConfig.create(task="sst2", keep=0.5, output_dir=str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))


def test_example_script_compresses_and_saves_a_loadable_model(tmp_path, data_dir):
    """examples/trainer_compress.py, run as a user would (its own argument parser), on the real MiniLM: both Trainer
    phases, and a saved model whose manifest holds the method flags given."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trainer_compress.py"
    spec = importlib.util.spec_from_file_location("trainer_compress", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    output = tmp_path / "out"
    example.main(["--task", "sst2", "--keep", "0.3", "--data-dir", str(data_dir / "glue"), "--max-train-samples",
                  "32", "--max-eval-samples", "16", "--max-seq-len", "32", "--max-steps", "3",
                  "--factorization-iters", "2", "--delta-t", "1", "--output", str(output), "--cpu"])
    manifest = lrsparse.read_manifest(output / "model")
    assert manifest["config"] == lrsparse.PRESETS["lpaf"].replace(keep=0.3, factorization_iters=2, delta_t=1)
    model = lrsparse.load_compressed(output / "model")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == len(manifest["records"]) == 36
    assert [m.rank for m in layers] == [r.rank for r in manifest["records"]]


def test_both_phases_train_under_trainer_bf16(tmp_path):
    """TrainingArguments(bf16=True): Trainer's autocast reaches the mixed-rank layers (their forward runs in bf16
    through the op's autocast rule) while the weights, their gradients and the pruner's state stay fp32."""
    model = tiny_bert()
    compressor = lrsparse.prepare(model, CONFIG)
    callback = CompressorCallback(compressor)
    tiny_trainer(model, tmp_path, [callback], bf16=True).train()
    assert compressor.density() == pytest.approx(FINAL, abs=1e-3)
    compressor.factorize(calibration=CALIBRATION)
    output_dtypes = []
    for module in model.modules():
        if isinstance(module, MixedRankLinear):
            module.register_forward_hook(lambda m, args, out: output_dtypes.append(out.dtype))
    tiny_trainer(model, tmp_path, [callback], steps=8, bf16=True).train()
    assert compressor.phase == "done" and output_dtypes and set(output_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(isinstance(m, LowRankLinear) for m in model.modules())

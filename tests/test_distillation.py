"""Distillation: the loss terms against hand computations in float64, the Distiller's combination on a real model
forward, a frozen teacher, the pipeline's stages distilling from a teacher that survives --resume bitwise, and the
Trainer integration."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lrsparse
from lrsparse import pipeline
from lrsparse.distillation import Distiller, hidden_state_loss, soft_target_loss
from lrsparse.recipe import RecipeConfig
from pipeline_helpers import VOCAB, save_tiny_bert_checkpoint, tiny_bert

pytestmark = pytest.mark.usefixtures("single_thread")


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_soft_target_loss_is_the_tempered_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=gen) * 3, torch.randn(2, 3, 5, generator=gen) * 3
    for temperature in (1.0, 2.0, 4.5):
        rows = []
        for s, t in zip(student.reshape(-1, 5).double().numpy(), teacher.reshape(-1, 5).double().numpy()):
            p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
            rows.append(sum(pt * (math.log(pt) - math.log(ps)) for ps, pt in zip(p_s, p_t)))
        expected = temperature**2 * sum(rows) / len(rows)
        assert float(soft_target_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-5)
    assert float(soft_target_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_state_loss_is_the_masked_relative_squared_error():
    gen = torch.Generator().manual_seed(1)
    student = [torch.randn(2, 4, 3, generator=gen) for _ in range(3)]
    teacher = [torch.randn(2, 4, 3, generator=gen) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    per_layer = []
    for s, t in zip(student, teacher):
        s, t = s.double().numpy(), t.double().numpy()
        num = den = 0.0
        for b in range(2):
            for i in range(4):
                if mask[b, i]:
                    num += ((s[b, i] - t[b, i]) ** 2).sum()
                    den += (t[b, i] ** 2).sum()
        per_layer.append(num / den)
    assert float(hidden_state_loss(student, teacher, mask)) == pytest.approx(np.mean(per_layer), rel=1e-5)
    # Padding positions do not count, whatever they hold.
    changed = [s.clone() for s in student]
    changed[0][1, 3] += 100.0
    assert float(hidden_state_loss(changed, teacher, mask)) == pytest.approx(np.mean(per_layer), rel=1e-5)
    with pytest.raises(ValueError, match="student has 2 hidden states, teacher 3"):
        hidden_state_loss(student[:2], teacher, mask)


def _batch(seed=2, batch=4, length=7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=gen)}


def test_distiller_combines_the_terms_and_leaves_the_teacher_frozen():
    student, teacher = tiny_bert(seed=0), tiny_bert(seed=1)
    batch = _batch()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(teacher, weight=0.3, temperature=2.0, hidden_weight=0.7)
    loss = distiller(student, batch)
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True)
        t = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    expected = (0.7 * s.loss + 0.3 * soft_target_loss(s.logits, t.logits, 2.0)
                + 0.7 * hidden_state_loss(s.hidden_states, t.hidden_states, batch["attention_mask"]))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert set(distiller.last_parts) == {"task", "output", "hidden"} and distiller.teacher_seconds > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_weight_zero_is_the_task_loss_without_running_the_teacher():
    student = tiny_bert(seed=0)
    batch = _batch()
    distiller = Distiller(tiny_bert(seed=1), weight=0.0)
    assert torch.equal(distiller(student, batch), student(**batch).loss)
    assert distiller.teacher_seconds == 0.0


def test_regression_matches_scores_by_squared_error():
    student, teacher = tiny_bert(seed=0, num_labels=1), tiny_bert(seed=1, num_labels=1)
    batch = dict(_batch(), labels=torch.tensor([0.5, 1.0, 2.0, 4.5]))
    loss = Distiller(teacher, weight=1.0, output_loss="mse")(student, batch)
    with torch.no_grad():
        expected = ((student(**batch).logits - teacher(input_ids=batch["input_ids"],
                                                       attention_mask=batch["attention_mask"]).logits) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [({"weight": 1.5}, r"weight must be in \[0, 1\], got 1.5"),
                                             ({"temperature": 0}, "temperature must be > 0, got 0"),
                                             ({"hidden_weight": -1}, "hidden_weight must be >= 0, got -1")])
def test_bad_distiller_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distiller(tiny_bert(), **kwargs)


@pytest.mark.parametrize("overrides, message", [
    ({"distill_weight": -0.1}, r"distill_weight must be in \[0, 1\], got -0.1"),
    ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
    ({"distill_teacher": "teacher"}, r"distill_teacher must be one of \['dense', 'pruned'\]"),
])
def test_bad_recipe_options_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        RecipeConfig.create(task="sst2", keep=0.5, output_dir=str(tmp_path), **overrides)


class _Interrupt(Exception):
    pass


def _recipe(tmp_path, checkpoint, data_dir, name, **overrides):
    settings = dict(task="sst2", keep=0.5, output_dir=str(tmp_path / name), model=str(checkpoint),
                    data_dir=str(data_dir / "glue"), max_train_samples=96, max_eval_samples=64, epochs=1,
                    batch_size=16, lr=1e-3, max_seq_len=32, device="cpu", checkpoint_every=2, distill_weight=0.5,
                    distill_hidden_weight=1.0, distill_teacher="pruned")
    settings.update(overrides)
    return RecipeConfig.create(**settings)


def test_pipeline_distills_and_resumes_with_the_same_teacher(tmp_path, minilm_path, data_dir):
    checkpoint = save_tiny_bert_checkpoint(tmp_path / "tiny", minilm_path, layers=2)
    whole = pipeline.run_compression(_recipe(tmp_path, checkpoint, data_dir, "whole"))
    stages = {s["name"]: s for s in whole["stages"]}
    teacher_bytes = sum(t.numel() * t.element_size() for t in lrsparse.load_compressed(
        tmp_path / "whole" / "model").state_dict().values())
    for name, teacher in (("prune", "dense"), ("mixed_rank", "pruned")):
        assert stages[name]["teacher"] == teacher and stages[name]["teacher_seconds"] > 0
        assert stages[name]["teacher_bytes"] > teacher_bytes  # the teacher is the uncompressed model
    assert not list((tmp_path / "whole" / "checkpoint").glob("teacher_*"))  # removed with the run's states

    # Interrupted inside each distilling stage, then resumed: the teacher comes back from the checkpoint folder.
    for stop in ("prune", "mixed_rank"):
        config = _recipe(tmp_path, checkpoint, data_dir, f"resumed-{stop}")

        def interrupt(run, record, stop=stop):
            if record.get("step") == 2 and record["name"] == stop:
                raise _Interrupt

        pipeline.CHECKPOINT_OBSERVERS.append(interrupt)
        try:
            with pytest.raises(_Interrupt):
                pipeline.run_compression(config)
        finally:
            pipeline.CHECKPOINT_OBSERVERS.remove(interrupt)
        assert (tmp_path / f"resumed-{stop}" / "checkpoint" / f"teacher_{'dense' if stop == 'prune' else 'pruned'}"
                ".safetensors").is_file()
        resumed = pipeline.run_compression(_recipe(tmp_path, checkpoint, data_dir, f"resumed-{stop}", resume=True))
        assert resumed["final_metrics"] == whole["final_metrics"]
        expected = lrsparse.load_compressed(tmp_path / "whole" / "model").state_dict()
        actual = lrsparse.load_compressed(tmp_path / f"resumed-{stop}" / "model").state_dict()
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_trainer_trains_on_the_distillation_objective(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lrsparse.hf import DistillationTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0)
    dataset = [{k: v[i] for k, v in _batch(seed=5, batch=12).items()} for i in range(12)]
    models = {}
    for weight in (0.0, 1.0):
        model, teacher = tiny_bert(seed=0), tiny_bert(seed=1)
        distiller = Distiller(teacher, weight=weight, temperature=1.0)
        DistillationTrainer(model=model, args=args, train_dataset=dataset, distiller=distiller).train()
        models[weight] = model
    plain = tiny_bert(seed=0)
    Trainer(model=plain, args=args, train_dataset=dataset).train()
    # weight 0 is plain fine-tuning; weight 1 trains on the teacher alone, a different model.
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(models[0.0].parameters(), plain.parameters()))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(models[1.0].parameters(), plain.parameters()))
    with pytest.raises(TypeError, match="distiller must be an lrsparse.Distiller"):
        DistillationTrainer(model=plain, args=args, train_dataset=dataset, distiller=object())

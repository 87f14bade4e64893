"""Small models and training loops shared by the pipeline-core tests."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 100

# These tests run tiny matrices on a shared 2-core machine: intra-op threads only add spin-wait (measured 100x slower
# per tiny linear under load with 2 threads than with 1).
torch.set_num_threads(1)


def tiny_bert_config(**overrides) -> BertConfig:
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=2)
    settings.update(overrides)
    return BertConfig(**settings)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides))


def random_batches(count: int, seed: int = 1, batch: int = 4, length: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=gen),
         "labels": torch.randint(0, 2, (batch,), generator=gen)}
        for _ in range(count)
    ]


def train(model, optimizer, batches, after_step=None) -> None:
    """loss.backward(); optimizer.step(); after_step(); optimizer.zero_grad() for each batch."""
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad()


def save_tiny_bert_checkpoint(folder, minilm_path, seed: int = 0, layers: int = 1):
    """A random BertModel (no task head) of hidden size 32 saved with the real all-MiniLM-L6-v2 tokenizer: a
    checkpoint the CLI can compress in seconds. Returns ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The head of a script run in a fresh interpreter where lrsparse cannot be imported (exports must load without it).
BLOCK_LRSPARSE = """
import importlib.abc, sys

class BlockLrsparse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "lrsparse":
            raise ImportError(f"{name} is blocked in this process")

sys.meta_path.insert(0, BlockLrsparse())
"""


def write_csv(path, header, rows):
    """A UTF-8 CSV file with a header row (the csv module's quoting); returns ``path``."""
    import csv

    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path

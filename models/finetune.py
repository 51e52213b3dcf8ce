"""Builder side: fine-tune the packaged MiniLM on the training set's labels before it embeds
anything (``fine_tune_epochs``, ``xmc build --fine-tune EPOCHS``).

The packaged MiniLM places texts by what they are about on the web at large; a corpus' labels
draw finer lines (cooking's ``baking`` and ``bread``). Fine-tuning teaches the encoder those
lines, which above all helps the kNN matcher: its neighbours are then documents with the same
labels, not only the same topic.

The objective is a normalized softmax classifier trained with the encoder: every label is a
unit vector, a document's logits are ``SCALE`` times its cosine to each, and its target is
spread evenly over its labels (cross-entropy). The label vectors start at the centroids of
their documents' embeddings under the packaged model, so the first steps refine the encoder
instead of chasing random targets. AdamW, with the learning rate warming up over the first
tenth of the steps and falling linearly to 0 at the end. Only the encoder is kept: the label
vectors are a training device, the trees and the kNN matcher classify. It is exported through
:func:`models.export.export_minilm`, with the same parity checks as the packaged model.

Needs the ``[export]`` extra; torch is imported inside the functions, as in models.export.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import InvalidInputError
from models.export import export_minilm, minilm_dir, padded_batch, pooled_module

log = logging.getLogger(__name__)

#: logits are SCALE * cosine: with unit vectors a softmax needs this range to be sharp
SCALE = 20.0
#: tokens a training text is cut to: a title fits whole, an article keeps its opening, and a
#: step's cost grows with the longest text of the batch (served texts keep the model's 256)
TRAIN_MAX_LENGTH = 64
BATCH_SIZE = 32
#: the encoder's learning rate; the label vectors, new and small, move at LABEL_LR
ENCODER_LR = 5e-5
LABEL_LR = 1e-2
WARMUP_SHARE = 0.1


def fine_tune_minilm(texts: Sequence[str], labels: Sequence[Sequence[str]], out_dir: Path, *,
                     epochs: float, seed: int = 0, threads: int = 2, int8: bool = False,
                     ) -> dict[str, Any]:
    """Fine-tune the packaged MiniLM on ``texts`` and their ``labels`` for ``epochs`` passes
    and export it as :func:`models.export.export_minilm` exports the packaged one (same
    return value), plus ``"fine_tune"``: the steps, seconds and the mean loss of the first
    and last tenth of the steps. Documents without a label are left out."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    if epochs <= 0:
        raise InvalidInputError("fine-tuning needs epochs > 0")
    rows = [i for i, ls in enumerate(labels) if ls]
    if not rows:
        raise InvalidInputError("fine-tuning needs labelled documents")
    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    names = sorted({lab for i in rows for lab in labels[i]})
    label_index = {name: j for j, name in enumerate(names)}
    doc_labels = [[label_index[lab] for lab in labels[i]] for i in rows]
    token_ids = _token_ids([texts[i] for i in rows], minilm_dir())

    bert = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True)
    encoder = pooled_module(bert)
    losses = _train(encoder, token_ids, doc_labels, len(names), epochs, seed)
    n_steps = len(losses)
    tenth = max(1, n_steps // 10)
    summary = {"epochs": epochs, "n_docs": len(rows), "n_labels": len(names), "steps": n_steps,
               "loss_first": round(float(np.mean(losses[:tenth])), 4),
               "loss_last": round(float(np.mean(losses[-tenth:])), 4),
               "seconds": round(time.perf_counter() - started, 2)}
    log.info("fine-tuned MiniLM on %d documents, %d labels: %d steps, loss %.3f -> %.3f, "
             "%.0f s", len(rows), len(names), n_steps, summary["loss_first"],
             summary["loss_last"], summary["seconds"])
    return {**export_minilm(out_dir, int8=int8, bert=bert), "fine_tune": summary}


def _train(encoder: Any, token_ids: Sequence[list[int]], doc_labels: Sequence[list[int]],
           n_labels: int, epochs: float, seed: int) -> list[float]:
    """Train ``encoder`` in place with the label vectors (see the module's docstring);
    returns the loss of every step."""
    import torch

    label_vectors = torch.nn.Parameter(
        _label_centroids(encoder, token_ids, doc_labels, n_labels))
    encoder.train()
    optimizer = torch.optim.AdamW([{"params": encoder.parameters(), "lr": ENCODER_LR},
                                   {"params": [label_vectors], "lr": LABEL_LR}],
                                  weight_decay=0.01)
    n_docs = len(token_ids)
    n_steps = max(1, round(epochs * -(-n_docs // BATCH_SIZE)))
    warmup = max(1.0, WARMUP_SHARE * n_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (n_steps - s) / n_steps)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    order = np.empty(0, dtype=np.int64)
    for step in range(n_steps):
        if len(order) == 0:  # a new pass, in a new order
            order = rng.permutation(n_docs)
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        emb = encoder(*padded_batch([token_ids[i] for i in batch]))
        logits = SCALE * emb @ torch.nn.functional.normalize(label_vectors, dim=1).T
        loss = -(_targets([doc_labels[i] for i in batch], n_labels)
                 * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log.info("fine-tune step %d/%d: loss %.3f", step + 1, n_steps, losses[-1])
    encoder.eval()
    return losses


def _token_ids(texts: Sequence[str], model_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=TRAIN_MAX_LENGTH)
    tokenizer.no_padding()
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def _targets(doc_labels: Sequence[list[int]], n_labels: int) -> Any:
    import torch

    target = torch.zeros((len(doc_labels), n_labels))
    for r, labs in enumerate(doc_labels):
        target[r, labs] = 1.0 / len(labs)
    return target


def _label_centroids(encoder: Any, token_ids: Sequence[list[int]],
                     doc_labels: Sequence[list[int]], n_labels: int) -> Any:
    """(n_labels, dim) unit vectors: the mean embedding of each label's documents under the
    encoder as it is."""
    import torch

    encoder.eval()
    with torch.no_grad():
        emb = torch.cat([encoder(*padded_batch(token_ids[s:s + 256]))
                         for s in range(0, len(token_ids), 256)])
    sums = torch.zeros((n_labels, emb.shape[1]))
    for r, labs in enumerate(doc_labels):
        sums[labs] += emb[r]
    return torch.nn.functional.normalize(sums, dim=1).clone()

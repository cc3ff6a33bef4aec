"""Packed language-modelling batches: documents tokenized, joined with the model's end-of-text token (EOS as
pretraining has it: text_end_token_id), cut into fixed-size blocks.

Used by pretraining and by PPO-ptx (the pretraining-loss mix). The batch for a given step is a pure
function of (seed, step, rank), so a resumed run sees exactly the batches an uninterrupted run would.
A streamed corpus (hub datasets with `streaming: true`) is packed on the fly: its first documents give the
validation blocks, the rest is split between the ranks by document (each reads the stream, but tokenizes only its
own documents), and resume re-reads the stream up to where this rank stopped.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import torch
from datasets import IterableDataset

from data.loading import DataError
from pipeline.tokenizer import text_end_token_id


class PackedCorpus:
    def __init__(self, texts: Any, tokenizer: Any, block_size: int, val_fraction: float = 0.02,
                 val_blocks: int = 64, seed: int = 0, source: str = "the corpus"):
        self.tokenizer, self.block_size, self.seed, self.source = tokenizer, block_size, seed, source
        self.streaming = isinstance(texts, IterableDataset)
        self.texts = texts
        if self.streaming:
            # the head of the stream is held out for validation, whole documents of it: training starts after the
            # last document the validation blocks drew on (the rest of that one is not used)
            self.val_docs_used = 0

            def counted(rows: Iterator[dict]) -> Iterator[dict]:
                for row in rows:
                    self.val_docs_used += 1
                    yield row

            head = list(itertools.islice(self._stream_blocks(counted(texts)), val_blocks))
            self.val = torch.stack(head) if head else torch.empty(0, block_size, dtype=torch.long)
            self.val_docs: list[str] = []
            self.val_dropped = 0
            self.train_tokens = -1  # unknown for a stream
            self.unigram_entropy = _unigram_entropy(self.val.flatten(), len(tokenizer))
            return
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(len(order) * val_fraction)) if len(order) > 1 else 0
        val_idx, train_idx = order[:n_val], order[n_val:]
        all_texts = texts["text"]
        train_docs = [all_texts[i] for i in train_idx]
        seen = set(train_docs)  # a corpus may repeat a document: a copy in validation would measure memory
        self.val_docs = [all_texts[i] for i in val_idx if all_texts[i] not in seen]
        self.val_dropped = len(val_idx) - len(self.val_docs)
        train_ids = self._pack(train_docs)
        val_ids = self._pack(self.val_docs)
        self.train = self._blocks(train_ids)
        self.val = self._blocks(val_ids)[:val_blocks]
        if len(self.train) == 0:
            raise DataError(source, f"fewer than block_size={block_size} training tokens; add text or lower block_size")
        self.train_tokens = self.train.numel()
        self.unigram_entropy = _unigram_entropy(train_ids, len(tokenizer))

    @staticmethod
    def tokenizer_sample(texts: Any, max_chars: int = 20_000_000) -> Iterator[str]:
        """Documents for training the BPE tokenizer, capped so a huge corpus does not stall it."""
        seen = 0
        for row in texts:
            yield row["text"]
            seen += len(row["text"])
            if seen >= max_chars:
                return

    def _pack(self, docs: list[str]) -> torch.Tensor:
        ids: list[int] = []
        eos = text_end_token_id(self.tokenizer)
        for start in range(0, len(docs), 1000):
            # split_special_tokens: a document quoting "<|end|>" or "</s>" is text, not a document boundary
            for row in self.tokenizer(docs[start:start + 1000], add_special_tokens=False,
                                      split_special_tokens=True)["input_ids"]:
                ids.extend(row)
                ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    def _blocks(self, ids: torch.Tensor) -> torch.Tensor:
        n = len(ids) // self.block_size
        return ids[: n * self.block_size].view(n, self.block_size)

    def _stream_blocks(self, texts: Any) -> Iterator[torch.Tensor]:
        buffer: list[int] = []
        text_end = text_end_token_id(self.tokenizer)
        for row in texts:
            buffer.extend(self.tokenizer(row["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"])
            buffer.append(text_end)
            while len(buffer) >= self.block_size:
                yield torch.tensor(buffer[: self.block_size], dtype=torch.long)
                buffer = buffer[self.block_size:]

    def sample_prompts(self, n: int) -> list[str]:
        """The first few words of validation documents: prompts for eyeballing continuations."""
        docs = self.val_docs or [self.tokenizer.decode(b[:32], skip_special_tokens=True) for b in self.val[:n]]
        return [" ".join(doc.split()[:3]) for doc in docs[:n]]

    def val_batches(self, batch_size: int, accelerator: Any) -> list[torch.Tensor]:
        """This rank's share of the fixed validation blocks."""
        mine = self.val[accelerator.process_index::accelerator.num_processes]
        return [b.to(accelerator.device) for b in mine.split(batch_size)]

    def train_batches(self, batch_size: int, grad_accum: int, start_step: int, accelerator: Any
                      ) -> Iterator[torch.Tensor]:
        """Endless micro-batches for this rank, starting where step `start_step` begins."""
        rank, world = accelerator.process_index, accelerator.num_processes
        first_micro = start_step * grad_accum
        if self.streaming:
            def passes() -> Iterator[torch.Tensor]:  # pass after pass over this rank's share
                while True:
                    empty = True
                    # every world-th document after the validation head: each rank reads the stream but tokenizes
                    # only its own documents (split by document, not by shard, so any number of shards works)
                    mine = itertools.islice(self.texts, self.val_docs_used + rank, None, world)
                    for block in self._stream_blocks(mine):
                        empty = False
                        yield block
                    if empty:
                        raise DataError(self.source, f"rank {rank} of {world} got no block of {self.block_size} "
                                                     "tokens from the stream after the validation head")

            stream = itertools.islice(passes(), first_micro * batch_size, None)
            while True:
                yield torch.stack(list(itertools.islice(stream, batch_size))).to(accelerator.device)
        n_blocks = len(self.train)
        for micro in itertools.count(first_micro):
            start = (micro * world + rank) * batch_size
            index = torch.tensor([self._epoch_order(i // n_blocks)[i % n_blocks]
                                  for i in range(start, start + batch_size)])
            yield self.train[index].to(accelerator.device)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._order_cache = (epoch, torch.randperm(len(self.train), generator=g))
        return self._order_cache[1]


def _unigram_entropy(ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats/token) of the corpus's token frequencies: the loss of a model that ignores context."""
    counts = torch.bincount(ids, minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum()) if len(p) else math.nan

"""The two ways the engine runs a batch through the model.

Both keep the KV cache of the running rows and answer the same five calls, which the
engine makes from its thread:

    begin(row, prompt)                 -> prompt tokens already cached for this row (a reused prefix)
    prefill(row, prompt, start, n)     feed prompt[start:start+n]; float32 logits [vocab] of its last token
    decode(tokens, positions)          one token for rows 0..B-1; float32 logits [B, vocab]
    reorder(order)                     keep rows `order` (old indices), as rows 0..len(order)-1
    reset()                            forget every row

`SlotBackend` (Llama-family models, see fastllama.py) has a preallocated cache, chunked
prefill and a prefix cache. `HFBackend` runs any causal LM through its Hugging Face
forward with a left-padded DynamicCache: whole prompts, no prefix reuse.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .fastllama import FastLlama, FastWeights


class SlotBackend:
    chunked = True

    def __init__(self, weights: FastWeights, rows: int, prefix_cache_tokens: int = 4096,
                 block: int = 8) -> None:
        self.fast = FastLlama(weights, rows)
        self.prefixes = PrefixCache(prefix_cache_tokens, block) if prefix_cache_tokens > 0 else None
        self._pending: dict[int, list[int]] = {}  # row -> its prompt, to store its blocks once fed

    def begin(self, row: int, prompt: list[int]) -> int:
        self.fast.lengths[row] = 0
        self._pending[row] = prompt
        if self.prefixes is None:
            return 0
        found = self.prefixes.lookup(prompt, limit=len(prompt) - 1)  # the last token must be fed
        if found is None:
            return 0
        k, v = found
        self.fast.write_prefix(row, k, v)
        return k.shape[2]

    def prefill(self, row: int, prompt: list[int], start: int, n: int) -> torch.Tensor | None:
        done = start + n == len(prompt)
        logits = self.fast.prefill(row, prompt[start:start + n], start, logits=done)
        if done and self.prefixes is not None:
            self.prefixes.store(prompt, self.fast, row)
        return logits

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        dev = self.fast.device
        return self.fast.decode(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev))

    def reorder(self, order: list[int]) -> None:
        for new, old in enumerate(order):
            if new != old:
                self.fast.move_row(old, new)
        for row in range(len(order), self.fast.rows):
            self.fast.lengths[row] = 0
        if not order:
            self.fast.release_all()

    def reset(self) -> None:
        self.fast.release_all()


class PrefixCache:
    """KV of prompt prefixes, kept in blocks of `block` tokens, least recently used first out.

    A block is keyed by its tokens and its parent block's key, so a lookup walks the prompt
    block by block: the chat template's fixed head and a repeated system prompt are found
    whatever follows them."""

    def __init__(self, max_tokens: int, block: int) -> None:
        self.block = block
        self.max_blocks = max(1, max_tokens // block)
        self._blocks: OrderedDict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._ids = 0
        self.hits = 0       # prompt tokens served from the cache
        self.lookups = 0

    def _walk(self, prompt: list[int], limit: int):
        parent = 0
        for end in range(self.block, limit + 1, self.block):
            key = (parent, tuple(prompt[end - self.block:end]))
            yield end, key
            entry = self._blocks.get(key)
            if entry is None:
                return
            parent = entry[0]

    def lookup(self, prompt: list[int], limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        self.lookups += 1
        ks, vs = [], []
        for _, key in self._walk(prompt, limit):
            entry = self._blocks.get(key)
            if entry is None:
                break
            self._blocks.move_to_end(key)
            ks.append(entry[1])
            vs.append(entry[2])
        if not ks:
            return None
        self.hits += len(ks) * self.block
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def store(self, prompt: list[int], fast: FastLlama, row: int) -> None:
        for end, key in self._walk(prompt, len(prompt)):
            if key in self._blocks:
                continue
            self._ids += 1
            k, v = fast.read(row, end - self.block, end)
            self._blocks[key] = (self._ids, k, v)
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)


class HFBackend:
    """Any causal LM through its own forward: one left-padded DynamicCache for the batch.

    Every row's keys end at the same column, the attention mask hides each row's padding,
    and position ids are per row. A new row is prefilled alone and merged in."""

    chunked = False

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def begin(self, row: int, prompt: list[int]) -> int:
        return 0

    def prefill(self, row: int, prompt: list[int], start: int, n: int) -> torch.Tensor:
        assert start == 0 and n == len(prompt), "whole prompts only"
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt], device=self.device)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        self._merge(cache, len(prompt))
        return out.logits[0, -1].float()

    def _merge(self, cache: DynamicCache, length: int) -> None:
        """Append a prefilled row to the batch, left-padding to a common length."""
        parts: list[tuple[DynamicCache, torch.Tensor]] = []
        if self.cache is not None:
            parts.append((self.cache, self.mask))
        parts.append((cache, torch.ones(1, length, dtype=torch.long, device=self.device)))
        width = max(mask.shape[1] for _, mask in parts)
        merged = DynamicCache(config=self.model.config)
        for li, layer in enumerate(merged.layers):
            keys = [F.pad(c.layers[li].keys, (0, 0, width - m.shape[1], 0)) for c, m in parts]
            values = [F.pad(c.layers[li].values, (0, 0, width - m.shape[1], 0)) for c, m in parts]
            layer.lazy_initialization(keys[0], values[0])
            layer.keys, layer.values = torch.cat(keys), torch.cat(values)
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m in parts])
        self.cache = merged

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        dev = self.device
        batch = len(tokens)
        self.mask = torch.cat([self.mask, torch.ones(batch, 1, dtype=self.mask.dtype, device=dev)], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens, device=dev)[:, None],
            attention_mask=self.mask,
            position_ids=torch.tensor(positions, device=dev)[:, None],
            cache=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()

    def reorder(self, order: list[int]) -> None:
        if self.cache is None or (order == list(range(self.mask.shape[0]))):
            return
        if not order:
            self.reset()
            return
        index = torch.tensor(order, device=self.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding for every remaining row are dead weight: cut them.
        lead = int((mask.cumsum(dim=1) == 0).sum(dim=1).min().item())
        self.mask = mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, lead:]
            layer.values = layer.values.index_select(0, index)[:, :, lead:]

    def reset(self) -> None:
        self.cache = self.mask = None

"""README's sizing rule (Deployment) is what the engine allocates: the KV cache holds, for each of
max_batch_size + 1 slots (the last one takes the padding rows of a compiled step), max_total_tokens plus
the tree's nodes of K and V, each of them layers x KV heads x head dim elements of the weights' dtype."""

from __future__ import annotations

import pytest
import torch

from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import get_tree
from tests.server.support import tiny_loaded


def readme_kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return 2 * layers * kv_heads * head_dim * dtype_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree_name", [None, "cpu"])  # None: plain decoding, the tree's root alone
def test_the_kv_cache_is_what_the_readmes_sizing_rule_says(dtype, tree_name):
    loaded = tiny_loaded()
    model = loaded.model.to(dtype)
    config = model.config
    heads = tree = None
    if tree_name is not None:
        heads = random_heads(MedusaConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size),
                             seed=0).to(dtype)
        tree = get_tree(tree_name)
    slots, max_total_tokens = 3, 100
    engine = Engine(model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=slots,
                    max_total_tokens=max_total_tokens, heads=heads, tree=tree)
    nodes = 1 if tree is None else tree.num_nodes
    per_token = readme_kv_bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim,
                                          dtype.itemsize)
    cache = engine.cache
    assert sum(t.nbytes for t in cache.k + cache.v) == (slots + 1) * (max_total_tokens + nodes) * per_token

"""``train.compile``: each transformer block compiled by ``torch.compile``, with static shapes.

Per block, not the whole model: the blocks are where the time is (attention, MLP, LayerNorms and
residuals fuse into a few kernels), they share one graph per input shape, and the rest (heads,
losses, the EMA) stays eager and readable. Shapes are static because the iBOT selection has a
fixed size (:func:`dinokit.data.masking.mask_selection`): global crops, local crops and the
last block's queries are three shapes, compiled once each. Where compiling fails (no compiler,
an old GPU), training goes on eager after one warning line. Evaluation during training (the kNN
checks) runs the blocks eager (:func:`eager_blocks`): its batch sizes and CLS-only last block are
new shapes, and compiling them filled Dynamo's recompile limit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dinokit.models.vit import VisionTransformer

log = logging.getLogger(__name__)


def compile_blocks(backbone: VisionTransformer, backend: str = "inductor") -> bool:
    """Compile every block of ``backbone`` in place; False (and eager blocks) where it fails.

    ``backend``: inductor generates fused kernels; tests use ``aot_eager`` (the same capture and
    autograd graphs in seconds, without code generation)."""
    blocks = list(backbone.blocks)
    try:
        for block in blocks:
            block.lean = False  # the compiler picks what to keep for the backward
            block.compile(dynamic=False, backend=backend)
        _probe(blocks[0], backbone.embed_dim)
    except Exception as err:  # a platform without a working compiler: never a crash
        for block in blocks:
            block._compiled_call_impl = None  # back to the eager forward
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("train.compile: torch.compile failed here (%s); training runs eager", first[:200])
        return False
    return True


def _probe(block: torch.nn.Module, dim: int) -> None:
    """One forward and backward now, so a failure shows at set-up rather than mid-run."""
    device = next(block.parameters()).device
    x = torch.randn(2, 5, dim, device=device, requires_grad=True)
    with torch.enable_grad():
        block(x).sum().backward()
    block.zero_grad(set_to_none=True)


@contextmanager
def eager_blocks(backbone: torch.nn.Module) -> Iterator[None]:
    """Run ``backbone``'s compiled blocks eager inside the ``with``, compiled again after it.

    Why: every new input shape is a new graph (static shapes), and Dynamo keeps at most
    ``recompile_limit`` (8) per code object, all blocks together. Compiling and one training step
    of a student made 5 (a real run's teacher adds its own); an evaluation pass adds 2 per batch
    size (all tokens, then the CLS-only last block), so its second batch size filled the limit
    (``tests/test_compile.py``): each graph a compile of seconds to minutes on a GPU, for a pass
    that takes seconds eager. Blocks not compiled are left alone."""
    blocks = [b for b in getattr(backbone, "blocks", []) if getattr(b, "_compiled_call_impl", None) is not None]
    compiled = [b._compiled_call_impl for b in blocks]
    for block in blocks:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, impl in zip(blocks, compiled, strict=True):
            block._compiled_call_impl = impl

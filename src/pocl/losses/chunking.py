"""The automatic chunk size of the chunked losses: the largest power of two whose float32 temporaries
fit a memory budget at a given vocabulary.
"""

from __future__ import annotations

__all__ = [
    "AUTO_CHUNK_BYTES",
    "auto_chunk_size",
]


#: Memory budget of one loss chunk's float32 temporaries when the chunk size is chosen automatically.
AUTO_CHUNK_BYTES: int = 1 << 30
#: About this many float32 ``[chunk, V]`` tensors are alive at the peak of a fused chunk when autograd
#: differentiates the divergence (both models' logits, softmaxes, mixtures and their gradients; measured
#: in tests/losses/test_engine.py).
_CHUNK_TEMPORARIES = 16
#: The same with a compiled divergence kernel (closed-form gradient, no graph, run in CPU row blocks): both
#: models' logits and the gradient; measured 2.5-3.3 (tests/losses/test_engine.py holds it under this bound).
#: The eager kernels (GPU, float64, a failed compile) hold 10-13, so they keep the autograd path's budget.
_KERNEL_CHUNK_TEMPORARIES = 6


def auto_chunk_size(chunk_size: int, vocab_size: int, *, kernel: bool = False, largest: int = 512,
                    smallest: int = 32) -> int:
    """``chunk_size`` itself when > 0; for 0, the largest power of two in ``[smallest, largest]`` whose
    temporaries fit :data:`AUTO_CHUNK_BYTES` at this vocabulary. ``kernel``: the chunks run a compiled
    divergence kernel (:func:`pocl.losses.kernels.has_kernel` and
    :func:`~pocl.losses.kernels.uses_compiled_kernels`, and a teacher with full logits), which holds fewer
    temporaries, so a chunk may be larger: 256 instead of 128 at a 128k vocabulary. A fixed 512 would hold
    3.3 GiB at 128k on the autograd path, and was also slower there than 128
    (benchmarks/results/scaling.md)."""
    if chunk_size > 0:
        return chunk_size
    temporaries = _KERNEL_CHUNK_TEMPORARIES if kernel else _CHUNK_TEMPORARIES
    fits = AUTO_CHUNK_BYTES // (temporaries * 4 * max(vocab_size, 1))
    size = largest
    while size > smallest and size > fits:
        size //= 2
    return size

"""The Triton forward kernels of block-sparse attention, both returning ``(out, lse)`` for the same plan and pooled
key segment: ``block_sparse_attn`` (the portable FlashAttention-2 kernel over the plan's CSR rows; any CUDA GPU,
or the Triton interpreter) and ``block_sparse_attn_hopper`` (the Hopper, sm90+, kernel over the plan's full and
partial key blocks, with tensor-descriptor loads and conditional rescaling). Both modules import Triton; the
``triton`` and ``hopper`` backends import them lazily and run them as ``torch.library`` custom ops.
"""

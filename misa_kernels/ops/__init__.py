"""Update kernels: the plain-PyTorch twin (``torch_adam``) and the fused Triton kernels
(``triton_kernels``, with their tables in ``triton_tables`` and the launcher
``triton_adam``), chosen by :func:`misa_kernels.ops.backend.resolve_backend`; and the
sparse-backward ops (``sparse_linear``)."""

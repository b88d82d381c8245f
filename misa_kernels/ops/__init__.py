"""Update kernels: the plain-PyTorch twin (``torch_adam``) and the fused Triton kernels
(``triton_adam``), chosen by :func:`misa_kernels.ops.backend.resolve_backend`."""

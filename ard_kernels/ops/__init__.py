"""One module per op: its Triton kernels, launcher and autograd / custom-op glue."""

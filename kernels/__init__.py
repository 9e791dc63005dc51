"""Triton kernels of transfusion_fast, installed as ``transfusion_fast.kernels``.

One file per op family (Liger-Kernel style): its Triton kernels, the host function that picks tile
sizes and launches them, and the ``torch.autograd.Function`` / custom-op registration.
"""

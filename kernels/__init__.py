"""Triton kernels of transfusion_fast, installed as ``transfusion_fast.kernels``.

One op per file (Liger-Kernel style): its Triton kernels, the host function that picks tile sizes
and launches them, and the ``torch.autograd.Function`` / custom-op registration. Attention, the
largest, is split along its seams: ``attention_kernels`` (the ``@triton.jit`` code),
``attention_tiles`` (tile sizes), ``attention`` (launchers, custom ops, autograd) and
``attention_diagnostics`` (work counter, AOT specs); ``launch`` is the launch cache it uses. Nothing
here imports :mod:`transfusion_fast.ops` or anything above it.
"""

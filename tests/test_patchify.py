"""patchify / unpatchify (batched and packed): compiled kernels bitwise equal to the reference
twins over channels, patch sizes, layouts and dtypes; gradients; bad input."""
import json
import re
import subprocess
import sys

import pytest
import torch

from transfusion_fast import _ext, use_backend
from transfusion_fast.ops import (patchify, patchify_packed, patchify_packed_reference, patchify_reference,
                                  unpatchify, unpatchify_packed, unpatchify_packed_reference,
                                  unpatchify_reference)


def _layout(images, layout):
    if layout == "channels_last":
        return images.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view into a wider, taller tensor: no unit stride anywhere but C
        b, c, h, w = images.shape
        big = torch.zeros(b, c, h + 3, 2 * w + 1, dtype=images.dtype)
        big[:, :, 1:h + 1, 1:2 * w + 1:2] = images
        return big[:, :, 1:h + 1, 1:2 * w + 1:2]
    return images


def _bits(tensor):
    """Element bits, to compare any dtype (float8 included) exactly."""
    same_size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(same_size[tensor.element_size()])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("p", [1, 2, 4, 8, 3])
@pytest.mark.parametrize("channels", [1, 3, 4, 8])
@pytest.mark.parametrize("batch", [1, 2])
def test_patchify_and_unpatchify_equal_reference_bitwise(batch, channels, p, layout):
    # Grids of 3x5 and 1x7 patches: widths that are not multiples of any vector width.
    for grid_h, grid_w in ((3, 5), (1, 7)):
        images = _layout(torch.randn(batch, channels, grid_h * p, grid_w * p), layout)
        patches = patchify(images, p)
        expected = patchify_reference(images, p)
        assert patches.is_contiguous() and patches.shape == (batch, grid_h * grid_w, p * p * channels)
        assert torch.equal(patches, expected)
        back = unpatchify(patches, p, grid_h * p, grid_w * p)
        assert back.is_contiguous() and torch.equal(back, unpatchify_reference(patches, p, grid_h * p, grid_w * p))
        assert torch.equal(back, images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("p, channels, grid_w", [(8, 8, 37), (2, 4, 1030), (4, 5, 131), (1, 3, 4099)])
def test_wide_rows_span_several_blocks_and_tiles(dtype, p, channels, grid_w):
    # The channels-first CPU kernel moves a patch row through an L1 block of whole patches (32 KiB)
    # and each image row through a pixel-major tile (16 KiB): these widths need several of each,
    # the last one partial.
    images = torch.randn(2, channels, 2 * p, grid_w * p).to(dtype)
    patches = patchify(images, p)
    assert torch.equal(_bits(patches), _bits(patchify_reference(images, p)))
    assert torch.equal(_bits(unpatchify(patches, p, 2 * p, grid_w * p)), _bits(images))


@pytest.mark.parametrize("shape, p", [((1, 4, 520, 1030), 2), ((1, 3, 704, 1004), 4)])
def test_large_outputs_written_around_the_caches_are_exact(shape, p):
    # From 8 MiB on, the CPU kernels write the patch side with non-temporal stores: whole 64-byte
    # lines only, rows that start and end off a line boundary (W * 4 bytes not a multiple of 64).
    images = torch.randn(shape)
    assert images.numel() * 4 >= 8 << 20
    patches = patchify(images, p)
    assert torch.equal(patches, patchify_reference(images, p))
    assert torch.equal(unpatchify(patches, p, shape[2], shape[3]), images)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_float_dtype_is_moved_bit_for_bit(dtype, layout):
    images = _layout(torch.randn(2, 3, 12, 20).to(dtype), layout)
    patches = patchify(images, 4)
    assert patches.dtype == dtype
    assert torch.equal(_bits(patches), _bits(patchify_reference(images, 4)))
    assert torch.equal(_bits(unpatchify(patches, 4, 12, 20)), _bits(images))


def test_non_contiguous_patches_are_accepted_by_unpatchify():
    patches = torch.randn(8, 2, 16).transpose(0, 1)  # (2, 8, 16), not contiguous
    assert not patches.is_contiguous()
    assert torch.equal(unpatchify(patches, 2, 4, 8), unpatchify_reference(patches, 2, 4, 8))


def test_reference_backend_runs_the_reference():
    images = torch.randn(1, 3, 4, 6)
    with use_backend("reference"):
        assert torch.equal(patchify(images, 2), patchify_reference(images, 2))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_patchify_gradcheck_float64(layout):
    images = _layout(torch.randn(2, 3, 4, 6, dtype=torch.float64), layout).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: patchify(x, 2), (images,))
    patches = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: unpatchify(x, 2, 4, 6), (patches,))


def _image_list(layout="contiguous", dtype=torch.float32, channels=3, p=2):
    sizes = [(2, 3), (1, 1), (4, 2), (3, 5)]  # in patches
    images = [torch.randn(channels, h * p, w * p, dtype=dtype) for h, w in sizes]
    if layout == "channels_last":  # (C, H, W) with C fastest
        images = [image.permute(1, 2, 0).contiguous().permute(2, 0, 1) for image in images]
    return images


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p", [1, 2, 8])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_packed_equals_reference_and_round_trips(layout, p, channels):
    images = _image_list(layout, channels=channels, p=p)
    patches, offsets = patchify_packed(images, p)
    expected, expected_offsets = patchify_packed_reference(images, p)
    assert offsets.dtype == torch.int64 and torch.equal(offsets, expected_offsets)
    assert offsets.tolist() == [0, 6, 7, 15, 30]
    assert torch.equal(patches, expected)
    sizes = [tuple(image.shape[1:]) for image in images]
    back = unpatchify_packed(patches, offsets, p, sizes)
    reference = unpatchify_packed_reference(patches, offsets, p, sizes)
    assert len(back) == len(images)
    for got, ref, image in zip(back, reference, images):
        assert torch.equal(got, ref) and torch.equal(got, image)


def test_packed_rows_are_the_batched_rows_of_each_image():
    images = _image_list()
    patches, offsets = patchify_packed(images, 2)
    for i, image in enumerate(images):
        assert torch.equal(patches[offsets[i]:offsets[i + 1]], patchify(image[None], 2)[0])


def test_packed_gradcheck_float64():
    images = [image.requires_grad_() for image in _image_list(dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *xs: patchify_packed(list(xs), 2)[0], tuple(images))
    patches, offsets = patchify_packed([image.detach() for image in images], 2)
    patches.requires_grad_()
    sizes = [tuple(image.shape[1:]) for image in images]
    assert torch.autograd.gradcheck(lambda x: tuple(unpatchify_packed(x, offsets, 2, sizes)), (patches,))
    # An image whose output gets no gradient contributes zeros to the packed gradient.
    out = unpatchify_packed(patches, offsets, 2, sizes)
    out[0].sum().backward()
    assert bool((patches.grad[:6] == 1).all()) and bool((patches.grad[6:] == 0).all())


def test_patchify_ops_pass_opcheck():
    images = torch.randn(2, 3, 4, 6, requires_grad=True)
    patchify(images, 2)  # registers the autograd and fake kernels
    ops = _ext.ops()
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.patchify, (images, 2), test_utils=checks)
    torch.library.opcheck(ops.unpatchify, (torch.randn(2, 6, 12, requires_grad=True), 2, 4, 6), test_utils=checks)
    image_list = [image.requires_grad_() for image in _image_list()]
    torch.library.opcheck(ops.patchify_packed, (image_list, 2), test_utils=checks)
    torch.library.opcheck(ops.unpatchify_packed, (torch.randn(4, 12, requires_grad=True), 2, [2, 4], [4, 2]),
                          test_utils=checks)


@pytest.mark.parametrize("call,match", [
    (lambda: patchify(torch.zeros(1, 3, 5, 4), 2), r"divisible by the patch size p=2, got H=5, W=4"),
    (lambda: patchify(torch.zeros(1, 3, 4, 4), 0), r"patch size p must be a positive int <= 2147483647, got int 0"),
    (lambda: patchify(torch.zeros(1, 3, 4, 4), True), "patch size p must be a positive int"),
    (lambda: patchify(torch.zeros(3, 4, 4), 2), r"images must be a \(B, C, H, W\) tensor"),
    (lambda: patchify(torch.zeros(1, 3, 4, 4, dtype=torch.int32), 2), "images must be floating point"),
    (lambda: unpatchify(torch.zeros(1, 5, 12), 2, 4, 6), "expected 6 patches for a 4x6 image with p=2, got 5"),
    (lambda: unpatchify(torch.zeros(1, 6, 10), 2, 4, 6), "multiple of 4, got 10"),
    (lambda: unpatchify(torch.zeros(1, 6, 12), 2, 5, 6), "height must be a positive multiple of p=2"),
    (lambda: patchify_packed([], 2), "non-empty list"),
    (lambda: patchify_packed([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)], 2), r"images\[1\] must match images\[0\]"),
    (lambda: patchify_packed([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.float64)], 2),
     r"images\[1\] must match images\[0\]"),
    (lambda: patchify_packed([torch.zeros(3, 4, 6), torch.zeros(3, 3, 4)], 2),
     r"images\[1\]: height and width must be divisible by the patch size p=2, got H=3, W=4"),
    (lambda: patchify_packed([torch.zeros(1, 3, 4, 4)], 2), r"images\[0\] must be a floating-point \(C, H, W\)"),
    (lambda: unpatchify_packed(torch.zeros(5, 12), torch.tensor([0, 2, 5]), 2, [(2, 4), (4, 6)]),
     r"offsets must be the patch-row offsets of sizes, \[0, 2, 8\], got \[0, 2, 5\]"),
    (lambda: unpatchify_packed(torch.zeros(6, 12), torch.tensor([0, 2, 5]), 2, [(2, 4), (4, 3)]),
     "sizes must be a non-empty list of"),
    (lambda: unpatchify_packed(torch.zeros(6, 12), torch.tensor([0, 2, 5]), 2, [(2, 4), (4, 4)]),
     r"offsets must be the patch-row offsets of sizes, \[0, 2, 6\]"),
    (lambda: unpatchify_packed(torch.zeros(7, 12), torch.tensor([0, 2, 6]), 2, [(2, 4), (4, 4)]),
     "sizes give 6 patches, got 7 rows"),
])
def test_bad_input_raises_before_any_kernel(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# The crash: p = 2**32 (and 2**33) passed the Python checks, then p * p wrapped to 0 in
# the C++ and the process died with SIGFPE. Run in a child process, on both backends, so that a
# crash fails this test instead of killing the session (the C++ ops alone: test_cpp_bad_input.py).
HUGE_PATCH_CALLS = [
    "ops.unpatchify(torch.empty(1, 1, 0), 2**32, 2**32, 2**32)",
    "ops.unpatchify(torch.empty(1, 1, 0), 2**33, 2**33, 2**33)",
    "ops.unpatchify_packed(torch.empty(1, 0), torch.tensor([0, 1]), 2**32, [(2**32, 2**32)])",
    "ops.unpatchify_packed(torch.empty(1, 0), torch.tensor([0, 1]), 2**33, [(2**33, 2**33)])",
    "ops.patchify(torch.empty(1, 1, 0, 0), 2**32)",
    "ops.patchify_packed([torch.empty(1, 0, 0)], 2**32)",
]
HUGE_SIZE_CALLS = [   # a valid p with the image sizes
    "ops.unpatchify(torch.empty(1, 0, 1), 1, 2**32, 2**32)",
    "ops.unpatchify_packed(torch.empty(1, 1), torch.tensor([0, 1]), 1, [(2**32, 2**32)])",
]
_CHILD = """
import json, sys, torch
from transfusion_fast import ops, use_backend
results = []
for backend in ("auto", "reference"):
    with use_backend(backend):
        for code in json.loads(sys.argv[1]):
            try:
                eval(code)
                results.append([backend, code, "no error", ""])
            except Exception as error:
                results.append([backend, code, type(error).__name__, str(error)])
print("RESULTS " + json.dumps(results))
"""


def test_huge_patch_sizes_raise_a_clear_error_and_never_crash():
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(HUGE_PATCH_CALLS + HUGE_SIZE_CALLS)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the process died (exit {child.returncode}):\n{child.stderr[-3000:]}"
    results = json.loads(child.stdout.split("RESULTS ", 1)[1])
    assert len(results) == 2 * len(HUGE_PATCH_CALLS + HUGE_SIZE_CALLS)
    for backend, code, kind, message in results:
        assert kind == "ValueError", f"{backend}: {code} gave {kind}: {message}"
        if code in HUGE_PATCH_CALLS:
            assert re.search(r"patch size p must be a positive int <= 2147483647, got int (4294967296|8589934592)",
                             message), message
        else:
            assert re.search(r"(height|sizes) must be .*2147483647", message), message


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_patchify_equals_cpu(layout, dtype):
    images = _layout(torch.randn(2, 3, 12, 20).to(dtype), layout)
    for p in (1, 2, 4):
        cpu = patchify(images, p)
        gpu = patchify(images.cuda(), p)
        assert torch.equal(gpu.cpu(), cpu)
        assert torch.equal(unpatchify(gpu, p, 12, 20).cpu(), unpatchify(cpu, p, 12, 20))
    image_list = _image_list(layout if layout != "strided" else "contiguous", dtype=dtype)
    cpu, offsets = patchify_packed(image_list, 2)
    gpu, gpu_offsets = patchify_packed([image.cuda() for image in image_list], 2)
    assert torch.equal(gpu.cpu(), cpu) and torch.equal(gpu_offsets.cpu(), offsets)
    sizes = [tuple(image.shape[1:]) for image in image_list]
    for a, b in zip(unpatchify_packed(gpu, gpu_offsets, 2, sizes), image_list):
        assert torch.equal(a.cpu(), b)


@pytest.mark.gpu
def test_cuda_patchify_beyond_32_bit_indices():
    """2^31 patch elements: the CUDA kernels switch from 32-bit fast division to 64-bit indices.
    Checked against the reference permute on the GPU (the CPU kernels index in 64 bits always; a
    CPU twin of this size would need 16 GiB)."""
    images = torch.randn(1, 2, 32768, 32768, dtype=torch.bfloat16, device="cuda")
    patches = patchify(images, 2)
    assert torch.equal(patches, patchify_reference(images, 2))
    del images
    assert torch.equal(unpatchify(patches, 2, 32768, 32768), unpatchify_reference(patches, 2, 32768, 32768))

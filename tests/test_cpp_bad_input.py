"""Bad input to every op of the compiled extension gives a Python exception with a clear message,
never a crash of the process, whatever torch and compiler built it (make test-compat runs this file
against the oldest supported torch too).

The messages format integers, shapes and dtypes (the part of TORCH_CHECK that reads the stream's
locale facets), and the ops run in a child process: a crash there fails the test with its signal
instead of killing the test session. The second part checks how the extension is linked: every
reference to the C++ standard library is versioned and resolves to libstdc++.so.6, not to the
unversioned copies of parts of libstdc++ that torch's own libraries export (setup.py).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each case: a name, Python code evaluating the failing call (ops = torch.ops.transfusion_fast,
# z = torch.zeros), the expected message (a regular expression).
CASES = [
    ("patchify p", "ops.patchify(z(1, 1, 4, 4), 0)",
     r"patchify: patch size p must be positive and at most 2147483647, got 0"),
    # Issue 19: p = 2**32 made p * p wrap to 0 and the divisibility check died with SIGFPE.
    ("patchify p=2**32", "ops.patchify(z(1, 1, 4, 4), 2**32)",
     r"patchify: patch size p must be positive and at most 2147483647, got 4294967296"),
    ("unpatchify p=2**32", "ops.unpatchify(z(1, 1, 0), 2**32, 2**32, 2**32)",
     r"unpatchify: patch size p must be positive and at most 2147483647, got 4294967296"),
    ("unpatchify p=2**33", "ops.unpatchify(z(1, 1, 0), 2**33, 2**33, 2**33)",
     r"unpatchify: patch size p must be positive and at most 2147483647, got 8589934592"),
    ("unpatchify size 2**32", "ops.unpatchify(z(1, 0, 0), 1, 2**32, 2**32)",
     r"unpatchify: height must be in \[0, 2147483647\], got 4294967296"),
    ("unpatchify_packed p=2**32", "ops.unpatchify_packed(z(1, 0), 2**32, [2**32], [2**32])",
     r"unpatchify_packed: patch size p must be positive and at most 2147483647, got 4294967296"),
    ("unpatchify_packed p=2**33", "ops.unpatchify_packed(z(1, 0), 2**33, [2**33], [2**33])",
     r"unpatchify_packed: patch size p must be positive and at most 2147483647, got 8589934592"),
    ("unpatchify_packed size 2**32", "ops.unpatchify_packed(z(1, 0), 1, [2**32], [2**32])",
     r"unpatchify_packed: height must be in \[0, 2147483647\], got 4294967296"),
    ("patchify_packed p=2**32", "ops.patchify_packed([z(1, 4, 4)], 2**32)",
     r"patchify: patch size p must be positive and at most 2147483647, got 4294967296"),
    ("patchify divisible", "ops.patchify(z(1, 1, 5, 4), 2)",
     r"H and W must be divisible by p=2, got H=5 W=4"),
    ("unpatchify count", "ops.unpatchify(z(1, 3, 4), 1, 2, 2)", r"unpatchify: expected 4 patches for 2x2 with p=1, got 3"),
    ("patchify_packed match", "ops.patchify_packed([z(1, 4, 4), z(2, 4, 4)], 2)",
     r"images\[1\] must match images\[0\] in C"),
    ("unpatchify_packed count", "ops.unpatchify_packed(z(3, 4), 2, [2], [2])",
     r"the image sizes give 1 patches, got 3"),
    ("q_sample timesteps", "ops.q_sample(z(2, 3), z(3, dtype=torch.long), z(10, dtype=torch.float64), "
     "z(10, dtype=torch.float64), z(2, 3))", r"q_sample: timesteps must have shape \(2,\), got \[3\]"),
    ("q_sample timestep range", "ops.q_sample(z(2, 3), torch.tensor([0, 10]), z(10, dtype=torch.float64), "
     "z(10, dtype=torch.float64), z(2, 3))", r"q_sample: timesteps\[1\] must be in \[0, 10\), got 10"),
    ("q_sample_philox timestep range", "ops.q_sample_philox(z(2, 3), torch.tensor([-1, 0]), "
     "z(10, dtype=torch.float64), z(10, dtype=torch.float64), 7)", r"timesteps\[0\] must be in \[0, 10\), got -1"),
    ("q_sample_philox timesteps", "ops.q_sample_philox(z(2, 3), z(3, dtype=torch.long), "
     "z(10, dtype=torch.float64), z(10, dtype=torch.float64), 7)", r"timesteps must have shape \(2,\), got \[3\]"),
    ("philox4x32_10 counters", "ops.philox4x32_10(z(2, 3, dtype=torch.long), z(2, 2, dtype=torch.long))",
     r"counters must be an int64 \(N, 4\) tensor, got Long \[2, 3\]"),
    ("philox_normal isa", "ops.philox_normal(0, 0, 8, 'sse9')", r"isa must be auto, avx512, avx2 or scalar, got sse9"),
    ("philox_normal first", "ops.philox_normal(0, 2, 8, 'auto')", r"first must be a non-negative multiple of 4, got 2"),
    ("philox_normal numel", "ops.philox_normal(0, 0, -5, 'scalar')", r"numel must be >= 0, got -5"),
    ("ddpm_step t", "ops.ddpm_step(z(2, 3), z(2, 3), None, torch.tensor([12, 1]), torch.tensor([3, 0]), "
     "torch.linspace(0.99, 0.1, 10, dtype=torch.float64), 0, 1.0, None, 1)",
     r"sampler step: row 0 needs 0 <= t < 10 and -1 <= t_prev < t, got t=12 t_prev=3"),
    ("ddim_step t", "ops.ddim_step(z(2, 3), z(2, 3), None, torch.tensor([1, 4]), torch.tensor([0, 5]), "
     "torch.linspace(0.99, 0.1, 10, dtype=torch.float64), 0, 0.0, 1.0, None, 1)",
     r"row 1 needs 0 <= t < 10 and -1 <= t_prev < t, got t=4 t_prev=5"),
    ("attention_cpu_fwd blocks", "ops.attention_cpu_fwd(z(8, 2, 16), z(8, 2, 16), z(8, 2, 16), "
     "*[z(8, dtype=torch.int32)] * 2, *[z(1, dtype=torch.int32)] * 4, 0, 16, 0.25)",
     r"attention_cpu: block sizes must be positive, got 0 x 16"),
    ("attention_cpu_fwd table", "ops.attention_cpu_fwd(z(8, 2, 16), z(8, 2, 16), z(8, 2, 16), "
     "*[z(8, dtype=torch.int32)] * 2, z(3, dtype=torch.int32), *[z(1, dtype=torch.int32)] * 3, 8, 8, 0.25)",
     r"kv_lo must be a contiguous int32 vector of 1 entries, got dtype Int and shape \[3\]"),
    ("attention_cpu_fwd heads", "ops.attention_cpu_fwd(z(8, 3, 16), z(8, 2, 16), z(8, 2, 16), "
     "*[z(8, dtype=torch.int32)] * 2, *[z(1, dtype=torch.int32)] * 4, 8, 8, 0.25)",
     r"query heads \(3\) must be a multiple of kv heads \(2\)"),
    ("attention_cpu_bwd lse", "ops.attention_cpu_bwd(*[z(8, 2, 16)] * 5, z(2, 7), None, "
     "*[z(8, dtype=torch.int32)] * 4, *[z(1, dtype=torch.int32)] * 4, 8, 8, 0.25)",
     r"attention_cpu_bwd: lse must be \(2, 8\), got \[2, 7\]"),
    ("attention_cpu_tile_gemm c", "ops.attention_cpu_tile_gemm(z(4, 8), z(8, 4), z(8, 5), False, 1.0, 0.0)",
     r"c must be \(n, 8\), got \[8, 5\]"),
    ("attention_cpu_set_isa name", "ops.attention_cpu_set_isa('sse9')",
     r"attention_cpu_set_isa: isa must be one of 'avx512', 'avx2', 'portable', got 'sse9'"),
    ("euler_step t", "ops.euler_step(z(2, 3), z(2, 3), None, torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75]), 1.0)",
     r"flow step: row 1 needs 0 <= t_next < t <= 1, got t=0.5 t_next=0.75"),
    ("heun_step t", "ops.heun_step(z(2, 3), z(2, 3), z(2, 3), None, torch.tensor([1.5, 0.5]), "
     "torch.tensor([0.25, 0.25]), 1.0)", r"flow step: row 0 needs 0 <= t_next < t <= 1, got t=1.5 t_next=0.25"),
]

CHILD = textwrap.dedent("""
    import json, sys, torch
    import transfusion_fast
    from transfusion_fast import _ext
    ops, z = _ext.ops(), torch.zeros
    results = {}
    for name, code in json.loads(sys.argv[1]):
        try:
            eval(code)
            results[name] = ["no error", ""]
        except Exception as error:
            results[name] = [type(error).__name__, str(error)]
        print(name, flush=True)   # the last name printed before a crash names the culprit
    print("RESULTS " + json.dumps(results))
""")


def _undefined_symbols(library: str) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


def test_every_cpp_op_rejects_bad_input_with_a_message_and_no_crash():
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps([(n, c) for n, c, _ in CASES])],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, (f"the process died (exit {child.returncode}) after the cases:\n"
                                   f"{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
    results = json.loads(child.stdout.split("RESULTS ", 1)[1])
    for name, _, pattern in CASES:
        kind, message = results[name]
        assert kind == "RuntimeError", f"{name}: expected RuntimeError, got {kind}: {message}"
        assert re.search(pattern, message), f"{name}: message {message!r} does not match {pattern!r}"


def test_every_op_defined_in_csrc_is_covered():
    defined = set()
    for source in sorted(ROOT.glob("csrc/*.cpp")):
        defined |= set(re.findall(r'm\.def\(\s*"(\w+)\(', source.read_text()))
    assert "patchify" in defined and "attention_cpu_fwd" in defined, defined
    # Ops without an argument to get wrong: the ISA lists and the active attention ISA (the refusal
    # of an ISA the CPU lacks is tested in test_attention_cpu.py).
    no_bad_input = {"philox_normal_isas", "attention_cpu_isas", "attention_cpu_isa"}
    covered = {code.split("(")[0].removeprefix("ops.") for _, code, _ in CASES}
    assert not defined - no_bad_input - covered, sorted(defined - no_bad_input - covered)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbol versions: Linux only")
def test_standard_library_references_are_versioned_and_resolve_to_libstdcxx():
    assert shutil.which("nm") and shutil.which("readelf"), "binutils (nm, readelf) are needed"
    import transfusion_fast._C as compiled
    library = compiled.__file__
    std = [s for s in _undefined_symbols(library)
           if re.match(r"_Z(N[KR]*S[toi]|S[tio]|T[VTIS]N?S[toi])", s)]
    assert std, "no standard-library reference found: the check would prove nothing"
    unversioned = [s for s in std if "@GLIBCXX_" not in s and "@CXXABI_" not in s]
    assert not unversioned, ("bound to copies of libstdc++ outside libstdc++.so.6 (link libstdc++ "
                             f"before torch's libraries): {unversioned}")
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    first_torch = min((i for i, n in enumerate(needed) if n.startswith(("libc10", "libtorch"))), default=len(needed))
    assert "libstdc++.so.6" in needed[:first_torch], needed

#pragma once
// Which x86 SIMD code paths this build has. The x86 paths (intrinsics, functions with a target
// attribute, run-time CPU checks, one clone per vector width) are compiled only for x86-64; on
// every other target (aarch64: Grace, Graviton, ...) the portable code beside them runs, which
// gives the same bits (the ops' tests compare every path the CPU runs against the reference).
#if defined(__x86_64__) && defined(__GNUC__)
#define TF_X86 1
#include <immintrin.h>
#else
#define TF_X86 0
#endif

// One clone per vector width of a hot loop, picked at load time (GCC's ifunc): x86 GCC only.
#if TF_X86 && !defined(__clang__)
#define TF_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TF_TARGET_CLONES
#endif

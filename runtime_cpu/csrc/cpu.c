/* Which ISA paths this CPU runs (cpuid on x86 through the compiler's builtins, auxv on aarch64). */
#include "mote_kernels.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

int mote_has_dotprod(void) {
#if defined(__aarch64__) && defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return 0;
#endif
}

int mote_isa_runs(int isa) {
    switch (isa) {
    case MOTE_SCALAR:
        return 1;
#if defined(__x86_64__)
    case MOTE_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case MOTE_AVX512:
        __builtin_cpu_init();
        return mote_isa_runs(MOTE_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
               __builtin_cpu_supports("avx512vbmi");
#endif
#if defined(__aarch64__)
    case MOTE_NEON:
        return 1;
#endif
    default:
        return 0;
    }
}

int mote_isa_best(void) {
    if (mote_isa_runs(MOTE_AVX512)) return MOTE_AVX512;
    if (mote_isa_runs(MOTE_AVX2)) return MOTE_AVX2;
    if (mote_isa_runs(MOTE_NEON)) return MOTE_NEON;
    return MOTE_SCALAR;
}

int mote_isa_pick(int isa) {
    if (isa == MOTE_ISA_AUTO) return mote_isa_best();
    return mote_isa_runs(isa) ? isa : -1;
}

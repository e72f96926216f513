// What this CPU and its OS let a process run, asked of the CPU itself (CPUID, and XGETBV for
// the register state the OS saves), and a guarded call that turns an illegal instruction into
// an error code instead of a dead process. Compiled for the architecture's baseline (no -m
// flags): it must run on any CPU of it. pagedserve/ops/cpu_kernels/isa.py reads it with ctypes.
//
// CPUID says what the silicon has; a hypervisor may list features whose registers the OS does
// not save (XCR0), or that need a permission first (AMX: arch_prctl): each feature below is
// reported only where both agree, and a variant is chosen only after its self-test has run
// under ps_probe_run_guarded.
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

static uint64_t xgetbv0(void) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}
#endif

// Feature bits of ps_probe_features (mirrored in isa.py's FEATURES).
enum {
  PS_F_AVX2 = 1 << 0,
  PS_F_FMA = 1 << 1,
  PS_F_F16C = 1 << 2,
  PS_F_AVX512F = 1 << 3,
  PS_F_AVX512BW = 1 << 4,
  PS_F_AVX512VL = 1 << 5,
  PS_F_AVX512VNNI = 1 << 6,
  PS_F_AVXVNNI = 1 << 7,
  PS_F_AMX_INT8 = 1 << 8,  // listed by the CPU; usable only after arch_prctl (not used yet)
  PS_F_OS_AVX = 1 << 16,     // XCR0: the OS saves the YMM state
  PS_F_OS_AVX512 = 1 << 17,  // ... and the opmask and ZMM state
};

#ifndef PS_SOURCE_HASH
#define PS_SOURCE_HASH "unknown"
#endif

// the sources' hash this probe was compiled from (build.py's source_hash)
const char* ps_probe_source_hash(void) { return PS_SOURCE_HASH; }

uint32_t ps_probe_features(void) {
  uint32_t features = 0;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int osxsave = (c >> 27) & 1;
  if (!osxsave) return 0;  // no XGETBV: the OS saves no vector state beyond SSE
  if (c & (1u << 12)) features |= PS_F_FMA;
  if (c & (1u << 29)) features |= PS_F_F16C;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) == 0x6) features |= PS_F_OS_AVX;                        // XMM, YMM
  if ((xcr0 & 0xE6) == 0xE6) features |= PS_F_OS_AVX512;                   // + opmask, ZMM
  if (__get_cpuid_max(0, 0) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    if (b & (1u << 5)) features |= PS_F_AVX2;
    if (b & (1u << 16)) features |= PS_F_AVX512F;
    if (b & (1u << 30)) features |= PS_F_AVX512BW;
    if (b & (1u << 31)) features |= PS_F_AVX512VL;
    if (c & (1u << 11)) features |= PS_F_AVX512VNNI;
    if (d & (1u << 25)) features |= PS_F_AMX_INT8;
    __cpuid_count(7, 1, a, b, c, d);
    if (a & (1u << 4)) features |= PS_F_AVXVNNI;
  }
  if (!(features & PS_F_OS_AVX))
    features &= ~(uint32_t)(PS_F_AVX2 | PS_F_FMA | PS_F_F16C | PS_F_AVXVNNI);
  if (!(features & PS_F_OS_AVX512))
    features &= ~(uint32_t)(PS_F_AVX512F | PS_F_AVX512BW | PS_F_AVX512VL | PS_F_AVX512VNNI);
#endif
  return features;
}

static __thread sigjmp_buf *guard_jump;  // set while this thread runs a guarded call

static void on_fault(int sig) {
  if (guard_jump != NULL) siglongjmp(*guard_jump, sig);
  // another thread's fault: let the default action have it
  signal(sig, SIG_DFL);
  raise(sig);
}

// fn() under a handler for SIGILL (an instruction the CPU or the OS refuses), SIGSEGV and
// SIGBUS: fn's return value, or -1000 - the signal's number. The previous handlers (Python's
// faulthandler, say) are restored after.
int ps_probe_run_guarded(int (*fn)(void)) {
  static const int signals[] = {SIGILL, SIGSEGV, SIGBUS};
  struct sigaction ours, saved[3];
  memset(&ours, 0, sizeof ours);
  ours.sa_handler = on_fault;
  sigemptyset(&ours.sa_mask);
  ours.sa_flags = SA_NODEFER;
  for (int i = 0; i < 3; ++i) sigaction(signals[i], &ours, &saved[i]);
  sigjmp_buf jump;
  volatile int result;
  const int sig = sigsetjmp(jump, 1);
  if (sig == 0) {
    guard_jump = &jump;
    result = fn();
  } else {
    result = -1000 - sig;
  }
  guard_jump = NULL;
  for (int i = 0; i < 3; ++i) sigaction(signals[i], &saved[i], NULL);
  return result;
}

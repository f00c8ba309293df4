/* edgedeploy-memprobe: how much memory one process may hold on a device before the low-memory killer
 * ends it, and how fast it reads memory. Pushed and run by `edgedeploy calibrate`; plain C99 + POSIX so
 * that the host cc, aarch64-linux-gnu-gcc and the Android NDK's clang all build it.
 *
 *   edgedeploy-memprobe ceiling START_MB STEP_MB HOLD_MS CAP_MB
 *     Reserves CAP_MB of address space, touches START_MB at once (no pauses), then STEP_MB more at a
 *     time, holding HOLD_MS after each step so the low-memory killer has time to act. After every step
 *     it survived it prints "ok TOUCHED_BYTES VMRSS_BYTES VMSWAP_BYTES" (flushed). A SIGKILL ends it
 *     (exit 137 in the shell); reaching CAP_MB prints "cap" and exits 0. Memory is filled with
 *     pseudo-random words, not a constant: zram would compress constant pages ~100:1 and KSM would merge
 *     them, so the probe would hold far more than a model's weights (which barely compress) ever could.
 *   edgedeploy-memprobe bandwidth BUFFER_MB REPEATS
 *     Reads a BUFFER_MB buffer REPEATS times (64-bit loads, summed) and prints "bw BYTES_PER_S BYTES SECONDS"
 *     for the fastest pass.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define MB (1024.0 * 1024.0)

/* VmRSS and VmSwap of this process in bytes (-1: not reported). */
static void vm_status(long long *rss, long long *swap) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long long kb;
  *rss = *swap = -1;
  if (!f) return;
  while (fgets(line, sizeof line, f)) {
    if (sscanf(line, "VmRSS: %lld kB", &kb) == 1) *rss = kb * 1024;
    if (sscanf(line, "VmSwap: %lld kB", &kb) == 1) *swap = kb * 1024;
  }
  fclose(f);
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

/* Fill with xorshift64 words: incompressible, and no two pages alike. */
static void fill(char *p, size_t n) {
  uint64_t *w = (uint64_t *)p, x = rng;
  for (size_t i = 0; i < n / sizeof(uint64_t); i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    w[i] = x;
  }
  rng = x;
}

static void report(size_t touched) {
  long long rss, swap;
  vm_status(&rss, &swap);
  printf("ok %zu %lld %lld\n", touched, rss, swap);
  fflush(stdout);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void sleep_ms(long ms) {
  struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&t, &t) != 0) {}
}

static int ceiling(double start_mb, double step_mb, long hold_ms, double cap_mb) {
  size_t cap = (size_t)(cap_mb * MB), start = (size_t)(start_mb * MB), step = (size_t)(step_mb * MB);
  size_t touched = 0;
  if (step < 4096) step = 4096;
  if (start > cap) start = cap;
  /* Reserved, not committed: only touched pages count. */
  char *p = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "memprobe: cannot reserve %.0f MiB of address space\n", cap_mb);
    return 2;
  }
#ifdef MADV_HUGEPAGE
  /* Where the kernel offers transparent huge pages, 2 MiB faults touch memory ~10x faster; RSS counts
   * them the same. Android kernels mostly leave THP off: then this is a no-op. */
  madvise(p, cap, MADV_HUGEPAGE);
#endif
  step &= ~(size_t)7;
  start &= ~(size_t)7;
  fill(p, start);
  touched = start;
  sleep_ms(hold_ms);
  report(touched);
  while (touched < cap) {
    size_t n = cap - touched < step ? cap - touched : step;
    fill(p + touched, n);
    touched += n;
    sleep_ms(hold_ms);
    report(touched);
  }
  printf("cap\n");
  return 0;
}

static int bandwidth(double buf_mb, int repeats) {
  size_t n = (size_t)(buf_mb * MB) / sizeof(uint64_t);
  uint64_t *a = malloc(n * sizeof(uint64_t)), sum = 0;
  double best = 1e30;
  if (!a) {
    fprintf(stderr, "memprobe: cannot allocate %.0f MiB\n", buf_mb);
    return 2;
  }
  for (size_t i = 0; i < n; i++) a[i] = i;
  for (int r = 0; r < repeats; r++) {
    double t = now();
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= n; i += 4) {
      s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
    }
    sum += s0 + s1 + s2 + s3;
    t = now() - t;
    if (t < best) best = t;
  }
  printf("bw %.0f %zu %.6f\n", n * sizeof(uint64_t) / best, n * sizeof(uint64_t), best);
  fprintf(stderr, "checksum %llu\n", (unsigned long long)sum); /* keeps the loads */
  free(a);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 6 && strcmp(argv[1], "ceiling") == 0)
    return ceiling(atof(argv[2]), atof(argv[3]), atol(argv[4]), atof(argv[5]));
  if (argc == 4 && strcmp(argv[1], "bandwidth") == 0)
    return bandwidth(atof(argv[2]), atoi(argv[3]));
  fprintf(stderr, "usage: edgedeploy-memprobe ceiling START_MB STEP_MB HOLD_MS CAP_MB | bandwidth BUFFER_MB REPEATS\n");
  return 2;
}

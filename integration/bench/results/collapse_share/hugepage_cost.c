// What a 2 MiB page costs this machine: a fresh anonymous mapping touched in 4 KiB pages, then
// collapsed (MADV_COLLAPSE, what MEMPIPE_KV_HUGE_PAGES=collapse does), against a mapping
// advised (MADV_HUGEPAGE) before its first touch, which faults huge pages in directly. Each
// round maps new memory and unmaps it at the end, so a later round may reuse what an earlier
// one gave back (or find it returned to a hypervisor: free page reporting). ms per 2 MiB page.
//
//   cc -O2 -o hugepage_cost hugepage_cost.c && ./hugepage_cost 512 3
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

#define HUGE ((size_t)2 << 20)

static double Now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static long AnonHugeMiB(void) {
  FILE* f = fopen("/proc/self/smaps_rollup", "r");
  char line[256];
  long kib = 0;
  while (f && fgets(line, sizeof line, f))
    if (!strncmp(line, "AnonHugePages:", 14)) kib = atol(line + 14);
  if (f) fclose(f);
  return kib / 1024;
}

// A 2 MiB-aligned region of n bytes inside a fresh mapping of n + 2 MiB.
static char* Map(size_t n, void** base) {
  *base = mmap(NULL, n + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (*base == MAP_FAILED) {
    perror("mmap");
    exit(1);
  }
  return (char*)(((uintptr_t)*base + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
}

int main(int argc, char** argv) {
  size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 512;
  int rounds = argc > 2 ? atoi(argv[2]) : 3;
  if (mib < 2 || rounds < 1) {
    fprintf(stderr, "usage: %s MIB ROUNDS (MIB >= 2, ROUNDS >= 1)\n", argv[0]);
    return 2;
  }
  size_t n = mib << 20 & ~(HUGE - 1), pages = n / HUGE;
  printf("%zu MiB per mapping, %d rounds; ms per 2 MiB page\n", n >> 20, rounds);
  for (int r = 1; r <= rounds; ++r) {
    void *ba, *bb;
    char* a = Map(n, &ba);
    double t = Now();
    memset(a, 1, n);
    double touch = (Now() - t) * 1e3 / pages;
    long before = AnonHugeMiB();
    t = Now();
    int failed = 0;
    for (size_t i = 0; i < pages; ++i) failed += madvise(a + i * HUGE, HUGE, MADV_COLLAPSE) != 0;
    double collapse = (Now() - t) * 1e3 / pages;
    long collapsed = AnonHugeMiB() - before;
    char* b = Map(n, &bb);
    madvise(b, n, MADV_HUGEPAGE);
    before = AnonHugeMiB();
    t = Now();
    memset(b, 1, n);
    double fault = (Now() - t) * 1e3 / pages;
    long faulted = AnonHugeMiB() - before;
    t = Now();
    memset(a, 2, n);
    double rewrite = (Now() - t) * 1e3 / pages;
    printf("round %d: 4 KiB touch %.3f | collapse %.3f (%ld MiB huge, %d refused) | huge fault "
           "%.3f (%ld MiB huge) | rewrite collapsed %.3f\n",
           r, touch, collapse, collapsed, failed, fault, faulted, rewrite);
    munmap(ba, n + HUGE);
    munmap(bb, n + HUGE);
  }
  return 0;
}

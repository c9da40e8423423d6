#ifndef CACHEMESH_CSYSTEM_SHIM_H
#define CACHEMESH_CSYSTEM_SHIM_H
#include <malloc.h>

// Keep transfer buffers (hundreds of KiB, allocated and freed constantly) on the heap instead of
// fresh mmaps that are page-faulted and cleared on every use.
static inline void cm_tune_malloc(void) {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

// Give freed heap memory back to the kernel (every arena, free pages inside the heap too).
static inline int cm_trim_malloc(void) {
    return malloc_trim(0);
}

// syncfs(2) (glibc declares it only with _GNU_SOURCE): the store's group commit syncs the data of
// many files with one call.
#include <unistd.h>
int syncfs(int fd);
static inline int cm_syncfs(int fd) {
    return syncfs(fd);
}

// How many CPUs this process may run on (its sched_getaffinity mask, e.g. under `taskset`), or 0
// when unknown. NIO sizes its event loop group by the machine's (or cgroup's) CPUs only.
#include <sys/syscall.h>
static inline int cm_affinity_cpu_count(void) {
    unsigned long mask[16] = {0};   /* 1024 CPUs */
    long n = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    if (n <= 0) return 0;
    int count = 0;
    for (long i = 0; i < n / (long)sizeof mask[0]; i++) count += __builtin_popcountl(mask[i]);
    return count;
}
#endif

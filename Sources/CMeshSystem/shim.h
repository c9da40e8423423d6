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
#endif

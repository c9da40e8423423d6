/* Writes a synthetic blob store for bench/store-scale.sh: files i = FIRST, FIRST+STEP, … < N,
 * each holding "cachemesh synthetic blob <i>\n" (27–35 bytes) and named by its SHA-256 in
 * ROOT/XX/<sha256> (ROOT is a store's cas/ directory; the 256 XX directories are made here).
 * The same bytes and names as the Python generator in store-scale.sh, written ~10x faster.
 *   cc -O2 -o store-gen bench/store-gen.c -lcrypto
 *   store-gen ROOT N [FIRST STEP]          (run STEP of them with FIRST = 0…STEP-1 in parallel) */
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3 && argc != 5) {
        fprintf(stderr, "usage: %s ROOT N [FIRST STEP]\n", argv[0]);
        return 2;
    }
    const char *root = argv[1];
    long n = atol(argv[2]), first = argc == 5 ? atol(argv[3]) : 0, step = argc == 5 ? atol(argv[4]) : 1;
    if (step < 1) step = 1;
    int dirs[256];
    char path[4096];
    mkdir(root, 0755);
    for (int p = 0; p < 256; p++) {
        snprintf(path, sizeof path, "%s/%02x", root, p);
        if (mkdir(path, 0755) != 0 && errno != EEXIST) { perror(path); return 1; }
        dirs[p] = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dirs[p] < 0) { perror(path); return 1; }
    }
    static const char hex[] = "0123456789abcdef";
    for (long i = first; i < n; i += step) {
        char data[64], name[65];
        unsigned char md[32];
        unsigned int mdlen = 0;
        int len = snprintf(data, sizeof data, "cachemesh synthetic blob %ld\n", i);
        if (!EVP_Digest(data, (size_t)len, md, &mdlen, EVP_sha256(), NULL)) { fprintf(stderr, "sha256 failed\n"); return 1; }
        for (int k = 0; k < 32; k++) { name[2 * k] = hex[md[k] >> 4]; name[2 * k + 1] = hex[md[k] & 15]; }
        name[64] = 0;
        int fd = openat(dirs[md[0]], name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, data, (size_t)len) != len || close(fd) != 0) { perror(name); return 1; }
    }
    return 0;
}

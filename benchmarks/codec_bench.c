/* C frame codec throughput: encode N frames of a 1 KiB payload and push every byte through the
 * streaming decoder; prints payload MB/s.  Built and run by benchmarks/bridge_bench.py. */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "jee1_frame.h"

int main(int argc, char **argv)
{
    static uint8_t payload[1024], wire[JF_MAX_ENCODED];
    static jf_decoder d;
    long frames = argc > 1 ? atol(argv[1]) : 100000, i, ok = 0;
    size_t n, j;
    struct timespec t0, t1;
    jf_frame f = {1, 0x20, 0, 0, 7, sizeof payload, payload}, got;
    for (j = 0; j < sizeof payload; j++)
        payload[j] = (uint8_t)(j * 131u + 7u);
    jf_decoder_init(&d);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (i = 0; i < frames; i++) {
        f.seq = (uint16_t)i;
        if (jf_frame_encode(&f, wire, sizeof wire, &n) != JF_OK)
            return 1;
        for (j = 0; j < n; j++)
            ok += jf_decoder_push(&d, wire[j], &got) == JF_FRAME;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (ok != frames)
        return 1;
    printf("%.1f\n", (double)frames * sizeof payload / 1e6 /
                     ((double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9));
    return 0;
}

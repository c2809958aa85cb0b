/* libFuzzer target: any byte stream through the streaming decoder must neither crash nor read out of
 * bounds, and every frame it accepts must encode again. */
#include <string.h>

#include "jee1_frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static jf_decoder d;
    static uint8_t out[JF_MAX_ENCODED];
    jf_frame f;
    size_t i, n;
    jf_decoder_init(&d);
    for (i = 0; i < size; i++) {
        if (jf_decoder_push(&d, data[i], &f) == JF_FRAME && jf_frame_encode(&f, out, sizeof out, &n) != JF_OK)
            __builtin_trap();  /* an accepted frame must always re-encode */
    }
    return 0;
}

/* Checks the C codec against the golden vectors shared with the Python codec. */
#include <stdio.h>
#include <string.h>

#include "jee1_frame.h"

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static long unhex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = 0;
    if (strcmp(s, "-") == 0) return 0;
    while (s[0] && s[1]) {
        int hi = hexval(s[0]), lo = hexval(s[1]);
        if (hi < 0 || lo < 0 || n >= cap) return -1;
        out[n++] = (uint8_t)(hi * 16 + lo);
        s += 2;
    }
    return (long)n;
}

static uint8_t payload[2 * JF_MAX_ENCODED], wire[2 * JF_MAX_ENCODED], mine[2 * JF_MAX_ENCODED];
static char line[4 * (2 * JF_MAX_ENCODED) + 256], name[64], phex[4 * JF_MAX_ENCODED], ehex[4 * JF_MAX_ENCODED];

static int decode_all(const uint8_t *bytes, long n, jf_frame *f)
{
    jf_decoder d;
    long i;
    int rc = 0;
    jf_decoder_init(&d);
    for (i = 0; i < n; i++) {
        rc = jf_decoder_push(&d, bytes[i], f);
        if (rc != 0 && i != n - 1) return -1000;  /* a result before the delimiter is a bug */
    }
    return rc;
}

int main(int argc, char **argv)
{
    FILE *fp;
    int passed = 0, failed = 0;
    if (argc != 2 || (fp = fopen(argv[1], "r")) == NULL) {
        fprintf(stderr, "usage: %s tests/vectors/frames.txt\n", argv[0]);
        return 2;
    }
    while (fgets(line, sizeof line, fp)) {
        unsigned version, type, flags, seq, code;
        unsigned long request_id;
        jf_frame f, got;
        long np, ne;
        size_t n;
        int ok = 0;
        if (sscanf(line, "frame %63s %u %u %u %u %lu %s %s", name, &version, &type, &flags, &seq,
                   &request_id, phex, ehex) == 8) {
            np = unhex(phex, payload, sizeof payload);
            ne = unhex(ehex, wire, sizeof wire);
            f.version = (uint8_t)version; f.type = (uint8_t)type; f.flags = (uint8_t)flags;
            f.seq = (uint16_t)seq; f.request_id = (uint32_t)request_id;
            f.payload_len = (uint16_t)np; f.payload = payload;
            ok = np >= 0 && ne > 0 && jf_frame_encode(&f, mine, sizeof mine, &n) == JF_OK && (long)n == ne
                 && memcmp(mine, wire, n) == 0 && decode_all(wire, ne, &got) == JF_FRAME
                 && got.type == f.type && got.flags == f.flags && got.seq == f.seq
                 && got.request_id == f.request_id && got.payload_len == f.payload_len
                 && memcmp(got.payload, payload, (size_t)np) == 0;
        } else if (sscanf(line, "error %63s %u %s", name, &code, ehex) == 3) {
            ne = unhex(ehex, wire, sizeof wire);
            ok = ne > 0 && decode_all(wire, ne, &got) == -(int)code;
        } else {
            continue;
        }
        if (ok) passed++; else { failed++; fprintf(stderr, "FAIL %s\n", name); }
    }
    fclose(fp);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

/* JEE1 UI link frame codec, protocol version 1 (docs/protocol.md).
 *
 * Portable C99, no dynamic memory: every buffer belongs to the caller and every length is
 * checked.  A frame on the wire is COBS(header | payload | crc32) followed by one 0x00.
 */
#ifndef JEE1_FRAME_H
#define JEE1_FRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define JF_VERSION 1u
#define JF_HEADER_SIZE 12u
#define JF_CRC_SIZE 4u
#define JF_MAX_PAYLOAD 1024u
#define JF_MAX_BODY (JF_HEADER_SIZE + JF_MAX_PAYLOAD + JF_CRC_SIZE)
/* COBS adds one byte per 254 and one more; plus the 0x00 delimiter */
#define JF_MAX_ENCODED (JF_MAX_BODY + JF_MAX_BODY / 254u + 2u)

#define JF_FLAG_MORE 0x01u

typedef enum {
    JF_OK = 0,
    JF_FRAME = 1,              /* jf_decoder_push: a whole frame is in *out */
    JF_ERR_BAD_CRC = -1,
    JF_ERR_BAD_LENGTH = -2,
    JF_ERR_OVERSIZE = -5,
    JF_ERR_BAD_FRAMING = -14,  /* invalid COBS */
    JF_ERR_BUFFER = -100,      /* the caller's output buffer is too small */
    JF_ERR_ARGUMENT = -101
} jf_status;

typedef struct {
    uint8_t version;
    uint8_t type;
    uint8_t flags;
    uint16_t seq;
    uint32_t request_id;
    uint16_t payload_len;
    const uint8_t *payload;    /* encode: caller's bytes; decode: points into the decoder */
} jf_frame;

typedef struct {
    uint8_t buf[JF_MAX_ENCODED];
    size_t len;
    int overflow;
    uint32_t errors;           /* bad frames seen so far */
} jf_decoder;

/* CRC-32/ISO-HDLC: poly 0x04C11DB7 reflected, init 0xFFFFFFFF, xorout 0xFFFFFFFF, check 0xCBF43926 */
uint32_t jf_crc32(const uint8_t *data, size_t len);

/* COBS without the delimiter; return JF_OK and the length in *out_len */
int jf_cobs_encode(const uint8_t *src, size_t len, uint8_t *dst, size_t cap, size_t *out_len);
int jf_cobs_decode(const uint8_t *src, size_t len, uint8_t *dst, size_t cap, size_t *out_len);

/* Whole frame, COBS-encoded and 0x00-terminated, into out[cap]; the header's payload_len is taken
 * from f->payload_len (at most JF_MAX_PAYLOAD). */
int jf_frame_encode(const jf_frame *f, uint8_t *out, size_t cap, size_t *out_len);

void jf_decoder_init(jf_decoder *d);
/* Push one received byte.  Returns 0 while a frame is incomplete, JF_FRAME when the byte completed
 * a valid frame (then *out describes it until the next push), or a negative jf_status when it
 * completed a bad one; the decoder is then ready for the next frame (resynchronised). */
int jf_decoder_push(jf_decoder *d, uint8_t byte, jf_frame *out);

#ifdef __cplusplus
}
#endif
#endif

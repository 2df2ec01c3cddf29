#ifndef TTRV_CZLIB_SHIM_H
#define TTRV_CZLIB_SHIM_H

#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/// Inflates a whole gzip (or zlib) buffer into a malloc'd buffer the caller
/// frees. In C because inflateInit2 is a macro, which Swift cannot call.
/// Returns Z_OK, or a zlib error code (Z_DATA_ERROR for corrupt or truncated data), or
/// TTRV_INFLATE_TOO_LARGE when the output would exceed `limit` bytes (a decompression bomb).
#define TTRV_INFLATE_TOO_LARGE (-100)
static inline int ttrv_inflate(const unsigned char *data, size_t size, size_t limit,
                               unsigned char **out, size_t *outSize) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    *out = NULL;
    *outSize = 0;
    if (inflateInit2(&zs, 15 + 32) != Z_OK) return Z_MEM_ERROR;  // +32: accept gzip or zlib headers
    size_t capacity = size * 4 + 1024, length = 0;
    unsigned char *buf = (unsigned char *)malloc(capacity);
    zs.next_in = (Bytef *)data;
    zs.avail_in = (uInt)size;  // IDX archives are far below 4 GiB
    int rc = Z_OK;
    while (rc == Z_OK) {
        if (!buf) { rc = Z_MEM_ERROR; break; }
        if (length == capacity) {
            if (capacity >= limit) { rc = TTRV_INFLATE_TOO_LARGE; break; }
            capacity = capacity * 2 < limit ? capacity * 2 : limit;
            unsigned char *grown = (unsigned char *)realloc(buf, capacity);
            if (!grown) { rc = Z_MEM_ERROR; break; }
            buf = grown;
        }
        size_t room = capacity - length;
        zs.next_out = buf + length;
        zs.avail_out = (uInt)(room > 0x40000000u ? 0x40000000u : room);
        uInt before = zs.avail_out;
        rc = inflate(&zs, Z_NO_FLUSH);
        length += before - zs.avail_out;
        // Input exhausted before the end of the stream: the file is truncated.
        if (rc == Z_BUF_ERROR || (rc == Z_OK && zs.avail_in == 0 && zs.avail_out != 0)) rc = Z_DATA_ERROR;
    }
    inflateEnd(&zs);
    if (rc != Z_STREAM_END) { free(buf); return rc == Z_OK ? Z_DATA_ERROR : rc; }
    *out = buf;
    *outSize = length;
    return Z_OK;
}

#endif

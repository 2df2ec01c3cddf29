#ifndef TTRV_CPNG_SHIM_H
#define TTRV_CPNG_SHIM_H

#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>

// Decoding lives in C because libpng reports errors by longjmp-ing out of the
// error callback; a longjmp across Swift frames is undefined behaviour. Here the
// setjmp and every libpng call share one C frame, so errors become return codes.
//
// The classic API is used instead of png_image_*: the simplified API applies
// gAMA/sRGB colour conversion and composites alpha in linear light, whereas the
// reference (PIL, torchvision) returns the stored samples untouched. Transforms
// here mirror PIL's convert("RGB"/"L"): palette expanded, alpha and tRNS
// dropped (not composited), 16-bit samples keep their high byte.

typedef struct {
    const unsigned char *data;
    size_t size;
    size_t offset;
    char *err;
    size_t errlen;
} ttrv_png_source;

static void ttrv_png_read(png_structp png, png_bytep dst, png_size_t n) {
    ttrv_png_source *src = (ttrv_png_source *)png_get_io_ptr(png);
    if (n > src->size - src->offset) png_error(png, "unexpected end of file (truncated PNG)");
    memcpy(dst, src->data + src->offset, n);
    src->offset += n;
}

static void ttrv_png_error(png_structp png, png_const_charp msg) {
    ttrv_png_source *src = (ttrv_png_source *)png_get_error_ptr(png);
    if (src->errlen > 0) {
        strncpy(src->err, msg, src->errlen - 1);
        src->err[src->errlen - 1] = 0;
    }
    png_longjmp(png, 1);
}

// Warnings (bad ancillary chunks, unknown profiles) do not affect the pixels.
static void ttrv_png_warning(png_structp png, png_const_charp msg) { (void)png; (void)msg; }

// libpng buffers some chunks (zTXt, iCCP, …) at their declared length before reading them: a
// 41-byte file declaring a 1.9 GB zTXt chunk made it malloc that much (found by make fuzz). So
// every chunk before IEND must fit in the bytes that follow it. Returns 0 when one does not.
static int ttrv_png_chunks_fit(const unsigned char *data, size_t size) {
    size_t pos = 8;
    while (size - pos >= 8) {
        size_t length = (size_t)data[pos] << 24 | (size_t)data[pos + 1] << 16 | (size_t)data[pos + 2] << 8 | data[pos + 3];
        if (length > size - pos - 8 || size - pos - 8 - length < 4) return 0;  // data + CRC
        if (memcmp(data + pos + 4, "IEND", 4) == 0) return 1;
        pos += 12 + length;
    }
    return 1;  // ends between chunks: libpng reports the truncation itself
}

/// Decodes an 8-bit gray (1 channel) or RGB (3 channel) image into a malloc'd
/// HWC buffer that the caller frees. Returns 0 on success, otherwise nonzero
/// with a message in `err`.
static inline int ttrv_png_decode(const unsigned char *data, size_t size, unsigned char **out,
                                  int *width, int *height, int *channels, char *err, size_t errlen) {
    ttrv_png_source src = {data, size, 0, err, errlen};
    *out = NULL;
    if (size < 8 || png_sig_cmp(data, 0, 8) != 0) {
        strncpy(err, "not a PNG signature", errlen - 1);
        err[errlen - 1] = 0;
        return 1;
    }
    if (!ttrv_png_chunks_fit(data, size)) {
        strncpy(err, "truncated or corrupt PNG: a chunk declares more bytes than the file has", errlen - 1);
        err[errlen - 1] = 0;
        return 4;
    }
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, ttrv_png_error, ttrv_png_warning);
    if (!png) return 2;
    png_infop info = png_create_info_struct(png);
    // Written after setjmp and needed on the error path, hence volatile.
    unsigned char *volatile pixels = NULL;
    png_bytep *volatile rows = NULL;
    if (!info || setjmp(png_jmpbuf(png))) {
        free(pixels);
        free(rows);
        png_destroy_read_struct(&png, info ? &info : NULL, NULL);
        return 3;
    }
    png_set_read_fn(png, &src, ttrv_png_read);
    // Bound allocations: a 100-byte file must not be able to ask for gigabytes.
    png_set_user_limits(png, 1 << 15, 1 << 15);
    png_set_chunk_malloc_max(png, 8 << 20);  // decompressed text and profile chunks
    png_read_info(png, info);

    int colorType = png_get_color_type(png, info);
    int bitDepth = png_get_bit_depth(png, info);
    if (colorType == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (colorType == PNG_COLOR_TYPE_GRAY && bitDepth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if (bitDepth == 16) png_set_strip_16(png);
    // Palette expansion also turns tRNS into an alpha channel, so strip in that case too.
    if ((colorType & PNG_COLOR_MASK_ALPHA) || png_get_valid(png, info, PNG_INFO_tRNS)) png_set_strip_alpha(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);

    int w = (int)png_get_image_width(png, info);
    int h = (int)png_get_image_height(png, info);
    int c = png_get_channels(png, info);
    size_t rowBytes = png_get_rowbytes(png, info);
    if ((c != 1 && c != 3) || rowBytes != (size_t)w * c) png_error(png, "unsupported PNG pixel layout");
    if ((size_t)w * h > ((size_t)1 << 26)) png_error(png, "image too large (over 2^26 = 67M pixels)");

    pixels = (unsigned char *)malloc(rowBytes * h);
    rows = (png_bytep *)malloc(sizeof(png_bytep) * h);
    if (!pixels || !rows) png_error(png, "out of memory");
    for (int y = 0; y < h; y++) rows[y] = pixels + (size_t)y * rowBytes;
    png_read_image(png, rows);
    png_read_end(png, NULL);

    free(rows);
    png_destroy_read_struct(&png, &info, NULL);
    *out = pixels;
    *width = w;
    *height = h;
    *channels = c;
    return 0;
}

#endif

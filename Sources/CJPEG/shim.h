#ifndef TTRV_CJPEG_SHIM_H
#define TTRV_CJPEG_SHIM_H

// jpeglib.h uses FILE and size_t without including their headers.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <jpeglib.h>
#include <jerror.h>

// libjpeg's default error_exit calls exit(); the replacement longjmps back to a
// setjmp in the same C frame as every libjpeg call, so no Swift frame is skipped.

typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf jump;
    int truncated;
} ttrv_jpeg_error;

static void ttrv_jpeg_error_exit(j_common_ptr cinfo) {
    longjmp(((ttrv_jpeg_error *)cinfo->err)->jump, 1);
}

// libjpeg only warns on a truncated stream and pads it with grey; PIL rejects
// such files ("image file is truncated"), so remember it and fail afterwards.
// Other warnings (e.g. extraneous bytes before a marker) are benign, as in PIL.
static void ttrv_jpeg_emit_message(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) ((ttrv_jpeg_error *)cinfo->err)->truncated = 1;
}

/// Decodes to 8-bit gray (1 channel) or RGB (3 channels) into a malloc'd HWC
/// buffer that the caller frees. Returns 0 on success, otherwise nonzero with a
/// message in `err`. Decoder settings are libjpeg defaults (ISLOW IDCT, fancy
/// upsampling), the same as PIL's.
static inline int ttrv_jpeg_decode(const unsigned char *data, size_t size, unsigned char **out,
                                   int *width, int *height, int *channels, char *err, size_t errlen) {
    struct jpeg_decompress_struct cinfo;
    ttrv_jpeg_error jerr;
    unsigned char *volatile pixels = NULL;
    unsigned char *volatile cmyk = NULL;
    *out = NULL;
    cinfo.err = jpeg_std_error(&jerr.base);
    jerr.base.error_exit = ttrv_jpeg_error_exit;
    jerr.base.emit_message = ttrv_jpeg_emit_message;
    jerr.truncated = 0;
    if (setjmp(jerr.jump)) {
        char msg[JMSG_LENGTH_MAX];
        jerr.base.format_message((j_common_ptr)&cinfo, msg);
        strncpy(err, msg, errlen - 1);
        err[errlen - 1] = 0;
        jpeg_destroy_decompress(&cinfo);
        free(pixels);
        free(cmyk);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    // A few header bytes can claim 65500 x 65500; refuse before allocating.
    if ((size_t)cinfo.image_width * cinfo.image_height > ((size_t)1 << 26)) {
        strncpy(err, "image too large (over 2^26 = 67M pixels)", errlen - 1);
        err[errlen - 1] = 0;
        jpeg_destroy_decompress(&cinfo);
        return 3;
    }

    // libjpeg cannot convert CMYK/YCCK to RGB itself: read CMYK and convert below.
    int isCMYK = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
    if (isCMYK) cinfo.out_color_space = JCS_CMYK;
    else if (cinfo.num_components == 1) cinfo.out_color_space = JCS_GRAYSCALE;
    else cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);

    int w = (int)cinfo.output_width, h = (int)cinfo.output_height, nc = cinfo.output_components;
    int c = isCMYK ? 3 : nc;
    pixels = (unsigned char *)malloc((size_t)w * h * c);
    if (isCMYK) cmyk = (unsigned char *)malloc((size_t)w * nc);
    if (!pixels || (isCMYK && !cmyk)) ERREXIT(&cinfo, JERR_OUT_OF_MEMORY);
    while (cinfo.output_scanline < cinfo.output_height) {
        unsigned char *row = pixels + (size_t)cinfo.output_scanline * w * c;
        JSAMPROW dst = isCMYK ? cmyk : row;
        jpeg_read_scanlines(&cinfo, &dst, 1);
        // Adobe writes CMYK inverted (as PIL assumes), so RGB = C * K / 255.
        for (int x = 0; isCMYK && x < w; x++) {
            const unsigned char *p = cmyk + x * 4;
            for (int k = 0; k < 3; k++) row[x * 3 + k] = (unsigned char)((p[k] * p[3] + 127) / 255);
        }
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    free(cmyk);
    if (jerr.truncated) {
        free(pixels);
        strncpy(err, "premature end of JPEG data (truncated file)", errlen - 1);
        err[errlen - 1] = 0;
        return 2;
    }
    *out = pixels;
    *width = w;
    *height = h;
    *channels = c;
    return 0;
}

#endif

import CJPEG
import CPNG
import Foundation

/// Errors from loading images; every case names the file so a bad entry in a
/// large dataset can be found.
public enum ImageError: Error, CustomStringConvertible, Equatable {
    case unreadable(path: String, reason: String)
    case notAnImage(path: String)
    case corrupt(path: String, detail: String)

    public var description: String {
        switch self {
        case let .unreadable(path, reason): return "cannot read image file \(path): \(reason)"
        case let .notAnImage(path): return "\(path) is not a PNG or JPEG file (unrecognised header)"
        case let .corrupt(path, detail): return "corrupt image data in \(path): \(detail)"
        }
    }
}

public enum ResizeFilter: Sendable { case nearest, bilinear, bicubic }

/// An 8-bit image, HWC row-major, 1 (gray) or 3 (RGB) channels.
public struct Image: Equatable, Sendable {
    public var width: Int
    public var height: Int
    public var channels: Int
    public var pixels: [UInt8]

    public init(width: Int, height: Int, channels: Int, pixels: [UInt8]) {
        precondition(channels == 1 || channels == 3, "channels must be 1 or 3")
        precondition(width >= 0 && height >= 0 && pixels.count == width * height * channels, "pixel count mismatch")
        self.width = width
        self.height = height
        self.channels = channels
        self.pixels = pixels
    }

    /// Decodes a PNG or JPEG, chosen by magic bytes rather than extension since
    /// datasets routinely mislabel files. Alpha is dropped (not composited),
    /// like PIL's convert("RGB"); 16-bit PNG samples keep their high byte.
    public static func load(_ url: URL) throws -> Image {
        let path = url.path
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            let reason = FileManager.default.fileExists(atPath: path) ? error.localizedDescription : "no such file"
            throw ImageError.unreadable(path: path, reason: reason)
        }
        return try decode(data, name: path)
    }

    /// Decodes in-memory PNG/JPEG bytes; `name` is used in error messages.
    public static func decode(_ data: Data, name: String) throws -> Image {
        let pngMagic: [UInt8] = [0x89, 0x50, 0x4E, 0x47]
        let isPNG = data.starts(with: pngMagic)
        let isJPEG = data.starts(with: [0xFF, 0xD8, 0xFF])
        guard isPNG || isJPEG else { throw ImageError.notAnImage(path: name) }

        var out: UnsafeMutablePointer<UInt8>?
        var w: Int32 = 0, h: Int32 = 0, c: Int32 = 0
        var message = [CChar](repeating: 0, count: 256)
        let rc = data.withUnsafeBytes { raw -> Int32 in
            let base = raw.bindMemory(to: UInt8.self).baseAddress
            return message.withUnsafeMutableBufferPointer { err in
                isPNG
                    ? ttrv_png_decode(base, raw.count, &out, &w, &h, &c, err.baseAddress, err.count)
                    : ttrv_jpeg_decode(base, raw.count, &out, &w, &h, &c, err.baseAddress, err.count)
            }
        }
        guard rc == 0, let out else {
            let detail = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw ImageError.corrupt(path: name, detail: "\(isPNG ? "PNG" : "JPEG"): \(detail.isEmpty ? "decode failed" : detail)")
        }
        defer { free(out) }
        let count = Int(w) * Int(h) * Int(c)
        return Image(width: Int(w), height: Int(h), channels: Int(c),
                     pixels: Array(UnsafeBufferPointer(start: out, count: count)))
    }

    /// Gray replicated into three channels (PIL's convert("RGB")); RGB is returned unchanged.
    public func rgb() -> Image {
        guard channels == 1 else { return self }
        var out = [UInt8](repeating: 0, count: pixels.count * 3)
        for i in 0..<pixels.count {
            out[3 * i] = pixels[i]
            out[3 * i + 1] = pixels[i]
            out[3 * i + 2] = pixels[i]
        }
        return Image(width: width, height: height, channels: 3, pixels: out)
    }

    /// Reproduces Pillow 13's Image.resize bit for bit: separable convolution
    /// whose support widens with the downscale factor (antialiasing), 22-bit
    /// fixed-point weights, and an 8-bit intermediate between the two passes.
    public func resized(width newWidth: Int, height newHeight: Int, filter: ResizeFilter) -> Image {
        precondition(newWidth > 0 && newHeight > 0, "resize target must be positive")
        if newWidth == width && newHeight == height { return self }
        if filter == .nearest { return nearest(newWidth, newHeight) }
        // The intermediate is clipped to 8 bits, so pass order changes results by
        // a few levels. Pillow 13 runs the vertical pass first when the height
        // loses more than twice as many pixels as the width (older Pillow always
        // ran horizontal first); mirror that rule to stay exact.
        let shrinkH = height - newHeight, shrinkW = width - newWidth
        let verticalFirst = shrinkH > 0 && shrinkH > shrinkW * 2
        var image = self
        for horizontal in verticalFirst ? [false, true] : [true, false] {
            let target = horizontal ? newWidth : newHeight
            if target != (horizontal ? image.width : image.height) {
                image = image.convolved(horizontal: horizontal, size: target, filter: filter)
            }
        }
        return image
    }

    /// PIL samples the source pixel containing the output pixel's centre. The
    /// position is accumulated by repeated addition, as Pillow's ImagingScaleAffine
    /// does: where a centre lands exactly on a pixel edge (e.g. 100 → 90 px) the
    /// accumulated rounding error decides the pixel, so a product would disagree.
    private func nearest(_ newWidth: Int, _ newHeight: Int) -> Image {
        func sourceIndices(_ inSize: Int, _ outSize: Int) -> [Int] {
            let step = Double(inSize) / Double(outSize)
            var position = step * 0.5
            return (0..<outSize).map { _ in
                defer { position += step }
                return min(Int(position), inSize - 1)
            }
        }
        let xs = sourceIndices(width, newWidth), ys = sourceIndices(height, newHeight)
        var out = [UInt8](repeating: 0, count: newWidth * newHeight * channels)
        for (y, iy) in ys.enumerated() {
            for (x, ix) in xs.enumerated() {
                for c in 0..<channels {
                    out[(y * newWidth + x) * channels + c] = pixels[(iy * width + ix) * channels + c]
                }
            }
        }
        return Image(width: newWidth, height: newHeight, channels: channels, pixels: out)
    }

    /// One 1-D pass of PIL's ImagingResampleHorizontal/Vertical_8bpc.
    private func convolved(horizontal: Bool, size outSize: Int, filter: ResizeFilter) -> Image {
        let inSize = horizontal ? width : height
        let (bounds, weights, ksize) = resampleCoefficients(inSize: inSize, outSize: outSize, filter: filter)
        let outW = horizontal ? outSize : width, outH = horizontal ? height : outSize
        let ch = channels
        // Stride (in samples) between neighbouring taps along the filtered axis.
        let tapStride = horizontal ? ch : width * ch
        var out = [UInt8](repeating: 0, count: outW * outH * ch)
        pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                weights.withUnsafeBufferPointer { kk in
                    for y in 0..<outH {
                        for x in 0..<outW {
                            let o = horizontal ? x : y
                            let first = bounds[2 * o], taps = bounds[2 * o + 1]
                            let start = horizontal ? (y * width + first) * ch : (first * width + x) * ch
                            let k = o * ksize
                            for c in 0..<ch {
                                var acc: Int32 = 1 << (precisionBits - 1)
                                var i = start + c
                                for t in 0..<taps {
                                    acc &+= Int32(src[i]) &* kk[k + t]
                                    i += tapStride
                                }
                                dst[(y * outW + x) * ch + c] = clip8(acc)
                            }
                        }
                    }
                }
            }
        }
        return Image(width: outW, height: outH, channels: ch, pixels: out)
    }

    /// torchvision CenterCrop: offsets round((size - crop) / 2) half-to-even (Python's
    /// round); a crop larger than the image pads with zeros, (crop - size) // 2 before.
    public func centerCropped(width cropW: Int, height cropH: Int) -> Image {
        precondition(cropW > 0 && cropH > 0, "crop size must be positive")
        func offset(_ size: Int, _ crop: Int) -> Int {
            crop > size ? -((crop - size) / 2) : Int((Double(size - crop) / 2).rounded(.toNearestOrEven))
        }
        let left = offset(width, cropW), top = offset(height, cropH)
        var out = [UInt8](repeating: 0, count: cropW * cropH * channels)
        for y in 0..<cropH where (0..<height).contains(y + top) {
            for x in 0..<cropW where (0..<width).contains(x + left) {
                let s = ((y + top) * width + x + left) * channels, d = (y * cropW + x) * channels
                for c in 0..<channels { out[d + c] = pixels[s + c] }
            }
        }
        return Image(width: cropW, height: cropH, channels: channels, pixels: out)
    }

    /// (x * scale - mean) / std per channel, laid out CHW as models expect.
    /// A single mean/std value applies to every channel.
    public func floatCHW(mean: [Float], std: [Float], scale: Float = 1 / 255) -> [Float] {
        precondition(mean.count == channels || mean.count == 1, "mean needs 1 or \(channels) values")
        precondition(std.count == channels || std.count == 1, "std needs 1 or \(channels) values")
        let plane = width * height
        var out = [Float](repeating: 0, count: plane * channels)
        for c in 0..<channels {
            let m = mean.count == 1 ? mean[0] : mean[c]
            let inv = 1 / (std.count == 1 ? std[0] : std[c])
            for i in 0..<plane { out[c * plane + i] = (Float(pixels[i * channels + c]) * scale - m) * inv }
        }
        return out
    }
}

// MARK: - PIL resampling internals (Pillow src/libImaging/Resample.c)

/// 32 bits minus 8 for the sample and 2 of headroom for negative bicubic lobes.
private let precisionBits: Int32 = 32 - 8 - 2

private func clip8(_ v: Int32) -> UInt8 {
    if v >= (1 << precisionBits) << 8 { return 255 }
    if v <= 0 { return 0 }
    return UInt8(v >> precisionBits)
}

private extension ResizeFilter {
    var support: Double { self == .bicubic ? 2 : 1 }

    func weight(_ x: Double) -> Double {
        let x = abs(x)
        switch self {
        case .nearest: return x < 0.5 ? 1 : 0
        case .bilinear: return x < 1 ? 1 - x : 0
        case .bicubic:
            let a = -0.5  // PIL's choice (Keys); not OpenCV's -0.75
            if x < 1 { return ((a + 2) * x - (a + 3)) * x * x + 1 }
            if x < 2 { return (((x - 5) * x + 8) * x - 4) * a }
            return 0
        }
    }
}

/// For each output index: first input index and tap count (flattened pairs),
/// plus fixed-point weights in rows of `ksize`. Mirrors precompute_coeffs and
/// normalize_coeffs_8bpc, including their rounding, so results match PIL exactly.
private func resampleCoefficients(inSize: Int, outSize: Int, filter: ResizeFilter)
    -> (bounds: [Int], weights: [Int32], ksize: Int)
{
    let scale = Double(inSize) / Double(outSize)
    let filterScale = max(scale, 1)  // widen the kernel only when shrinking
    let invFilterScale = 1 / filterScale  // Pillow multiplies by the reciprocal; dividing can differ in the last bit
    let support = filter.support * filterScale
    let ksize = Int(support.rounded(.up)) * 2 + 1
    var bounds = [Int](repeating: 0, count: outSize * 2)
    var weights = [Int32](repeating: 0, count: outSize * ksize)
    var k = [Double](repeating: 0, count: ksize)
    for o in 0..<outSize {
        let center = (Double(o) + 0.5) * scale
        // C's (int) cast truncates toward zero; kept for bit-exactness.
        let lo = max(Int(center - support + 0.5), 0)
        let taps = min(Int(center + support + 0.5), inSize) - lo
        var total = 0.0
        for t in 0..<taps {
            k[t] = filter.weight((Double(t + lo) - center + 0.5) * invFilterScale)
            total += k[t]
        }
        for t in 0..<taps {
            let w = total != 0 ? k[t] / total : k[t]
            let fixed = w * Double(1 << precisionBits)
            weights[o * ksize + t] = Int32(w < 0 ? fixed - 0.5 : fixed + 0.5)
        }
        bounds[2 * o] = lo
        bounds[2 * o + 1] = taps
    }
    return (bounds, weights, ksize)
}

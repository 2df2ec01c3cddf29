import CZlib
import Foundation

extension Image {
    /// Encodes as an 8-bit PNG (gray or RGB, no filtering, zlib-deflated), for inline
    /// thumbnails in reports. Returns nil only if zlib fails.
    public func pngData() -> Data? {
        // Each scanline is prefixed with its filter type (0 = none).
        let rowBytes = width * channels
        var raw = [UInt8](repeating: 0, count: (rowBytes + 1) * height)
        for y in 0..<height {
            let dst = y * (rowBytes + 1) + 1
            raw[dst..<(dst + rowBytes)] = pixels[(y * rowBytes)..<((y + 1) * rowBytes)]
        }
        var packedLength = compressBound(uLong(raw.count))
        var packed = [UInt8](repeating: 0, count: Int(packedLength))
        let rc = packed.withUnsafeMutableBufferPointer { dst in
            raw.withUnsafeBufferPointer { src in
                compress2(dst.baseAddress, &packedLength, src.baseAddress, uLong(src.count), Z_BEST_COMPRESSION)
            }
        }
        guard rc == Z_OK else { return nil }
        var header = Data()
        header.appendBigEndian(UInt32(width))
        header.appendBigEndian(UInt32(height))
        // bit depth 8; colour type 0 (gray) or 2 (RGB); compression, filter, interlace 0.
        header.append(contentsOf: [8, channels == 1 ? 0 : 2, 0, 0, 0])
        var png = Data([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        png.appendChunk("IHDR", header)
        png.appendChunk("IDAT", Data(packed[0..<Int(packedLength)]))
        png.appendChunk("IEND", Data())
        return png
    }

    /// Scaled so that the longer side is at most `maxSide` (never enlarged), bilinear.
    public func thumbnail(maxSide: Int) -> Image {
        let longer = max(width, height)
        guard longer > maxSide, width > 0, height > 0 else { return self }
        let scale = Double(maxSide) / Double(longer)
        return resized(width: max(1, Int((Double(width) * scale).rounded())),
                       height: max(1, Int((Double(height) * scale).rounded())), filter: .bilinear)
    }
}

private extension Data {
    mutating func appendBigEndian(_ v: UInt32) {
        append(contentsOf: [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)])
    }

    /// length, type, data, CRC-32 of type + data.
    mutating func appendChunk(_ type: String, _ body: Data) {
        appendBigEndian(UInt32(body.count))
        let typed = Data(type.utf8) + body
        append(typed)
        let crc = typed.withUnsafeBytes { raw in
            crc32(0, raw.bindMemory(to: Bytef.self).baseAddress, uInt(raw.count))
        }
        appendBigEndian(UInt32(crc))
    }
}

import CZlib
import Foundation

public enum IDXError: Error, CustomStringConvertible, Equatable {
    case unreadable(path: String, reason: String)
    case malformed(path: String, detail: String)

    public var description: String {
        switch self {
        case let .unreadable(path, reason): return "cannot read IDX file \(path): \(reason)"
        case let .malformed(path, detail): return "malformed IDX file \(path): \(detail)"
        }
    }
}

/// Reader for the IDX format of MNIST / Fashion-MNIST (unsigned-byte data only):
/// magic 00 00 08 <ndim>, ndim big-endian UInt32 dimensions, then the samples.
public struct IDXFile {
    public static func read(_ url: URL) throws -> (shape: [Int], bytes: [UInt8]) {
        let path = url.path
        let raw: Data
        do {
            raw = try Data(contentsOf: url)
        } catch {
            let reason = FileManager.default.fileExists(atPath: path) ? error.localizedDescription : "no such file"
            throw IDXError.unreadable(path: path, reason: reason)
        }
        return try read(data: raw, path: path)
    }

    /// Parses IDX bytes, gzipped or not; `path` names the file in errors.
    public static func read(data: Data, path: String) throws -> (shape: [Int], bytes: [UInt8]) {
        // The magic bytes decide, not the extension: the datasets ship both ways.
        let raw = data.starts(with: [0x1F, 0x8B]) ? try gunzip(data, path: path) : data
        return try parse([UInt8](raw), path: path)
    }

    /// Far above Fashion-MNIST's 47 MB; a few KB of gzip can otherwise claim gigabytes.
    static let maxInflatedBytes = 1 << 30

    static func parse(_ b: [UInt8], path: String) throws -> (shape: [Int], bytes: [UInt8]) {
        func fail(_ detail: String) -> IDXError { .malformed(path: path, detail: detail) }
        guard b.count >= 4 else { throw fail("file is \(b.count) bytes, shorter than the 4-byte header") }
        guard b[0] == 0, b[1] == 0 else { throw fail("bad magic \(b.prefix(4).map { String(format: "%02x", $0) }.joined())") }
        guard b[2] == 0x08 else { throw fail(String(format: "element type 0x%02x is not unsigned byte (0x08)", b[2])) }
        let ndim = Int(b[3])
        guard ndim >= 1 else { throw fail("zero dimensions") }
        let headerSize = 4 + 4 * ndim
        guard b.count >= headerSize else { throw fail("truncated header: \(ndim) dimensions need \(headerSize) bytes, file has \(b.count)") }
        var shape: [Int] = []
        var count = 1
        for d in 0..<ndim {
            let o = 4 + 4 * d
            let n = Int(b[o]) << 24 | Int(b[o + 1]) << 16 | Int(b[o + 2]) << 8 | Int(b[o + 3])
            shape.append(n)
            count = count.multipliedReportingOverflow(by: n).overflow ? Int.max : count * n
        }
        let available = b.count - headerSize
        guard available == count else {
            throw fail("shape \(shape) needs \(count) data bytes but the file has \(available)"
                + (available < count ? " (truncated)" : " (trailing data)"))
        }
        return (shape, Array(b[headerSize...]))
    }

    private static func gunzip(_ data: Data, path: String) throws -> Data {
        var out: UnsafeMutablePointer<UInt8>?
        var size = 0
        let rc = data.withUnsafeBytes { raw in
            ttrv_inflate(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, maxInflatedBytes, &out, &size)
        }
        guard rc != TTRV_INFLATE_TOO_LARGE else {
            throw IDXError.malformed(path: path, detail: "gzip data inflates to more than \(maxInflatedBytes) bytes")
        }
        guard rc == Z_OK, let out else {
            throw IDXError.malformed(path: path, detail: "gzip decompression failed (zlib error \(rc): "
                + (rc == Z_DATA_ERROR ? "corrupt or truncated data)" : "out of memory)"))
        }
        defer { free(out) }
        return Data(bytes: out, count: size)
    }
}

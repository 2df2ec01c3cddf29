import Foundation

// GGUF reader (format v2/v3, little-endian) with dequantisation to Float32.
// Layout facts follow ggml's gguf.cpp / ggml-quants.c and gguf-py's quants.py; the expected
// values in the tests come from gguf-py (scripts/reference/gguf_fixtures.py).

public enum GGUFError: Error, CustomStringConvertible {
    case unreadable(file: String, reason: String)
    case badMagic(file: String, found: [UInt8])
    case unsupportedVersion(file: String, version: UInt32)
    case truncated(file: String, what: String, needed: Int, fileSize: Int)
    case malformed(file: String, reason: String)
    case unsupportedType(file: String, tensor: String, type: String)
    case bufferSize(file: String, tensor: String, expected: Int, got: Int)

    public var description: String {
        switch self {
        case let .unreadable(file, reason):
            return "\(file): cannot read GGUF file: \(reason)"
        case let .badMagic(file, found):
            let hex = found.map { String(format: "%02x", $0) }.joined(separator: " ")
            return "\(file): not a GGUF file (starts with bytes \(hex), expected \"GGUF\")"
        case let .unsupportedVersion(file, version):
            return "\(file): unsupported GGUF version \(version) (supported: 2, 3)"
        case let .truncated(file, what, needed, fileSize):
            return "\(file): file is truncated: \(what) needs \(needed) bytes but the file has \(fileSize)"
        case let .malformed(file, reason):
            return "\(file): malformed GGUF: \(reason)"
        case let .unsupportedType(file, tensor, type):
            return "\(file): tensor '\(tensor)' has type \(type), which cannot be dequantised"
        case let .bufferSize(file, tensor, expected, got):
            return "\(file): tensor '\(tensor)' has \(expected) elements but the output buffer holds \(got)"
        }
    }
}

public enum GGUFValue: Sendable, Equatable {
    case uint8(UInt8), int8(Int8), uint16(UInt16), int16(Int16), uint32(UInt32), int32(Int32)
    case uint64(UInt64), int64(Int64), float32(Float), float64(Double), bool(Bool), string(String)
    case array([GGUFValue])

    /// Any integer case that fits in Int.
    public var int: Int? {
        switch self {
        case let .uint8(v): return Int(v)
        case let .int8(v): return Int(v)
        case let .uint16(v): return Int(v)
        case let .int16(v): return Int(v)
        case let .uint32(v): return Int(v)
        case let .int32(v): return Int(v)
        case let .uint64(v): return Int(exactly: v)
        case let .int64(v): return Int(v)
        default: return nil
        }
    }

    /// Floats and integers alike: writers are not consistent about which they use for e.g. epsilons.
    public var double: Double? {
        switch self {
        case let .float32(v): return Double(v)
        case let .float64(v): return v
        case let .uint64(v): return Double(v)
        default: return int.map(Double.init)
        }
    }

    public var string: String? { if case let .string(s) = self { return s } else { return nil } }
    public var array: [GGUFValue]? { if case let .array(a) = self { return a } else { return nil } }
    public var bool: Bool? { if case let .bool(b) = self { return b } else { return nil } }

    /// nil unless every element converts.
    public var strings: [String]? { array.flatMap { all($0, \.string) } }
    public var ints: [Int]? { array.flatMap { all($0, \.int) } }
    public var floats: [Float]? { array.flatMap { all($0) { $0.double.map(Float.init) } } }

    private func all<T>(_ values: [GGUFValue], _ f: (GGUFValue) -> T?) -> [T]? {
        var out: [T] = []
        out.reserveCapacity(values.count)
        for v in values {
            guard let x = f(v) else { return nil }
            out.append(x)
        }
        return out
    }
}

public enum GGMLType: UInt32, Sendable, CaseIterable {
    case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9
    case q2_K = 10, q3_K = 11, q4_K = 12, q5_K = 13, q6_K = 14, q8_K = 15
    case iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21, iq2_s = 22, iq4_xs = 23
    case i8 = 24, i16 = 25, i32 = 26, i64 = 27, f64 = 28, iq1_m = 29, bf16 = 30
    case tq1_0 = 34, tq2_0 = 35, mxfp4 = 39, nvfp4 = 40, q1_0 = 41

    /// ggml's spelling, as in error messages and gguf-py ("Q4_K", "BF16").
    public var name: String { "\(self)".uppercased() }

    /// (elements per block, bytes per block), from ggml's type traits. Every known type has one,
    /// so tensor sizes can be validated even for types we cannot dequantise.
    public var blockLayout: (elements: Int, bytes: Int) {
        switch self {
        case .f32, .i32: return (1, 4)
        case .f16, .bf16, .i16: return (1, 2)
        case .i8: return (1, 1)
        case .f64, .i64: return (1, 8)
        case .q4_0, .iq4_nl: return (32, 18)
        case .q4_1: return (32, 20)
        case .q5_0: return (32, 22)
        case .q5_1: return (32, 24)
        case .q8_0: return (32, 34)
        case .q8_1: return (32, 40)
        case .mxfp4: return (32, 17)
        case .nvfp4: return (64, 36)
        case .q1_0: return (128, 18)
        case .q2_K: return (256, 84)
        case .q3_K: return (256, 110)
        case .q4_K: return (256, 144)
        case .q5_K: return (256, 176)
        case .q6_K: return (256, 210)
        case .q8_K: return (256, 292)
        case .iq2_xxs: return (256, 66)
        case .iq2_xs: return (256, 74)
        case .iq3_xxs: return (256, 98)
        case .iq1_s: return (256, 50)
        case .iq3_s: return (256, 110)
        case .iq2_s: return (256, 82)
        case .iq4_xs: return (256, 136)
        case .iq1_m: return (256, 56)
        case .tq1_0: return (256, 54)
        case .tq2_0: return (256, 66)
        }
    }
}

public struct GGUFTensorInfo: Sendable, Equatable {
    public let name: String
    /// PyTorch order (GGUF dims reversed): the last dimension is the contiguous one.
    public let shape: [Int]
    public let type: GGMLType
    /// Absolute byte offset in the file.
    public let offset: Int
    public let byteCount: Int
    /// Counted with overflow checks while reading (a dimension of 0 keeps a product of huge ones at 0
    /// in one order and overflows in another).
    public let elementCount: Int
}

public final class GGUFFile: Sendable {
    public let url: URL
    public let version: Int
    public let metadata: [String: GGUFValue]
    /// In file order.
    public let tensors: [GGUFTensorInfo]
    public let alignment: Int
    /// Absolute offset of the tensor data section.
    public let dataOffset: Int

    private let data: Data
    private let index: [String: Int]

    public convenience init(url: URL) throws {
        let data: Data
        do {
            // Mapped, not read: model files are large and we only touch what gets dequantised.
            data = try Data(contentsOf: url, options: .alwaysMapped)
        } catch {
            throw GGUFError.unreadable(file: url.path, reason: error.localizedDescription)
        }
        try self.init(data: data, url: url)
    }

    /// Parses bytes already in memory; `url` only names the file in errors.
    public init(data: Data, url: URL) throws {
        self.url = url
        self.data = data
        let file = url.path
        let header = try data.withUnsafeBytes { try Header(parsing: $0, file: file) }
        version = header.version
        metadata = header.metadata
        tensors = header.tensors
        alignment = header.alignment
        dataOffset = header.dataOffset
        index = header.index
    }

    public func tensor(named name: String) -> GGUFTensorInfo? {
        index[name].map { tensors[$0] }
    }

    /// Row-major in `info.shape`.
    public func dequantize(_ info: GGUFTensorInfo) throws -> [Float] {
        try [Float](unsafeUninitializedCapacity: info.elementCount) { buffer, count in
            try dequantize(info, into: buffer)
            count = info.elementCount
        }
    }

    /// `into` must hold exactly `info.elementCount` floats.
    public func dequantize(_ info: GGUFTensorInfo, into out: UnsafeMutableBufferPointer<Float>) throws {
        let file = url.path
        guard out.count == info.elementCount else {
            throw GGUFError.bufferSize(file: file, tensor: info.name, expected: info.elementCount, got: out.count)
        }
        let (blockElements, blockBytes) = info.type.blockLayout
        let blocks = info.elementCount / blockElements
        // `info` may not come from this file; re-check so a foreign one cannot read out of bounds.
        guard info.offset >= 0, info.byteCount == blocks * blockBytes,
              info.elementCount % blockElements == 0 else {
            throw GGUFError.malformed(file: file, reason: "tensor '\(info.name)' has inconsistent size")
        }
        guard info.offset <= data.count - info.byteCount else {
            throw GGUFError.truncated(file: file, what: "tensor '\(info.name)'",
                                      needed: info.offset + info.byteCount, fileSize: data.count)
        }
        guard let kernel = Dequant.kernel(for: info.type) else {
            throw GGUFError.unsupportedType(file: file, tensor: info.name, type: info.type.name)
        }
        guard blocks > 0, let dst = out.baseAddress else { return }
        data.withUnsafeBytes { raw in
            kernel(raw.baseAddress! + info.offset, dst, blocks)
        }
    }
}

// MARK: - Header parsing

private struct Header {
    var version = 0
    var metadata: [String: GGUFValue] = [:]
    var tensors: [GGUFTensorInfo] = []
    var index: [String: Int] = [:]
    var alignment = 32
    var dataOffset = 0

    init(parsing bytes: UnsafeRawBufferPointer, file: String) throws {
        var r = Cursor(bytes: bytes, file: file)
        let magic = try r.take(4, "magic")
        guard Array(magic) == Array("GGUF".utf8) else { throw GGUFError.badMagic(file: file, found: Array(magic)) }
        // v1 used 32-bit counts and lengths; v2 and v3 share one layout (v3 only added big-endian files).
        let v: UInt32 = try r.read("version")
        guard v == 2 || v == 3 else { throw GGUFError.unsupportedVersion(file: file, version: v) }
        version = Int(v)

        // Smallest possible entries bound the counts, so a corrupt count fails here and not after
        // a huge allocation.
        let tensorCount = try r.count("tensor count", minEntryBytes: 8 + 4 + 4 + 8)
        let kvCount = try r.count("metadata count", minEntryBytes: 8 + 4 + 1)

        metadata.reserveCapacity(kvCount)
        for _ in 0..<kvCount {
            let key = try r.string("metadata key")
            let type: UInt32 = try r.read("type of '\(key)'")
            let value = try r.value(type: type, what: "'\(key)'", depth: 0)
            guard metadata.updateValue(value, forKey: key) == nil else { throw r.malformed("duplicate key '\(key)'") }
        }

        if let a = metadata["general.alignment"] {
            guard let n = a.int, n > 0, n & (n - 1) == 0 else {
                throw r.malformed("general.alignment \(a) is not a power of two")
            }
            alignment = n
        }

        var infos: [(name: String, dims: [Int], type: GGMLType, offset: Int)] = []
        infos.reserveCapacity(tensorCount)
        for _ in 0..<tensorCount {
            let name = try r.string("tensor name")
            let nDims: UInt32 = try r.read("dimension count of '\(name)'")
            guard nDims <= 4 else { throw r.malformed("tensor '\(name)' has \(nDims) dimensions (ggml allows 4)") }
            var dims: [Int] = []
            for _ in 0..<nDims {
                let d: UInt64 = try r.read("dimensions of '\(name)'")
                guard let di = Int(exactly: d) else { throw r.malformed("tensor '\(name)' has dimension \(d)") }
                dims.append(di)
            }
            let rawType: UInt32 = try r.read("type of '\(name)'")
            guard let type = GGMLType(rawValue: rawType) else {
                throw r.malformed("tensor '\(name)' has unknown ggml type id \(rawType)")
            }
            let off: UInt64 = try r.read("offset of '\(name)'")
            guard let offset = Int(exactly: off) else { throw r.malformed("tensor '\(name)' has offset \(off)") }
            infos.append((name, dims, type, offset))
        }

        let (aligned, overflow) = r.pos.addingReportingOverflow(alignment - 1)
        guard !overflow else { throw r.malformed("data section offset overflows") }
        dataOffset = aligned / alignment * alignment

        tensors.reserveCapacity(infos.count)
        for t in infos {
            let (blockElements, blockBytes) = t.type.blockLayout
            var count = 1
            for d in t.dims {
                let (p, o) = count.multipliedReportingOverflow(by: d)
                guard !o else { throw r.malformed("tensor '\(t.name)' has too many elements \(t.dims)") }
                count = p
            }
            guard (t.dims.first ?? 1) % blockElements == 0 else {
                throw r.malformed("tensor '\(t.name)' row length \(t.dims.first ?? 1) is not a multiple of the \(t.type.name) block size \(blockElements)")
            }
            guard t.offset % alignment == 0 else {
                throw r.malformed("tensor '\(t.name)' data offset \(t.offset) is not aligned to \(alignment)")
            }
            let (byteCount, o1) = (count / blockElements).multipliedReportingOverflow(by: blockBytes)
            let (start, o2) = dataOffset.addingReportingOverflow(t.offset)
            let (end, o3) = start.addingReportingOverflow(byteCount)
            guard !o1, !o2, !o3 else { throw r.malformed("tensor '\(t.name)' extent overflows") }
            guard end <= bytes.count else {
                throw GGUFError.truncated(file: file, what: "data of tensor '\(t.name)'", needed: end, fileSize: bytes.count)
            }
            guard index.updateValue(tensors.count, forKey: t.name) == nil else {
                throw r.malformed("duplicate tensor name '\(t.name)'")
            }
            tensors.append(GGUFTensorInfo(name: t.name, shape: t.dims.reversed(), type: t.type,
                                          offset: start, byteCount: byteCount, elementCount: count))
        }
    }
}

/// Bounds-checked little-endian reader over the mapped header.
private struct Cursor {
    let bytes: UnsafeRawBufferPointer
    let file: String
    var pos = 0

    var remaining: Int { bytes.count - pos }

    func malformed(_ reason: String) -> GGUFError { .malformed(file: file, reason: reason) }

    mutating func take(_ n: Int, _ what: @autoclosure () -> String) throws -> UnsafeRawBufferPointer {
        guard n >= 0, n <= remaining else {
            throw GGUFError.truncated(file: file, what: what(), needed: pos &+ n, fileSize: bytes.count)
        }
        defer { pos += n }
        return UnsafeRawBufferPointer(rebasing: bytes[pos..<pos + n])
    }

    mutating func read<T: FixedWidthInteger>(_ what: @autoclosure () -> String) throws -> T {
        let chunk = try take(MemoryLayout<T>.size, what())
        return T(littleEndian: chunk.loadUnaligned(as: T.self))
    }

    /// A u64 count, rejected if even minimal entries could not fit in the rest of the file.
    mutating func count(_ what: String, minEntryBytes: Int) throws -> Int {
        let n: UInt64 = try read(what)
        guard n <= UInt64(remaining / minEntryBytes) else {
            throw malformed("\(what) \(n) cannot fit in the \(remaining) remaining bytes (file truncated or corrupt)")
        }
        return Int(n)
    }

    mutating func string(_ what: @autoclosure () -> String) throws -> String {
        let n: UInt64 = try read("length of \(what())")
        guard n <= UInt64(remaining) else {
            throw GGUFError.truncated(file: file, what: "\(what()) of length \(n)", needed: pos &+ Int(clamping: n), fileSize: bytes.count)
        }
        return String(decoding: try take(Int(n), what()), as: UTF8.self)
    }

    mutating func value(type: UInt32, what: @autoclosure () -> String, depth: Int) throws -> GGUFValue {
        switch type {
        case 0: return .uint8(try read(what()))
        case 1: return .int8(try read(what()))
        case 2: return .uint16(try read(what()))
        case 3: return .int16(try read(what()))
        case 4: return .uint32(try read(what()))
        case 5: return .int32(try read(what()))
        case 6: return .float32(Float(bitPattern: try read(what())))
        case 7:
            let b: UInt8 = try read(what())
            guard b <= 1 else { throw malformed("\(what()) is a bool with byte value \(b)") }
            return .bool(b == 1)
        case 8: return .string(try string(what()))
        case 9:
            // Nesting is legal but a hostile file could recurse until the stack overflows.
            guard depth < 8 else { throw malformed("\(what()) nests arrays more than 8 deep") }
            let elementType: UInt32 = try read("element type of \(what())")
            let minBytes: Int
            switch elementType {
            case 0, 1, 7: minBytes = 1
            case 2, 3: minBytes = 2
            case 4, 5, 6: minBytes = 4
            case 8, 10, 11, 12: minBytes = 8
            case 9: minBytes = 12
            default: throw malformed("\(what()) has unknown array element type \(elementType)")
            }
            let n = try count("element count of \(what())", minEntryBytes: minBytes)
            var items: [GGUFValue] = []
            items.reserveCapacity(n)
            for _ in 0..<n { items.append(try value(type: elementType, what: what(), depth: depth + 1)) }
            return .array(items)
        case 10: return .uint64(try read(what()))
        case 11: return .int64(try read(what()))
        case 12: return .float64(Double(bitPattern: try read(what())))
        default: throw malformed("\(what()) has unknown value type \(type)")
        }
    }
}

// MARK: - Dequantisation kernels
//
// Each kernel turns `blocks` consecutive blocks at `src` into floats at `dst`. Block layouts are
// ggml's (ggml-common.h); the arithmetic keeps ggml's operation order so results match gguf-py
// bit for bit.

private enum Dequant {
    typealias Kernel = (UnsafeRawPointer, UnsafeMutablePointer<Float>, Int) -> Void

    static func kernel(for type: GGMLType) -> Kernel? {
        switch type {
        case .f32: return f32
        case .f16: return f16
        case .bf16: return bf16
        case .q8_0: return q8_0
        case .q4_0: return q4_0
        case .q4_1: return q4_1
        case .q5_0: return q5_0
        case .q5_1: return q5_1
        case .q4_K: return q4_K
        case .q5_K: return q5_K
        case .q6_K: return q6_K
        default: return nil
        }
    }

    @inline(__always) static func u8(_ p: UnsafeRawPointer, _ i: Int) -> UInt8 { p.load(fromByteOffset: i, as: UInt8.self) }

    @inline(__always) static func half(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(Float16(bitPattern: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: i, as: UInt16.self))))
    }

    static func f32(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n {
            dst[i] = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
        }
    }

    static func f16(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { dst[i] = half(src, 2 * i) }
    }

    static func bf16(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n {
            let b = UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
            dst[i] = Float(bitPattern: UInt32(b) << 16)
        }
    }

    // block_q8_0: f16 d, int8 qs[32]
    static func q8_0(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 34 * b, out = dst + 32 * b
            let d = half(blk, 0)
            for j in 0..<32 { out[j] = Float(Int8(bitPattern: u8(blk, 2 + j))) * d }
        }
    }

    // block_q4_0: f16 d, u8 qs[16]; element j is the low nibble of qs[j], element j+16 the high one.
    static func q4_0(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 18 * b, out = dst + 32 * b
            let d = half(blk, 0)
            for j in 0..<16 {
                let q = u8(blk, 2 + j)
                out[j] = Float(Int(q & 0xF) - 8) * d
                out[j + 16] = Float(Int(q >> 4) - 8) * d
            }
        }
    }

    // block_q4_1: f16 d, f16 m, u8 qs[16]
    static func q4_1(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 20 * b, out = dst + 32 * b
            let d = half(blk, 0), m = half(blk, 2)
            for j in 0..<16 {
                let q = u8(blk, 4 + j)
                out[j] = d * Float(q & 0xF) + m
                out[j + 16] = d * Float(q >> 4) + m
            }
        }
    }

    // block_q5_0: f16 d, u32 qh (bit j = 5th bit of element j), u8 qs[16]
    static func q5_0(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 22 * b, out = dst + 32 * b
            let d = half(blk, 0)
            let qh = UInt32(littleEndian: blk.loadUnaligned(fromByteOffset: 2, as: UInt32.self))
            for j in 0..<16 {
                let q = u8(blk, 6 + j)
                let lo = Int(q & 0xF) | Int((qh >> j) & 1) << 4
                let hi = Int(q >> 4) | Int((qh >> (j + 16)) & 1) << 4
                out[j] = Float(lo - 16) * d
                out[j + 16] = Float(hi - 16) * d
            }
        }
    }

    // block_q5_1: f16 d, f16 m, u32 qh, u8 qs[16]
    static func q5_1(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 24 * b, out = dst + 32 * b
            let d = half(blk, 0), m = half(blk, 2)
            let qh = UInt32(littleEndian: blk.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
            for j in 0..<16 {
                let q = u8(blk, 8 + j)
                let lo = UInt32(q & 0xF) | ((qh >> j) & 1) << 4
                let hi = UInt32(q >> 4) | ((qh >> (j + 16)) & 1) << 4
                out[j] = d * Float(lo) + m
                out[j + 16] = d * Float(hi) + m
            }
        }
    }

    /// ggml's get_scale_min_k4: eight 6-bit (scale, min) pairs packed in 12 bytes. Pairs 0-3 are
    /// the low 6 bits of bytes 0-3 / 4-7; pairs 4-7 take their low 4 bits from bytes 8-11 and
    /// their top 2 bits from the spare top bits of bytes 0-3 / 4-7.
    @inline(__always) static func scaleMin(_ s: UnsafeRawPointer, _ j: Int) -> (Float, Float) {
        if j < 4 {
            return (Float(u8(s, j) & 63), Float(u8(s, j + 4) & 63))
        }
        let sc = (u8(s, j + 4) & 0xF) | ((u8(s, j - 4) >> 6) << 4)
        let m = (u8(s, j + 4) >> 4) | ((u8(s, j) >> 6) << 4)
        return (Float(sc), Float(m))
    }

    // block_q4_K: f16 d, f16 dmin, u8 scales[12], u8 qs[128]. Eight sub-blocks of 32; each 32 bytes
    // of qs hold two sub-blocks, low nibbles first.
    static func q4_K(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 144 * b, out = dst + 256 * b
            let d = half(blk, 0), dmin = half(blk, 2)
            let scales = blk + 4, qs = blk + 16
            for c in 0..<4 {
                let (sc1, m1) = scaleMin(scales, 2 * c), (sc2, m2) = scaleMin(scales, 2 * c + 1)
                let d1 = d * sc1, min1 = dmin * m1, d2 = d * sc2, min2 = dmin * m2
                let q = qs + 32 * c, o = out + 64 * c
                for l in 0..<32 {
                    let v = u8(q, l)
                    o[l] = d1 * Float(v & 0xF) - min1
                    o[l + 32] = d2 * Float(v >> 4) - min2
                }
            }
        }
    }

    // block_q5_K: f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]. As q4_K, plus bit i of
    // qh[l] is the 5th bit of element l of sub-block i.
    static func q5_K(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 176 * b, out = dst + 256 * b
            let d = half(blk, 0), dmin = half(blk, 2)
            let scales = blk + 4, qh = blk + 16, qs = blk + 48
            for c in 0..<4 {
                let (sc1, m1) = scaleMin(scales, 2 * c), (sc2, m2) = scaleMin(scales, 2 * c + 1)
                let d1 = d * sc1, min1 = dmin * m1, d2 = d * sc2, min2 = dmin * m2
                let q = qs + 32 * c, o = out + 64 * c
                for l in 0..<32 {
                    let v = u8(q, l), h = u8(qh, l) >> (2 * c)
                    o[l] = d1 * Float((v & 0xF) | (h & 1) << 4) - min1
                    o[l + 32] = d2 * Float((v >> 4) | (h & 2) << 3) - min2
                }
            }
        }
    }

    // block_q6_K: u8 ql[128], u8 qh[64], int8 scales[16], f16 d. Two halves of 128 elements; in
    // each, element p takes 4 low bits from ql (nibble p/64 of byte p%64) and 2 high bits from qh
    // (bit pair p/32 of byte p%32); every 16 elements share a scale.
    static func q6_K(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for b in 0..<blocks {
            let blk = src + 210 * b, out = dst + 256 * b
            let d = half(blk, 208)
            for h in 0..<2 {
                let ql = blk + 64 * h, qh = blk + 128 + 32 * h, sc = blk + 192 + 8 * h
                let o = out + 128 * h
                for l in 0..<32 {
                    let s = l / 16
                    let a = u8(ql, l), c = u8(ql, l + 32), hb = u8(qh, l)
                    let q1 = Int(a & 0xF) | Int(hb & 3) << 4
                    let q2 = Int(c & 0xF) | Int((hb >> 2) & 3) << 4
                    let q3 = Int(a >> 4) | Int((hb >> 4) & 3) << 4
                    let q4 = Int(c >> 4) | Int(hb >> 6) << 4
                    o[l] = d * Float(Int8(bitPattern: u8(sc, s))) * Float(q1 - 32)
                    o[l + 32] = d * Float(Int8(bitPattern: u8(sc, s + 2))) * Float(q2 - 32)
                    o[l + 64] = d * Float(Int8(bitPattern: u8(sc, s + 4))) * Float(q3 - 32)
                    o[l + 96] = d * Float(Int8(bitPattern: u8(sc, s + 6))) * Float(q4 - 32)
                }
            }
        }
    }
}

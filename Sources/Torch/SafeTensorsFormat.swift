import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Pure-Swift safetensors reader/writer working on raw bytes; wrapping into tensors happens elsewhere.
// Format: u64 little-endian header length N, N bytes of JSON header, then the data buffer.
// https://github.com/huggingface/safetensors#format

public enum STDType: String, Sendable, CaseIterable {
    case F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL

    public var byteSize: Int {
        switch self {
        case .F64, .I64: return 8
        case .F32, .I32: return 4
        case .F16, .BF16, .I16: return 2
        case .I8, .U8, .BOOL: return 1
        }
    }
}

public struct SafeTensorsError: Error, CustomStringConvertible, Sendable {
    public let file: String
    public let problem: String

    public init(_ url: URL, _ problem: String) {
        self.file = url.path
        self.problem = problem
    }

    public var description: String { "safetensors \(file): \(problem)" }
}

public struct STEntry: Sendable, Equatable {
    public let name: String
    public let dtype: STDType
    public let shape: [Int]
    /// Absolute byte range in the file.
    public let range: Range<Int>
}

public final class SafeTensorsFile: Sendable {
    public let url: URL
    public let entries: [String: STEntry]
    public let metadata: [String: String]
    private let data: Data

    public var names: [String] { entries.keys.sorted() }

    /// Same ceiling as the reference implementation: a larger header is corrupt, not a big model.
    static let maxHeaderBytes = 100_000_000

    public init(url: URL) throws {
        self.url = url
        let data: Data
        do {
            data = try Data(contentsOf: url, options: .alwaysMapped)
        } catch {
            throw SafeTensorsError(url, "cannot read: \(error.localizedDescription)")
        }
        self.data = data
        (entries, metadata) = try Self.parse(data, url)
    }

    /// Parses bytes already in memory; `url` only names the file in errors.
    public init(data: Data, url: URL) throws {
        self.url = url
        self.data = data
        (entries, metadata) = try Self.parse(data, url)
    }

    public func withBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let entry = entries[name] else {
            throw SafeTensorsError(url, "no tensor named '\(name)'")
        }
        return try data.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[entry.range])) }
    }

    private static func parse(_ data: Data, _ url: URL) throws -> ([String: STEntry], [String: String]) {
        func fail(_ problem: String) -> SafeTensorsError { SafeTensorsError(url, problem) }

        guard data.count >= 8 else {
            throw fail("truncated: \(data.count) bytes, shorter than the 8-byte header length")
        }
        let headerLength = data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard headerLength >= 2, headerLength <= UInt64(maxHeaderBytes) else {
            throw fail("implausible header length \(headerLength) (not a safetensors file?)")
        }
        let bufferStart = 8 + Int(headerLength)
        guard bufferStart <= data.count else {
            throw fail("truncated in the header: it declares \(headerLength) bytes but the file has \(data.count - 8) after the length")
        }

        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: data[8..<bufferStart])
        } catch {
            throw fail("header is not valid JSON: \(error.localizedDescription)")
        }
        guard let header = json as? [String: Any] else { throw fail("header is not a JSON object") }

        var metadata: [String: String] = [:]
        if let raw = header["__metadata__"] {
            guard let dict = raw as? [String: Any] else { throw fail("__metadata__ is not an object") }
            for (key, value) in dict {
                guard let string = value as? String else {
                    throw fail("__metadata__ value for '\(key)' is not a string")
                }
                metadata[key] = string
            }
        }

        let bufferSize = data.count - bufferStart
        var entries: [String: STEntry] = [:]
        var relative: [(name: String, range: Range<Int>)] = []
        for (name, raw) in header where name != "__metadata__" {
            func bad(_ problem: String) -> SafeTensorsError { fail("tensor '\(name)': \(problem)") }
            guard let info = raw as? [String: Any] else { throw bad("entry is not an object") }
            guard let dtypeName = info["dtype"] as? String else { throw bad("missing dtype") }
            guard let dtype = STDType(rawValue: dtypeName) else { throw bad("unsupported dtype '\(dtypeName)'") }
            guard let shape = intArray(info["shape"]), shape.allSatisfy({ $0 >= 0 }) else {
                throw bad("shape is not a list of non-negative integers")
            }
            guard let offsets = intArray(info["data_offsets"]), offsets.count == 2,
                  offsets[0] >= 0, offsets[0] <= offsets[1] else {
                throw bad("data_offsets must be [begin, end] with 0 <= begin <= end")
            }
            // Checked here, before any offset is added to the buffer start.
            guard offsets[1] <= bufferSize else {
                throw bad("data_offsets end at byte \(offsets[1]) but only \(bufferSize) data bytes follow the header (truncated?)")
            }
            let (count, overflow) = shape.reduce((1, false)) { acc, dim in
                let product = acc.0.multipliedReportingOverflow(by: dim)
                return (product.partialValue, acc.1 || product.overflow)
            }
            let (expected, overflow2) = count.multipliedReportingOverflow(by: dtype.byteSize)
            guard !overflow, !overflow2, offsets[1] - offsets[0] == expected else {
                throw bad("data_offsets \(offsets) span \(offsets[1] - offsets[0]) bytes but \(dtype) \(shape) needs \(expected)")
            }
            relative.append((name, offsets[0]..<offsets[1]))
            entries[name] = STEntry(name: name, dtype: dtype, shape: shape,
                                    range: (bufferStart + offsets[0])..<(bufferStart + offsets[1]))
        }

        // The reference reader insists on a gap-free, overlap-free buffer; holding to that lets a
        // short buffer be diagnosed as truncation rather than as a confusing offset error.
        relative.sort { ($0.range.lowerBound, $0.range.upperBound) < ($1.range.lowerBound, $1.range.upperBound) }
        var end = 0
        for (name, range) in relative {
            guard range.lowerBound == end else {
                let what = range.lowerBound < end ? "overlaps the previous tensor" : "leaves a gap after byte \(end)"
                throw fail("tensor '\(name)': data_offsets [\(range.lowerBound), \(range.upperBound)] \(what)")
            }
            end = range.upperBound
        }
        guard end <= bufferSize else {
            throw fail("truncated in the data section: the header describes \(end) data bytes but only \(bufferSize) follow it")
        }
        guard end == bufferSize else {
            throw fail("data section has \(bufferSize) bytes but the header accounts for only \(end)")
        }
        return (entries, metadata)
    }

    private static func intArray(_ value: Any?) -> [Int]? {
        guard let array = value as? [Any] else { return nil }
        var result: [Int] = []
        for element in array {
            // `as? Int` on a JSON number succeeds only when it is exactly an integer.
            guard let int = element as? Int else { return nil }
            result.append(int)
        }
        return result
    }
}

public enum SafeTensorsWriter {
    /// Writes `tensors` in the standard layout, atomically: a temp file in the destination directory
    /// is fsynced and renamed over `url`, so readers never observe a partially written checkpoint.
    ///
    /// JSON keys are sorted. The data buffer starts 8-aligned (header padded with spaces) and
    /// tensors are laid out by descending element size, then name, which keeps every tensor aligned
    /// to its element size without the gaps that the reference reader rejects.
    public static func write(_ tensors: [(name: String, dtype: STDType, shape: [Int], bytes: Data)],
                             metadata: [String: String]?, to url: URL) throws {
        func fail(_ problem: String) -> SafeTensorsError { SafeTensorsError(url, problem) }

        var seen = Set<String>()
        for t in tensors {
            guard t.name != "__metadata__" else { throw fail("'__metadata__' is reserved, not a tensor name") }
            guard seen.insert(t.name).inserted else { throw fail("tensor '\(t.name)' given twice") }
            guard t.shape.allSatisfy({ $0 >= 0 }) else { throw fail("tensor '\(t.name)': negative dimension in \(t.shape)") }
            let expected = t.shape.reduce(1, *) * t.dtype.byteSize
            guard t.bytes.count == expected else {
                throw fail("tensor '\(t.name)': \(t.bytes.count) bytes given but \(t.dtype) \(t.shape) needs \(expected)")
            }
        }

        let layout = tensors.sorted { ($1.dtype.byteSize, $0.name) < ($0.dtype.byteSize, $1.name) }
        var offsets: [String: Range<Int>] = [:]
        var end = 0
        for t in layout {
            offsets[t.name] = end..<(end + t.bytes.count)
            end += t.bytes.count
        }

        var fields: [String] = []
        if let metadata, !metadata.isEmpty {
            let pairs = metadata.keys.sorted().map { "\(jsonString($0)):\(jsonString(metadata[$0]!))" }
            fields.append("\"__metadata__\":{\(pairs.joined(separator: ","))}")
        }
        for t in tensors.sorted(by: { $0.name < $1.name }) {
            let r = offsets[t.name]!
            let shape = t.shape.map(String.init).joined(separator: ",")
            fields.append("\(jsonString(t.name)):{\"dtype\":\"\(t.dtype.rawValue)\",\"shape\":[\(shape)],\"data_offsets\":[\(r.lowerBound),\(r.upperBound)]}")
        }
        var header = Data("{\(fields.joined(separator: ","))}".utf8)
        header.append(contentsOf: repeatElement(UInt8(ascii: " "), count: (8 - header.count % 8) % 8))
        var length = UInt64(header.count).littleEndian
        let prefix = Data(bytes: &length, count: 8)

        try atomicWrite(to: url, chunks: [prefix, header] + layout.map(\.bytes))
    }

    private static func jsonString(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    private static func atomicWrite(to url: URL, chunks: [Data]) throws {
        func fail(_ problem: String) -> SafeTensorsError { SafeTensorsError(url, problem) }
        let directory = url.deletingLastPathComponent()
        let temp = directory.appendingPathComponent(".\(url.lastPathComponent).tmp-\(UUID().uuidString)")

        let fd = open(temp.path, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        guard fd >= 0 else { throw fail("cannot create temp file \(temp.path): \(String(cString: strerror(errno)))") }
        var committed = false
        defer { if !committed { unlink(temp.path) } }
        do {
            defer { close(fd) }
            for chunk in chunks {
                try chunk.withUnsafeBytes { buffer in
                    var done = 0
                    while done < buffer.count {
                        let n = posixWrite(fd, buffer.baseAddress! + done, buffer.count - done)
                        if n < 0 && errno == EINTR { continue }
                        guard n > 0 else { throw fail("write failed: \(String(cString: strerror(errno)))") }
                        done += n
                    }
                }
            }
            guard fsync(fd) == 0 else { throw fail("fsync failed: \(String(cString: strerror(errno)))") }
        }
        guard rename(temp.path, url.path) == 0 else {
            throw fail("cannot rename temp file into place: \(String(cString: strerror(errno)))")
        }
        committed = true
        // Persist the rename itself; failure here cannot un-write the file, so it is not an error.
        let dirfd = open(directory.path, O_RDONLY)
        if dirfd >= 0 { _ = fsync(dirfd); close(dirfd) }
    }
}

/// `write` is shadowed inside `SafeTensorsWriter` by its own static method.
@inline(__always)
private func posixWrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int {
    write(fd, buffer, count)
}

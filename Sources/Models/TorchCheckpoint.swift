import Foundation

// Pure-Swift reader for PyTorch state-dict checkpoints (`torch.save`), both the legacy stream
// format and the zip format. Pickles are interpreted by a small VM that only knows the opcodes
// torch emits and only calls an allow-list of constructors, so a hostile file cannot run code.
// Wrapping the raw results into tensors is the caller's job.

public enum TorchDType: String, Sendable, CaseIterable {
    case float32, float64, float16, bfloat16, int64, int32, int16, int8, uint8, bool

    public var elementSize: Int {
        switch self {
        case .float64, .int64: return 8
        case .float32, .int32: return 4
        case .float16, .bfloat16, .int16: return 2
        case .int8, .uint8, .bool: return 1
        }
    }

    public var isFloatingPoint: Bool { [.float32, .float64, .float16, .bfloat16].contains(self) }

    /// Legacy typed-storage class names, which is how both formats record element types.
    init?(storageClass: String) {
        switch storageClass {
        case "FloatStorage": self = .float32
        case "DoubleStorage": self = .float64
        case "HalfStorage": self = .float16
        case "BFloat16Storage": self = .bfloat16
        case "LongStorage": self = .int64
        case "IntStorage": self = .int32
        case "ShortStorage": self = .int16
        case "CharStorage": self = .int8
        case "ByteStorage": self = .uint8
        case "BoolStorage": self = .bool
        default: return nil
        }
    }
}

public struct TorchCheckpointError: Error, CustomStringConvertible, Sendable {
    /// Path of the checkpoint, nil for problems with an already loaded tensor.
    public let file: String?
    public let problem: String

    public init(file: String?, _ problem: String) {
        self.file = file
        self.problem = problem
    }

    public var description: String {
        file.map { "torch checkpoint \($0): \(problem)" } ?? "torch tensor: \(problem)"
    }
}

public struct TorchTensorData: Sendable {
    public let dtype: TorchDType
    public let shape: [Int]
    public let strides: [Int]
    /// In elements, like torch's `storage_offset()`.
    public let storageOffset: Int
    /// The whole storage (zero-based), possibly shared with other tensors of the checkpoint.
    public let storage: Data

    public var count: Int { shape.reduce(1, *) }

    public var isContiguous: Bool {
        var expected = 1
        for (size, stride) in zip(shape, strides).reversed() where size != 1 {
            if stride != expected { return false }
            expected *= size
        }
        return true
    }

    /// Row-major bytes of the tensor's elements, honouring strides and offset.
    public func contiguousBytes() -> Data {
        let size = dtype.elementSize
        let n = count
        guard n > 0 else { return Data() }
        if isContiguous {
            return storage.withUnsafeBytes { Data($0[(storageOffset * size)..<((storageOffset + n) * size)]) }
        }
        var out = Data(count: n * size)
        out.withUnsafeMutableBytes { dst in
            storage.withUnsafeBytes { src in
                // Odometer over all but the last dimension; the last one is copied as a run when
                // it is dense, element by element otherwise.
                let rank = shape.count
                let inner = shape[rank - 1], innerStride = strides[rank - 1]
                var index = [Int](repeating: 0, count: rank - 1)
                var base = storageOffset
                var written = 0
                while true {
                    if innerStride == 1 {
                        let bytes = inner * size
                        dst.baseAddress!.advanced(by: written).copyMemory(
                            from: src.baseAddress!.advanced(by: base * size), byteCount: bytes)
                        written += bytes
                    } else {
                        for i in 0..<inner {
                            dst.baseAddress!.advanced(by: written).copyMemory(
                                from: src.baseAddress!.advanced(by: (base + i * innerStride) * size), byteCount: size)
                            written += size
                        }
                    }
                    var d = rank - 2
                    while d >= 0 {
                        index[d] += 1
                        base += strides[d]
                        if index[d] < shape[d] { break }
                        base -= strides[d] * shape[d]
                        index[d] = 0
                        d -= 1
                    }
                    if d < 0 { break }
                }
            }
        }
        return out
    }

    /// Elements as Float, row-major; only for floating-point dtypes.
    public func floats() throws -> [Float] {
        let bytes = contiguousBytes()
        return try bytes.withUnsafeBytes { raw -> [Float] in
            let n = count
            switch dtype {
            case .float32:
                return (0..<n).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self))) }
            case .float64:
                return (0..<n).map { Float(Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self)))) }
            case .float16:
                return (0..<n).map { halfToFloat(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self))) }
            case .bfloat16:
                return (0..<n).map { Float(bitPattern: UInt32(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self))) << 16) }
            default:
                throw TorchCheckpointError(file: nil, "floats() needs a floating-point tensor, this one is \(dtype)")
            }
        }
    }
}

/// IEEE half to single by bit manipulation: Swift's Float16 is unavailable on some platforms.
func halfToFloat(_ h: UInt16) -> Float {
    let sign = UInt32(h & 0x8000) << 16
    var exponent = Int(h >> 10) & 0x1f
    var mantissa = UInt32(h & 0x3ff)
    if exponent == 0x1f {
        return Float(bitPattern: sign | 0x7f80_0000 | (mantissa << 13))
    }
    if exponent == 0 {
        if mantissa == 0 { return Float(bitPattern: sign) }
        // Subnormal half: normalise it, since every half subnormal is a normal float.
        exponent = 1
        while mantissa & 0x400 == 0 {
            mantissa <<= 1
            exponent -= 1
        }
        mantissa &= 0x3ff
    }
    return Float(bitPattern: sign | (UInt32(exponent + 112) << 23) | (mantissa << 13))
}

public enum TorchCheckpoint {
    /// Loads the state dict of `url`. A top-level dict holding the real state dict under
    /// "state_dict" or "model" (training checkpoints) is unwrapped; entries that are not tensors
    /// (nested dicts, numbers, strings) are skipped.
    public static func load(_ url: URL) throws -> [String: TorchTensorData] {
        let data: Data
        do {
            data = try Data(contentsOf: url, options: .alwaysMapped)
        } catch {
            throw TorchCheckpointError(file: url.path, "cannot read: \(error.localizedDescription)")
        }
        return try load(data: data, url: url)
    }

    /// Parses checkpoint bytes; `url` only names the file in errors.
    public static func load(data: Data, url: URL) throws -> [String: TorchTensorData] {
        let reader = TorchCheckpointReader(url: url, data: data)
        let isZip = data.count >= 4 && data.prefix(4).elementsEqual([0x50, 0x4b, 0x03, 0x04])
        let (root, storages) = try isZip ? reader.loadZip() : reader.loadLegacy()
        return try reader.stateDict(root, storages)
    }

    /// Runs the pickle VM alone over a bare `data.pkl` stream, every storage empty; the fuzzing
    /// entry point for the VM, which otherwise sits behind the zip or legacy framing.
    public static func checkPickle(data: Data, url: URL) throws -> Int {
        let reader = TorchCheckpointReader(url: url, data: data)
        var pos = 0
        var keys: Set<String> = []
        let root = try reader.unpickle(at: &pos) { keys.insert($0.key) }
        let storages = Dictionary(uniqueKeysWithValues: keys.map { ($0, Data()) })
        return try reader.stateDict(root, storages).count
    }
}

// MARK: - Formats

private let legacyMagic: [UInt8] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]  // 0x1950a86a20f9469cfc6c
private let legacyProtocolVersion = 1001

struct TorchCheckpointReader {
    let url: URL
    let data: Data

    func fail(_ problem: String) -> TorchCheckpointError { TorchCheckpointError(file: url.path, problem) }

    /// Legacy stream: magic, protocol version, sys info, the object, the storage keys, then per
    /// key a u64 element count and the raw storage bytes.
    func loadLegacy() throws -> (PickleValue, [String: Data]) {
        var pos = 0
        let magic: PickleValue
        do {
            magic = try unpickle(at: &pos)
        } catch {
            throw fail("bad magic: not a PyTorch checkpoint (\((error as? TorchCheckpointError)?.problem ?? "\(error)"))")
        }
        guard case .bigInt(let bytes) = magic, bytes == legacyMagic else {
            throw fail("bad magic: not a PyTorch checkpoint")
        }
        guard case .int(let version) = try unpickle(at: &pos), version == legacyProtocolVersion else {
            throw fail("unsupported legacy protocol version (expected \(legacyProtocolVersion))")
        }
        if case .dict(let info) = try unpickle(at: &pos), case .bool(false)? = info[.string("little_endian")] {
            throw fail("big-endian checkpoints are not supported")
        }
        var referenced: [String: PickledStorage] = [:]
        let root = try unpickle(at: &pos) { referenced[$0.key] = $0 }
        guard case .list(let keyList) = try unpickle(at: &pos) else { throw fail("storage key list missing") }

        var storages: [String: Data] = [:]
        for item in keyList.items {
            guard case .string(let key) = item else { throw fail("storage key is not a string") }
            guard let ref = referenced[key] else { throw fail("storage '\(key)' is listed but no tensor uses it") }
            guard pos + 8 <= data.count else { throw fail("truncated: storage '\(key)' header at offset \(pos) is past the end") }
            let numel = Int(truncatingIfNeeded: readLE(UInt64.self, at: pos))
            let (bytes, overflow) = numel.multipliedReportingOverflow(by: ref.dtype.elementSize)
            pos += 8
            guard !overflow, numel >= 0, bytes <= data.count - pos else {
                throw fail("truncated: storage '\(key)' needs \(numel) \(ref.dtype) elements at offset \(pos) but the file has \(data.count) bytes")
            }
            storages[key] = data.withUnsafeBytes { Data($0[pos..<(pos + bytes)]) }
            pos += bytes
        }
        return (root, storages)
    }

    /// Zip format: `<dir>/data.pkl` is the object and `<dir>/data/<key>` each storage.
    func loadZip() throws -> (PickleValue, [String: Data]) {
        let zip = try ZipDirectory(data: data, fail: fail)
        let pickles = zip.entries.keys.filter { $0 == "data.pkl" || $0.hasSuffix("/data.pkl") }
        guard pickles.count == 1, let pickleName = pickles.first else {
            throw fail("zip archive has \(pickles.count) data.pkl entries, expected one")
        }
        let prefix = String(pickleName.dropLast("data.pkl".count))
        if let order = zip.entries[prefix + "byteorder"] {
            let range = try zip.range(of: order)
            guard data.withUnsafeBytes({ String(decoding: $0[range], as: UTF8.self) }) == "little" else {
                throw fail("big-endian checkpoints are not supported")
            }
        }

        var referenced: [String: PickledStorage] = [:]
        var pos = try zip.range(of: zip.entries[pickleName]!).lowerBound
        let root = try unpickle(at: &pos) { referenced[$0.key] = $0 }

        var storages: [String: Data] = [:]
        for (key, ref) in referenced {
            guard let entry = zip.entries[prefix + "data/" + key] else { throw fail("storage '\(key)' missing from the archive") }
            let range = try zip.range(of: entry)
            let (bytes, overflow) = ref.numel.multipliedReportingOverflow(by: ref.dtype.elementSize)
            guard !overflow, range.count == bytes else {
                throw fail("storage '\(key)' has \(range.count) bytes, expected \(ref.numel) \(ref.dtype) elements")
            }
            storages[key] = data.withUnsafeBytes { Data($0[range]) }
        }
        return (root, storages)
    }

    func stateDict(_ root: PickleValue, _ storages: [String: Data]) throws -> [String: TorchTensorData] {
        guard case .dict(var dict) = root else { throw fail("top-level object is not a dict") }
        for wrapper in ["state_dict", "model"] {
            if case .dict(let inner)? = dict[.string(wrapper)] {
                dict = inner
                break
            }
        }
        var result: [String: TorchTensorData] = [:]
        for (key, value) in dict.items {
            guard case .string(let name) = key, case .tensor(let t) = value else { continue }
            guard let storage = storages[t.storage.key] else { throw fail("tensor '\(name)': storage '\(t.storage.key)' has no data") }
            try checkBounds(name, t, storageElements: storage.count / t.storage.dtype.elementSize)
            result[name] = TorchTensorData(dtype: t.storage.dtype, shape: t.shape, strides: t.strides,
                                           storageOffset: t.offset, storage: storage)
        }
        return result
    }

    /// A corrupt shape/stride must surface here, not as an out-of-bounds read in contiguousBytes().
    private func checkBounds(_ name: String, _ t: PickledTensor, storageElements: Int) throws {
        guard t.shape.count == t.strides.count, t.offset >= 0,
              t.shape.allSatisfy({ $0 >= 0 }), t.strides.allSatisfy({ $0 >= 0 }) else {
            throw fail("tensor '\(name)': invalid shape \(t.shape) / strides \(t.strides) / offset \(t.offset)")
        }
        var count = 1
        for size in t.shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: size)
            guard !overflow else { throw fail("tensor '\(name)': shape \(t.shape) has too many elements") }
            count = product
        }
        // Zero or overlapping strides could make a few stored bytes expand into terabytes.
        guard count <= storageElements else {
            throw fail("tensor '\(name)': shape \(t.shape) has \(count) elements but its storage only \(storageElements) (overlapping views are refused)")
        }
        guard count > 0 else { return }
        var last = t.offset
        for (size, stride) in zip(t.shape, t.strides) {
            let (span, o1) = (size - 1).multipliedReportingOverflow(by: stride)
            let (sum, o2) = last.addingReportingOverflow(span)
            guard !o1, !o2 else { throw fail("tensor '\(name)': shape/strides overflow") }
            last = sum
        }
        guard last < storageElements else {
            throw fail("tensor '\(name)': shape \(t.shape) strides \(t.strides) offset \(t.offset) reach past its storage of \(storageElements) elements")
        }
    }

    func unpickle(at pos: inout Int, persistent: ((PickledStorage) -> Void)? = nil) throws -> PickleValue {
        try data.withUnsafeBytes { bytes in
            var machine = PickleMachine(bytes: bytes, pos: pos, fail: fail, onStorage: persistent)
            let value = try machine.run()
            pos = machine.pos
            return value
        }
    }

    func readLE<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        data.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}

/// Just enough of the zip central directory (incl. zip64, which torch always writes) to find
/// uncompressed ("stored") entries; torch never compresses, so anything else is refused.
struct ZipDirectory {
    struct Entry { let name: String; let method: UInt16; let size: Int; let compressedSize: Int; let headerOffset: Int }

    let data: Data
    let fail: (String) -> TorchCheckpointError
    private(set) var entries: [String: Entry] = [:]

    init(data: Data, fail: @escaping (String) -> TorchCheckpointError) throws {
        self.data = data
        self.fail = fail
        let eocdMinimum = 22
        guard data.count >= eocdMinimum else { throw fail("truncated zip: \(data.count) bytes") }
        var eocd = -1
        for offset in stride(from: data.count - eocdMinimum, through: max(0, data.count - eocdMinimum - 0xffff), by: -1)
        where u32(offset) == 0x0605_4b50 {
            eocd = offset
            break
        }
        guard eocd >= 0 else { throw fail("truncated zip: end-of-central-directory record not found") }
        var count = Int(u16(eocd + 10)), directoryOffset = Int(u32(eocd + 16))
        if count == 0xffff || directoryOffset == 0xffff_ffff {
            let locator = eocd - 20
            guard locator >= 0, u32(locator) == 0x0706_4b50 else { throw fail("corrupt zip: zip64 locator missing") }
            let record = Int(truncatingIfNeeded: u64(locator + 8))
            guard record >= 0, record <= data.count - 56, u32(record) == 0x0606_4b50 else {
                throw fail("truncated zip: zip64 end-of-central-directory record missing")
            }
            count = Int(truncatingIfNeeded: u64(record + 32))
            directoryOffset = Int(truncatingIfNeeded: u64(record + 48))
        }

        // Every entry takes at least 46 bytes, so a larger count is corrupt, not a big archive.
        guard count >= 0, count <= data.count / 46, directoryOffset >= 0 else {
            throw fail("corrupt zip: central directory claims \(count) entries at offset \(directoryOffset)")
        }
        var p = directoryOffset
        for _ in 0..<count {
            guard p >= 0, p <= data.count - 46, u32(p) == 0x0201_4b50 else {
                throw fail("truncated zip: central directory entry at offset \(p) is damaged")
            }
            let nameLength = Int(u16(p + 28)), extraLength = Int(u16(p + 30)), commentLength = Int(u16(p + 32))
            guard p + 46 + nameLength + extraLength <= data.count else { throw fail("truncated zip: central directory") }
            let name = data.withUnsafeBytes { String(decoding: $0[(p + 46)..<(p + 46 + nameLength)], as: UTF8.self) }
            var compressed = Int(u32(p + 20)), size = Int(u32(p + 24)), header = Int(u32(p + 42))
            // Zip64 extra field: 64-bit values for exactly those fields that hold 0xffffffff.
            var e = p + 46 + nameLength
            let extraEnd = e + extraLength
            while e + 4 <= extraEnd {
                let id = u16(e), length = Int(u16(e + 2))
                if id == 1 {
                    var q = e + 4
                    func next(_ value: inout Int) {
                        if value == 0xffff_ffff, q + 8 <= e + 4 + length {
                            value = Int(truncatingIfNeeded: u64(q))
                            q += 8
                        }
                    }
                    next(&size)
                    next(&compressed)
                    next(&header)
                }
                e += 4 + length
            }
            entries[name] = Entry(name: name, method: u16(p + 10), size: size, compressedSize: compressed, headerOffset: header)
            p = extraEnd + commentLength
        }
    }

    func range(of entry: Entry) throws -> Range<Int> {
        guard entry.method == 0 else {
            throw fail("zip entry '\(entry.name)' is compressed (method \(entry.method)); only stored entries are supported")
        }
        let h = entry.headerOffset
        guard h >= 0, h <= data.count - 30, u32(h) == 0x0403_4b50 else {
            throw fail("truncated zip: local header of '\(entry.name)' at offset \(h) is damaged")
        }
        let start = h + 30 + Int(u16(h + 26)) + Int(u16(h + 28))
        guard entry.size >= 0, start <= data.count, entry.size <= data.count - start else {
            throw fail("truncated zip: '\(entry.name)' needs \(entry.size) bytes from offset \(start), file has \(data.count)")
        }
        return start..<(start + entry.size)
    }

    private func u16(_ o: Int) -> UInt16 { data.withUnsafeBytes { UInt16(littleEndian: $0.loadUnaligned(fromByteOffset: o, as: UInt16.self)) } }
    private func u32(_ o: Int) -> UInt32 { data.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: o, as: UInt32.self)) } }
    private func u64(_ o: Int) -> UInt64 { data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: o, as: UInt64.self)) } }
}

// MARK: - Pickle VM

struct PickledStorage { let key: String; let dtype: TorchDType; let numel: Int }
struct PickledTensor { let storage: PickledStorage; let offset: Int; let shape: [Int]; let strides: [Int] }

/// The only callables a checkpoint may name. Everything else is rejected at GLOBAL time.
enum PickleGlobal: Equatable {
    case orderedDict, rebuildTensor, rebuildTensorV2, rebuildParameter, rebuildParameterWithState, torchSize
    case storageClass(TorchDType)

    init?(module: String, name: String) {
        switch (module, name) {
        case ("collections", "OrderedDict"): self = .orderedDict
        case ("torch._utils", "_rebuild_tensor"): self = .rebuildTensor
        case ("torch._utils", "_rebuild_tensor_v2"): self = .rebuildTensorV2
        case ("torch._utils", "_rebuild_parameter"): self = .rebuildParameter
        case ("torch._utils", "_rebuild_parameter_with_state"): self = .rebuildParameterWithState
        case ("torch", "Size"): self = .torchSize
        case ("torch", _):
            guard let dtype = TorchDType(storageClass: name) else { return nil }
            self = .storageClass(dtype)
        default: return nil
        }
    }
}

/// Deeper than any checkpoint nests; it bounds the recursion that freeing a value takes, so a
/// million-deep pickled tuple is refused instead of overflowing the stack when it is released.
let pickleMaxDepth = 100

/// Lists and dicts may only grow while on the stack top, before anything contains them (which is
/// how pickle writes a tree); this keeps recorded depths exact and makes cycles impossible.
class PickleContainer {
    var depth = 1
    var nested = false
}

final class PickleList: PickleContainer { var items: [PickleValue] = [] }

final class PickleDict: PickleContainer {
    enum Key: Hashable { case string(String), int(Int) }
    private(set) var items: [(key: PickleValue, value: PickleValue)] = []
    private var index: [Key: Int] = [:]

    subscript(key: Key) -> PickleValue? { index[key].map { items[$0].value } }

    func set(_ key: PickleValue, _ value: PickleValue) {
        let hashable: Key? = switch key {
        case .string(let s): .string(s)
        case .int(let i): .int(i)
        default: nil
        }
        if let hashable, let existing = index[hashable] {
            items[existing].value = value
        } else {
            if let hashable { index[hashable] = items.count }
            items.append((key, value))
        }
    }
}

indirect enum PickleValue {
    case none, bool(Bool), int(Int), float(Double), string(String), bytes([UInt8])
    /// Little-endian two's complement, for integers wider than 64 bits (the legacy magic).
    case bigInt([UInt8])
    case tuple([PickleValue], depth: Int), list(PickleList), dict(PickleDict)
    case global(PickleGlobal), storage(PickledStorage), tensor(PickledTensor)

    var depth: Int {
        switch self {
        case .tuple(_, let depth): depth
        case .list(let l): l.depth
        case .dict(let d): d.depth
        default: 0
        }
    }

    var container: PickleContainer? {
        switch self {
        case .list(let l): l
        case .dict(let d): d
        default: nil
        }
    }

    var describe: String {
        switch self {
        case .none: "None"
        case .bool: "bool"
        case .int: "int"
        case .float: "float"
        case .string: "str"
        case .bytes: "bytes"
        case .bigInt: "long"
        case .tuple: "tuple"
        case .list: "list"
        case .dict: "dict"
        case .global(let g): "\(g)"
        case .storage: "storage"
        case .tensor: "tensor"
        }
    }
}

struct PickleMachine {
    let bytes: UnsafeRawBufferPointer
    var pos: Int
    let fail: (String) -> TorchCheckpointError
    /// Nil where no persistent ids may occur (the legacy header pickles).
    let onStorage: ((PickledStorage) -> Void)?

    private var stack: [PickleValue] = []
    private var marks: [Int] = []
    private var memo: [Int: PickleValue] = [:]

    init(bytes: UnsafeRawBufferPointer, pos: Int, fail: @escaping (String) -> TorchCheckpointError,
         onStorage: ((PickledStorage) -> Void)?) {
        self.bytes = bytes
        self.pos = pos
        self.fail = fail
        self.onStorage = onStorage
    }

    mutating func run() throws -> PickleValue {
        while true {
            let at = pos
            let op = try byte()
            switch op {
            case 0x80: _ = try byte()                                   // PROTO
            // FRAME: framing is irrelevant when all bytes are present. Skipped, not read: Swift 6.3's -O
            // frees a discarded `Array(slice)` before copying into it (heap corruption, seen by ASan/valgrind).
            case 0x95: try skip(8)
            case 0x2e:                                                  // STOP
                guard stack.count == 1, marks.isEmpty else { throw fail("malformed pickle: STOP at offset \(at) with \(stack.count) values on the stack") }
                return stack[0]
            case 0x7d: stack.append(.dict(PickleDict()))                     // EMPTY_DICT
            case 0x5d: stack.append(.list(PickleList()))                     // EMPTY_LIST
            case 0x29: stack.append(.tuple([], depth: 1))               // EMPTY_TUPLE
            case 0x28: marks.append(stack.count)                        // MARK
            case 0x4e: stack.append(.none)                              // NONE
            case 0x88: stack.append(.bool(true))                        // NEWTRUE
            case 0x89: stack.append(.bool(false))                       // NEWFALSE
            case 0x4b: stack.append(.int(Int(try byte())))              // BININT1
            case 0x4d: stack.append(.int(Int(try uint(2))))             // BININT2
            case 0x4a: stack.append(.int(Int(Int32(truncatingIfNeeded: try uint(4)))))  // BININT
            case 0x8a: stack.append(try long(Int(try byte())))          // LONG1
            case 0x8b: stack.append(try long(try length(4)))            // LONG4
            case 0x47: stack.append(.float(Double(bitPattern: UInt64(bigEndian: try raw(8))))) // BINFLOAT
            case 0x58: stack.append(.string(try utf8(try length(4))))   // BINUNICODE
            case 0x8c: stack.append(.string(try utf8(Int(try byte())))) // SHORT_BINUNICODE
            case 0x8d: stack.append(.string(try utf8(try length(8))))   // BINUNICODE8
            // Python 2 str: torch's py2-era checkpoints use it for keys; treat as text.
            case 0x55: stack.append(.string(try utf8(Int(try byte())))) // SHORT_BINSTRING
            case 0x54: stack.append(.string(try utf8(try length(4))))   // BINSTRING
            case 0x43: stack.append(.bytes(try take(Int(try byte())))) // SHORT_BINBYTES
            case 0x42: stack.append(.bytes(try take(try length(4))))    // BINBYTES
            case 0x8e: stack.append(.bytes(try take(try length(8))))    // BINBYTES8
            case 0x71: memo[Int(try byte())] = try top(at)              // BINPUT
            case 0x72: memo[try length(4)] = try top(at)                // LONG_BINPUT
            case 0x94: memo[memo.count] = try top(at)                   // MEMOIZE
            case 0x68: stack.append(try recall(Int(try byte()), at))    // BINGET
            case 0x6a: stack.append(try recall(try length(4), at))      // LONG_BINGET
            case 0x30: _ = try pop(at)                                  // POP
            case 0x31: try dropMark(at)                                 // POP_MARK
            case 0x32: stack.append(try top(at))                        // DUP
            case 0x74: stack.append(try tuple(try popMark(at), at))     // TUPLE
            case 0x85: stack.append(try tuple(try pop(1, at), at))      // TUPLE1
            case 0x86: stack.append(try tuple(try pop(2, at), at))      // TUPLE2
            case 0x87: stack.append(try tuple(try pop(3, at), at))      // TUPLE3
            case 0x61:                                                  // APPEND
                let items = [try pop(at)]
                try grow(try list(at), with: items, at).items.append(contentsOf: items)
            case 0x65:                                                  // APPENDS
                let items = try popMark(at)
                try grow(try list(at), with: items, at).items.append(contentsOf: items)
            case 0x73:                                                  // SETITEM
                let pair = try pop(2, at)
                try grow(try dict(at), with: pair, at).set(pair[0], pair[1])
            case 0x75:                                                  // SETITEMS
                let items = try popMark(at)
                guard items.count % 2 == 0 else { throw fail("malformed pickle: odd SETITEMS at offset \(at)") }
                let target = try grow(try dict(at), with: items, at)
                for i in stride(from: 0, to: items.count, by: 2) { target.set(items[i], items[i + 1]) }
            case 0x63:                                                  // GLOBAL
                let module = try line(), name = try line()
                stack.append(.global(try global(module, name, at)))
            case 0x93:                                                  // STACK_GLOBAL
                let pair = try pop(2, at)
                guard case .string(let module) = pair[0], case .string(let name) = pair[1] else {
                    throw fail("malformed pickle: STACK_GLOBAL at offset \(at) needs two strings")
                }
                stack.append(.global(try global(module, name, at)))
            case 0x52, 0x81:                                            // REDUCE, NEWOBJ
                let args = try pop(at), callable = try pop(at)
                guard case .global(let g) = callable, case .tuple(let a, _) = args else {
                    throw fail("malformed pickle: cannot call \(callable.describe) at offset \(at)")
                }
                stack.append(try call(g, a, at))
            case 0x62:                                                  // BUILD
                // Only a state dict's attributes (`_metadata`) legitimately reach here; they carry
                // no tensor data, so they are dropped rather than applied.
                _ = try pop(at)
                guard case .dict = try top(at) else {
                    throw fail("refused: BUILD on a \(try top(at).describe) at offset \(at) (only a state dict may take attributes)")
                }
            case 0x51:                                                  // BINPERSID
                stack.append(try persistentLoad(try pop(at), at))
            default:
                throw fail("unknown or unsupported pickle opcode 0x\(String(op, radix: 16)) at offset \(at)")
            }
        }
    }

    private func global(_ module: String, _ name: String, _ at: Int) throws -> PickleGlobal {
        guard let g = PickleGlobal(module: module, name: name) else {
            throw fail("disallowed global \(module).\(name) at offset \(at)")
        }
        return g
    }

    private func call(_ g: PickleGlobal, _ args: [PickleValue], _ at: Int) throws -> PickleValue {
        switch (g, args.count) {
        case (.orderedDict, 0):
            return .dict(PickleDict())
        case (.torchSize, 1):
            return args[0]
        case (.rebuildTensor, 4), (.rebuildTensorV2, 6...7):
            // (storage, storage_offset, size, stride[, requires_grad, backward_hooks[, metadata]])
            guard case .storage(let storage) = args[0], case .int(let offset) = args[1],
                  let shape = ints(args[2]), let strides = ints(args[3]) else {
                throw fail("malformed pickle: bad tensor arguments at offset \(at)")
            }
            return .tensor(PickledTensor(storage: storage, offset: offset, shape: shape, strides: strides))
        case (.rebuildParameter, 3), (.rebuildParameterWithState, 4):
            guard case .tensor = args[0] else { throw fail("malformed pickle: parameter without tensor at offset \(at)") }
            return args[0]
        default:
            throw fail("malformed pickle: cannot call \(g) with \(args.count) arguments at offset \(at)")
        }
    }

    /// Torch's persistent id for storages: ('storage', storage_class, key, location, numel[, view_metadata]).
    private func persistentLoad(_ pid: PickleValue, _ at: Int) throws -> PickleValue {
        guard let onStorage else { throw fail("unexpected persistent id at offset \(at)") }
        guard case .tuple(let t, _) = pid, t.count == 5 || t.count == 6, case .string("storage") = t[0],
              case .global(.storageClass(let dtype)) = t[1], case .int(let numel) = t[4] else {
            throw fail("unsupported persistent id at offset \(at)")
        }
        let key: String
        switch t[2] {
        case .string(let s): key = s
        case .int(let i): key = String(i)
        default: throw fail("unsupported storage key at offset \(at)")
        }
        if t.count == 6 {
            guard case .none = t[5] else { throw fail("storage views (pre-1.0 checkpoints) are not supported, at offset \(at)") }
        }
        let ref = PickledStorage(key: key, dtype: dtype, numel: numel)
        onStorage(ref)
        return .storage(ref)
    }

    private func ints(_ value: PickleValue) -> [Int]? {
        guard case .tuple(let items, _) = value else { return nil }
        var out: [Int] = []
        for item in items {
            guard case .int(let i) = item else { return nil }
            out.append(i)
        }
        return out
    }

    // Nesting

    private func tuple(_ items: [PickleValue], _ at: Int) throws -> PickleValue {
        .tuple(items, depth: try nest(items, below: 1, at))
    }

    /// Checks that `target` may take `items`, records its new depth and returns it.
    private func grow<C: PickleContainer>(_ target: C, with items: [PickleValue], _ at: Int) throws -> C {
        guard !target.nested, !items.contains(where: { $0.container === target }) else {
            throw fail("refused: pickle adds to a container that is already nested (a recursive structure) at offset \(at)")
        }
        target.depth = try nest(items, below: target.depth, at)
        return target
    }

    /// The depth of a container at `depth` that takes `items`; marks them as nested.
    private func nest(_ items: [PickleValue], below depth: Int, _ at: Int) throws -> Int {
        var result = depth
        for item in items {
            result = max(result, item.depth + 1)
            item.container?.nested = true
        }
        guard result <= pickleMaxDepth else {
            throw fail("refused: pickle nests deeper than \(pickleMaxDepth) levels at offset \(at)")
        }
        return result
    }

    // Stack helpers

    private mutating func pop(_ at: Int) throws -> PickleValue {
        guard stack.count > (marks.last ?? 0) else { throw fail("malformed pickle: stack underflow at offset \(at)") }
        return stack.removeLast()
    }

    private mutating func pop(_ n: Int, _ at: Int) throws -> [PickleValue] {
        guard stack.count - n >= (marks.last ?? 0) else { throw fail("malformed pickle: stack underflow at offset \(at)") }
        defer { stack.removeLast(n) }
        return Array(stack.suffix(n))
    }

    private mutating func popMark(_ at: Int) throws -> [PickleValue] {
        guard let mark = marks.popLast() else { throw fail("malformed pickle: no MARK for opcode at offset \(at)") }
        defer { stack.removeSubrange(mark...) }
        return Array(stack[mark...])
    }

    private mutating func dropMark(_ at: Int) throws {
        guard let mark = marks.popLast() else { throw fail("malformed pickle: no MARK for opcode at offset \(at)") }
        stack.removeSubrange(mark...)
    }

    private func top(_ at: Int) throws -> PickleValue {
        guard let value = stack.last, stack.count > (marks.last ?? 0) else { throw fail("malformed pickle: empty stack at offset \(at)") }
        return value
    }

    private func recall(_ index: Int, _ at: Int) throws -> PickleValue {
        guard let value = memo[index] else { throw fail("malformed pickle: memo \(index) unset at offset \(at)") }
        return value
    }

    private func list(_ at: Int) throws -> PickleList {
        guard case .list(let l) = try top(at) else { throw fail("malformed pickle: APPEND to a non-list at offset \(at)") }
        return l
    }

    private func dict(_ at: Int) throws -> PickleDict {
        guard case .dict(let d) = try top(at) else { throw fail("malformed pickle: SETITEM on a non-dict at offset \(at)") }
        return d
    }

    // Byte helpers

    private mutating func take(_ n: Int) throws -> [UInt8] {
        guard n >= 0, n <= bytes.count - pos else {
            throw fail("truncated: pickle needs \(n) bytes at offset \(pos) but the file has \(bytes.count)")
        }
        defer { pos += n }
        return Array(bytes[pos..<(pos + n)])
    }

    private mutating func skip(_ n: Int) throws {
        guard n <= bytes.count - pos else {
            throw fail("truncated: pickle needs \(n) bytes at offset \(pos) but the file has \(bytes.count)")
        }
        pos += n
    }

    private mutating func byte() throws -> UInt8 {
        guard pos < bytes.count else { throw fail("truncated: pickle ends at offset \(pos) without STOP") }
        defer { pos += 1 }
        return bytes[pos]
    }

    private mutating func raw<T: FixedWidthInteger>(_ n: Int) throws -> T {
        guard n <= bytes.count - pos else { throw fail("truncated: pickle needs \(n) bytes at offset \(pos) but the file has \(bytes.count)") }
        defer { pos += n }
        return bytes.loadUnaligned(fromByteOffset: pos, as: T.self)
    }

    private mutating func uint(_ n: Int) throws -> UInt64 {
        try take(n).reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    private mutating func length(_ n: Int) throws -> Int {
        let value = try uint(n)
        guard value <= UInt64(bytes.count) else { throw fail("truncated: pickle length \(value) at offset \(pos - n) exceeds the file") }
        return Int(value)
    }

    private mutating func long(_ n: Int) throws -> PickleValue {
        let digits = try take(n)
        guard n <= 8 else { return .bigInt(digits) }
        guard let last = digits.last else { return .int(0) }
        // Sign-extend from the top byte so that e.g. LONG1 0xff decodes as -1.
        var value: UInt64 = last & 0x80 != 0 ? ~0 : 0
        for b in digits.reversed() { value = value << 8 | UInt64(b) }
        return .int(Int(truncatingIfNeeded: value))
    }

    private mutating func utf8(_ n: Int) throws -> String { String(decoding: try take(n), as: UTF8.self) }

    private mutating func line() throws -> String {
        guard let end = bytes[pos...].firstIndex(of: 0x0a) else { throw fail("truncated: GLOBAL name at offset \(pos) has no newline") }
        defer { pos = end + 1 }
        return String(decoding: bytes[pos..<end], as: UTF8.self)
    }
}

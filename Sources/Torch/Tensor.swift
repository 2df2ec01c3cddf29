import CTorch

/// Element types, with the codes the C shim uses.
public enum DType: Int32, Sendable, CustomStringConvertible {
    case float32 = 0, float64, float16, bfloat16, int64, int32, bool, uint8, int8, int16

    public var byteSize: Int {
        switch self {
        case .float64, .int64: return 8
        case .float32, .int32: return 4
        case .float16, .bfloat16, .int16: return 2
        case .bool, .uint8, .int8: return 1
        }
    }
    public var isFloatingPoint: Bool { [.float32, .float64, .float16, .bfloat16].contains(self) }
    public var description: String {
        ["float32", "float64", "float16", "bfloat16", "int64", "int32", "bool", "uint8", "int8", "int16"][Int(rawValue)]
    }
}

public enum Device: Equatable, Sendable, CustomStringConvertible {
    case cpu
    case cuda(Int)

    var code: (Int32, Int32) {
        switch self {
        case .cpu: return (0, 0)
        case .cuda(let i): return (1, Int32(i))
        }
    }
    public var description: String {
        switch self {
        case .cpu: return "cpu"
        case .cuda(let i): return "cuda:\(i)"
        }
    }
}

/// An error reported by libtorch (shape mismatch, bad dtype, ...), with its message.
public struct TorchError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Swift scalar types that map to a tensor dtype.
public protocol TensorScalar { static var dtype: DType { get } }
extension Float: TensorScalar { public static var dtype: DType { .float32 } }
extension Double: TensorScalar { public static var dtype: DType { .float64 } }
extension Int64: TensorScalar { public static var dtype: DType { .int64 } }
extension Int32: TensorScalar { public static var dtype: DType { .int32 } }
extension UInt8: TensorScalar { public static var dtype: DType { .uint8 } }
extension Int8: TensorScalar { public static var dtype: DType { .int8 } }
extension Int16: TensorScalar { public static var dtype: DType { .int16 } }
extension Bool: TensorScalar { public static var dtype: DType { .bool } }

/// A seeded random generator (CPU); pass it to sampling ops for reproducible draws.
public final class Generator: @unchecked Sendable {
    let handle: tt_generator
    public init(seed: UInt64) {
        handle = tt_generator_new(seed)!
    }
    deinit { tt_generator_free(handle) }
}

/// A libtorch tensor. Owns one handle; freed when the last Swift reference goes away.
public final class Tensor: @unchecked Sendable {
    let handle: tt_tensor

    init(handle: tt_tensor) { self.handle = handle }
    deinit { tt_free(handle) }

    // MARK: plumbing

    static func lastError() -> TorchError { TorchError(String(cString: tt_last_error())) }

    /// Runs a C call that returns a new handle. `keep` holds every operand alive for the whole
    /// call: an optimised build may otherwise release a wrapper right after reading its handle.
    @inline(__always)
    static func make(_ keep: Tensor?..., call: () -> tt_tensor?) throws -> Tensor {
        let h = withExtendedLifetime(keep) { call() }
        guard let h else { throw lastError() }
        return Tensor(handle: h)
    }

    @inline(__always)
    static func status(_ keep: Tensor?..., call: () -> Int32) throws {
        let rc = withExtendedLifetime(keep) { call() }
        if rc != 0 { throw lastError() }
    }

    @inline(__always)
    func read<R>(_ body: (tt_tensor) -> R) -> R { withExtendedLifetime(self) { body(handle) } }

    // MARK: properties

    public var rank: Int { Int(read { tt_ndim($0) }) }
    public var shape: [Int] {
        read { h in
            var s = [Int64](repeating: 0, count: Int(tt_ndim(h)))
            s.withUnsafeMutableBufferPointer { tt_shape(h, $0.baseAddress) }
            return s.map { Int($0) }
        }
    }
    public var strides: [Int] {
        read { h in
            var s = [Int64](repeating: 0, count: Int(tt_ndim(h)))
            s.withUnsafeMutableBufferPointer { tt_strides(h, $0.baseAddress) }
            return s.map { Int($0) }
        }
    }
    public var dtype: DType { DType(rawValue: read { tt_dtype($0) }) ?? .float32 }
    public var device: Device {
        read { h in
            var i: Int32 = 0
            return tt_device(h, &i) == 1 ? .cuda(Int(i)) : .cpu
        }
    }
    public var count: Int { Int(read { tt_numel($0) }) }
    /// In-place modification counter: changes whenever the data is modified in place.
    public var version: Int { Int(read { tt_version($0) }) }
    /// Changes whenever this tensor's values may have: an in-place write (the version counter) or other values
    /// swapped in (`swap_` moves storages with their counters, so the pair names the values). What caches of
    /// derived copies key on.
    public var contentVersion: ContentVersion {
        ContentVersion(storage: Int(bitPattern: read { tt_data_ptr($0) }), count: version)
    }
    public var isContiguous: Bool { read { tt_is_contiguous($0) } != 0 }
    public func size(_ dim: Int) -> Int { shape[dim < 0 ? dim + rank : dim] }

    // MARK: creation

    public convenience init<T: TensorScalar>(_ values: [T], shape: [Int]? = nil) throws {
        let shape = shape ?? [values.count]
        guard shape.reduce(1, *) == values.count else {
            throw TorchError("Tensor(_:shape:): \(values.count) values do not fill shape \(shape)")
        }
        let s = shape.map { Int64($0) }
        let h = values.withUnsafeBytes { buf in
            s.withUnsafeBufferPointer { tt_from_data(buf.baseAddress, $0.baseAddress, Int32(s.count), T.dtype.rawValue) }
        }
        guard let h else { throw Tensor.lastError() }
        self.init(handle: h)
    }

    /// Raw little-endian bytes of the given dtype (e.g. from a checkpoint), copied.
    public convenience init(bytes: UnsafeRawBufferPointer, dtype: DType, shape: [Int]) throws {
        let n = shape.reduce(1, *)
        guard n * dtype.byteSize == bytes.count else {
            throw TorchError("Tensor(bytes:): \(bytes.count) bytes do not match \(dtype) \(shape)")
        }
        let s = shape.map { Int64($0) }
        let h = s.withUnsafeBufferPointer { tt_from_data(bytes.baseAddress, $0.baseAddress, Int32(s.count), dtype.rawValue) }
        guard let h else { throw Tensor.lastError() }
        self.init(handle: h)
    }

    public static func scalar(_ value: Double, dtype: DType = .float32) throws -> Tensor {
        try make { tt_scalar_tensor(value, dtype.rawValue) }
    }
    public static func full(_ shape: [Int], _ value: Double, dtype: DType = .float32, device: Device = .cpu) throws -> Tensor {
        let s = shape.map { Int64($0) }
        let (d, i) = device.code
        return try make { s.withUnsafeBufferPointer { tt_full($0.baseAddress, Int32(s.count), value, dtype.rawValue, d, i) } }
    }
    public static func zeros(_ shape: [Int], dtype: DType = .float32, device: Device = .cpu) throws -> Tensor {
        try full(shape, 0, dtype: dtype, device: device)
    }
    public static func ones(_ shape: [Int], dtype: DType = .float32, device: Device = .cpu) throws -> Tensor {
        try full(shape, 1, dtype: dtype, device: device)
    }
    public static func empty(_ shape: [Int], dtype: DType = .float32, device: Device = .cpu) throws -> Tensor {
        let s = shape.map { Int64($0) }
        let (d, i) = device.code
        return try make { s.withUnsafeBufferPointer { tt_empty($0.baseAddress, Int32(s.count), dtype.rawValue, d, i) } }
    }
    public static func arange(_ start: Double = 0, _ end: Double, step: Double = 1, dtype: DType = .int64, device: Device = .cpu) throws -> Tensor {
        let (d, i) = device.code
        return try make { tt_arange(start, end, step, dtype.rawValue, d, i) }
    }
    public static func arange(_ n: Int, dtype: DType = .int64) throws -> Tensor { try arange(0, Double(n), dtype: dtype) }
    public static func randn(_ shape: [Int], dtype: DType = .float32, generator: Generator? = nil) throws -> Tensor {
        let s = shape.map { Int64($0) }
        return try withExtendedLifetime(generator) {
            try make { s.withUnsafeBufferPointer { tt_randn($0.baseAddress, Int32(s.count), dtype.rawValue, generator?.handle) } }
        }
    }
    public static func rand(_ shape: [Int], dtype: DType = .float32, generator: Generator? = nil) throws -> Tensor {
        let s = shape.map { Int64($0) }
        return try withExtendedLifetime(generator) {
            try make { s.withUnsafeBufferPointer { tt_rand($0.baseAddress, Int32(s.count), dtype.rawValue, generator?.handle) } }
        }
    }

    // MARK: reading back

    public func toArray<T: TensorScalar>(_: T.Type = T.self) throws -> [T] {
        let src = dtype == T.dtype ? self : try to(T.dtype)
        let n = src.count
        var out = [T](unsafeUninitializedCapacity: n) { _, c in c = n }
        try out.withUnsafeMutableBytes { buf in
            try Tensor.status(src) { tt_copy_out(src.handle, buf.baseAddress, buf.count) }
        }
        return out
    }
    public func floats() throws -> [Float] { try toArray(Float.self) }
    public func doubles() throws -> [Double] { try toArray(Double.self) }
    public func ints() throws -> [Int] { try toArray(Int64.self).map { Int($0) } }
    public func bools() throws -> [Bool] { try toArray(Bool.self) }
    /// Direct access to the memory of a contiguous CPU tensor (e.g. to dequantise weights
    /// into it). Writes are not recorded by autograd.
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        guard isContiguous, device == .cpu else { throw TorchError("withUnsafeMutableBytes: needs a contiguous CPU tensor") }
        return try withExtendedLifetime(self) {
            try body(UnsafeMutableRawBufferPointer(start: tt_data_ptr(handle), count: count * dtype.byteSize))
        }
    }
    public func item() throws -> Double {
        var v = 0.0
        try Tensor.status(self) { tt_item(handle, &v) }
        return v
    }

    // MARK: conversion

    public func to(_ dtype: DType) throws -> Tensor {
        let (d, i) = device.code
        return try Tensor.make(self) { tt_to(handle, dtype.rawValue, d, i) }
    }
    public func to(_ device: Device) throws -> Tensor {
        let (d, i) = device.code
        return try Tensor.make(self) { tt_to(handle, dtype.rawValue, d, i) }
    }
}

// MARK: - runtime

public struct ContentVersion: Hashable, Sendable {
    public let storage: Int, count: Int
}

public enum LibTorch {
    public static var threads: Int {
        get { Int(tt_get_num_threads()) }
        set { tt_set_num_threads(Int32(newValue)) }
    }
    public static func manualSeed(_ seed: UInt64) { tt_manual_seed(seed) }
    public static var cudaAvailable: Bool { tt_cuda_is_available() != 0 }
    /// Bytes of freed large CPU blocks kept for reuse by the shim's allocator (see allocator.cpp).
    public static var cpuCachedBytes: Int { Int(tt_cpu_cached_bytes()) }
    /// Whether fp32 matrix products run on oneDNN rather than MKL (see gemm.cpp), and how many it has computed.
    public static var fp32GemmOnOneDNN: Bool { tt_fp32_gemm_onednn() != 0 }
    public static var oneDNNProducts: Int { Int(tt_onednn_products()) }
    /// Whether MKL's vendor check is answered by the shim, so that MKL picks its kernels from the CPU's features
    /// on any vendor's CPU (see gemm.cpp).
    public static var mklVendorCheckBound: Bool { tt_mkl_vendor_check_bound() != 0 }
    public static var gradEnabled: Bool { tt_is_grad_enabled() != 0 }

    /// libtorch's operator profile of `body`, written to `path` as "self_ms total_ms calls name" lines sorted by
    /// self time (an operator's time minus that of the operators it called).
    public static func profile<R>(to path: String, _ body: () throws -> R) throws -> R {
        if tt_profile_start() != 0 { throw Tensor.lastError() }
        let result = Result { try body() }
        if tt_profile_stop(path) != 0 { throw Tensor.lastError() }
        return try result.get()
    }
}

/// Runs `body` with autograd recording off (inference, optimiser updates).
public func noGrad<R>(_ body: () throws -> R) rethrows -> R {
    let prev = tt_set_grad_enabled(0)
    defer { tt_set_grad_enabled(prev) }
    return try body()
}

/// Runs `body` with autograd recording on.
public func withGrad<R>(_ body: () throws -> R) rethrows -> R {
    let prev = tt_set_grad_enabled(1)
    defer { tt_set_grad_enabled(prev) }
    return try body()
}

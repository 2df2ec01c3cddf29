import CTorch
import Foundation

extension DType {
    init?(_ st: STDType) {
        switch st {
        case .F64: self = .float64
        case .F32: self = .float32
        case .F16: self = .float16
        case .BF16: self = .bfloat16
        case .I64: self = .int64
        case .I32: self = .int32
        case .I16: self = .int16
        case .I8: self = .int8
        case .U8: self = .uint8
        case .BOOL: self = .bool
        }
    }
    var safetensors: STDType {
        switch self {
        case .float64: return .F64
        case .float32: return .F32
        case .float16: return .F16
        case .bfloat16: return .BF16
        case .int64: return .I64
        case .int32: return .I32
        case .int16: return .I16
        case .int8: return .I8
        case .uint8: return .U8
        case .bool: return .BOOL
        }
    }
}

extension SafeTensorsFile {
    /// One tensor, copied out of the mapped file.
    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entries[name] else { throw SafeTensorsError(url, "no tensor named \(name)") }
        guard let dt = DType(e.dtype) else { throw SafeTensorsError(url, "\(name): unsupported dtype \(e.dtype)") }
        return try withBytes(name) { try Tensor(bytes: $0, dtype: dt, shape: e.shape) }
    }
    /// Every tensor in the file, optionally converted to `dtype` (floating types only).
    public func tensors(as dtype: DType? = nil) throws -> [String: Tensor] {
        var out: [String: Tensor] = [:]
        for name in names {
            let t = try tensor(name)
            out[name] = try dtype.map { t.dtype.isFloatingPoint && t.dtype != $0 ? try t.to($0) : t } ?? t
        }
        return out
    }
}

/// Writes tensors as one safetensors file, atomically (temp file + rename).
public func saveSafeTensors(_ tensors: [String: Tensor], metadata: [String: String]? = nil, to url: URL) throws {
    let items = try tensors.sorted { $0.key < $1.key }.map { name, t -> (name: String, dtype: STDType, shape: [Int], bytes: Data) in
        let c = try t.detach().contiguous()
        var data = Data(count: c.count * c.dtype.byteSize)
        try data.withUnsafeMutableBytes { buf in
            try Tensor.status(c) { tt_copy_out(c.handle, buf.baseAddress, buf.count) }
        }
        return (name, c.dtype.safetensors, c.shape, data)
    }
    try SafeTensorsWriter.write(items, metadata: metadata, to: url)
}

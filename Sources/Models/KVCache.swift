import Torch

/// Keys and values of past positions, for incremental decoding.
///
/// Storage is preallocated per layer as [batch, kvHeads, capacity, headDim] and written in
/// place, so a decode step costs one small copy instead of re-concatenating the whole past.
/// `valid` marks which cached positions each row may attend to (false for left padding).
///
/// When one cached row fans out to many (`selectRows` of row 0 only), its positions become a prefix that
/// all rows share ([1, kvHeads, shared, headDim] per layer) instead of being copied into each: a decode step
/// then reads the prompt's keys once rather than once per row (`LlamaAttention.sharedPrefixAttention`).
/// `keys`/`values` hold the positions after the shared ones.
public final class KVCache {
    public private(set) var keys: [Tensor] = []
    public private(set) var values: [Tensor] = []
    private var sharedKeys: [Tensor] = []
    private var sharedValues: [Tensor] = []
    /// Positions cached, shared prefix included.
    public private(set) var length = 0
    /// Positions in the shared prefix (0: none).
    public private(set) var shared = 0
    public private(set) var capacity: Int
    public private(set) var batch = 0
    /// [batch, capacity] bool; nil while every position is valid.
    public private(set) var valid: Tensor?
    let layers: Int
    /// Keeps autograd history: keys/values are concatenated instead of copied into storage.
    /// Training uses it to run a prompt once and many responses against it, with gradients
    /// flowing back through the shared prompt once.
    public let differentiable: Bool

    public init(layers: Int, capacity: Int, differentiable: Bool = false) {
        self.layers = layers
        self.capacity = capacity
        self.differentiable = differentiable
    }

    /// Writes the new keys/values of `layer` after the cached ones and returns everything
    /// cached so far for that layer (views).
    func append(layer: Int, k: Tensor, v: Tensor) throws -> (Tensor, Tensor) {
        let n = k.size(2)
        if differentiable {
            if keys.count <= layer {
                batch = k.size(0)
                keys.append(k)
                values.append(v)
            } else {
                // A batch-1 prefix is broadcast to the responses' batch (no copy until cat).
                func widen(_ t: Tensor) throws -> Tensor {
                    t.size(0) == k.size(0) ? t : try t.expand([k.size(0)] + Array(t.shape.dropFirst()))
                }
                keys[layer] = try Tensor.cat([widen(keys[layer]), k], dim: 2)
                values[layer] = try Tensor.cat([widen(values[layer]), v], dim: 2)
                batch = k.size(0)
            }
            return (keys[layer], values[layer])
        }
        if keys.count < layers {
            batch = k.size(0)
            let shape = [k.size(0), k.size(1), capacity - shared, k.size(3)]
            for _ in 0..<layers {
                keys.append(try Tensor.empty(shape, dtype: k.dtype))
                values.append(try Tensor.empty(shape, dtype: v.dtype))
            }
        }
        if length + n > capacity { try grow(to: Swift.max(2 * capacity, length + n)) }
        let own = length - shared
        try noGrad {
            try keys[layer].narrow(dim: 2, start: own, length: n).copy_(k)
            try values[layer].narrow(dim: 2, start: own, length: n).copy_(v)
        }
        return (try keys[layer].narrow(dim: 2, start: 0, length: own + n),
                try values[layer].narrow(dim: 2, start: 0, length: own + n))
    }

    /// The shared prefix's keys and values of `layer`, if rows share one.
    func sharedPrefix(layer: Int) -> (keys: Tensor, values: Tensor)? {
        shared > 0 ? (sharedKeys[layer], sharedValues[layer]) : nil
    }

    /// Called once per forward pass, after every layer has appended `n` positions.
    func advance(_ n: Int, validNew: Tensor? = nil) throws {
        if differentiable {
            guard validNew == nil else { throw ModelError("padding masks are not supported in a differentiable cache") }
            length += n
            return
        }
        if let validNew {
            if valid == nil { valid = try Tensor.ones([batch, capacity], dtype: .bool) }
            try valid!.narrow(dim: 1, start: length, length: n).copy_(validNew)
        }
        length += n
    }

    /// Validity of the cached positions [batch, length], if any are masked.
    var validPrefix: Tensor? { get throws { try valid?.narrow(dim: 1, start: 0, length: length) } }

    private func grow(to newCapacity: Int) throws {
        let own = length - shared
        try noGrad {
            for i in 0..<keys.count {
                var shape = keys[i].shape
                shape[2] = newCapacity - shared
                let k = try Tensor.empty(shape, dtype: keys[i].dtype), v = try Tensor.empty(shape, dtype: values[i].dtype)
                try k.narrow(dim: 2, start: 0, length: own).copy_(keys[i].narrow(dim: 2, start: 0, length: own))
                try v.narrow(dim: 2, start: 0, length: own).copy_(values[i].narrow(dim: 2, start: 0, length: own))
                keys[i] = k
                values[i] = v
            }
            if let old = valid {
                let nv = try Tensor.ones([batch, newCapacity], dtype: .bool)
                try nv.narrow(dim: 1, start: 0, length: length).copy_(old.narrow(dim: 1, start: 0, length: length))
                valid = nv
            }
        }
        capacity = newCapacity
    }

    /// Keeps only the given batch rows, in that order (rows may repeat: this is how one
    /// prefilled prompt fans out to N samples without recomputing it).
    public func selectRows(_ rows: [Int]) throws {
        if !differentiable && shared == 0 && batch == 1 && valid == nil && length > 0 && rows.count > 1
            && rows.allSatisfy({ $0 == 0 }) {
            return try shareRowZero(rows: rows.count)
        }
        let idx = try Tensor(rows.map { Int64($0) })
        try noGrad {
            keys = try keys.map { try $0.indexSelect(dim: 0, index: idx) }
            values = try values.map { try $0.indexSelect(dim: 0, index: idx) }
            valid = try valid?.indexSelect(dim: 0, index: idx)
        }
        batch = rows.count
    }

    /// Makes the one cached row the shared prefix of `rows` rows (contiguous copies: products read them
    /// in place), with no positions of their own yet.
    private func shareRowZero(rows: Int) throws {
        try noGrad {
            sharedKeys = try keys.map { try $0.narrow(dim: 2, start: 0, length: length).contiguous() }
            sharedValues = try values.map { try $0.narrow(dim: 2, start: 0, length: length).contiguous() }
        }
        keys = []
        values = []
        shared = length
        batch = rows
    }

}

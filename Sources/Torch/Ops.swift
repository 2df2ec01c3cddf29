import CTorch

@inline(__always) private func i64(_ xs: [Int]) -> [Int64] { xs.map { Int64($0) } }

/// Calls `body` with a C array of the handles; the tensors stay alive for the call.
@inline(__always)
private func withHandles<R>(_ ts: [Tensor], _ body: (UnsafePointer<tt_tensor?>, Int32) -> R) -> R {
    withExtendedLifetime(ts) {
        let hs: [tt_tensor?] = ts.map { $0.handle }
        return hs.withUnsafeBufferPointer { body($0.baseAddress!, Int32(ts.count)) }
    }
}

public enum Reduction: Int32 { case none = 0, mean = 1, sum = 2 }

// MARK: - elementwise

extension Tensor {
    @inline(__always) func unary(_ op: Int) throws -> Tensor {
        try Tensor.make(self) { tt_unary(handle, Int32(op)) }
    }
    @inline(__always) func binary(_ other: Tensor, _ op: Int) throws -> Tensor {
        try Tensor.make(self, other) { tt_binary(handle, other.handle, Int32(op)) }
    }
    @inline(__always) func binary(_ s: Double, _ op: Int) throws -> Tensor {
        try Tensor.make(self) { tt_binary_scalar(handle, s, Int32(op)) }
    }

    public func neg() throws -> Tensor { try unary(Int(TT_NEG)) }
    public func exp() throws -> Tensor { try unary(Int(TT_EXP)) }
    public func log() throws -> Tensor { try unary(Int(TT_LOG)) }
    public func sqrt() throws -> Tensor { try unary(Int(TT_SQRT)) }
    public func rsqrt() throws -> Tensor { try unary(Int(TT_RSQRT)) }
    public func abs() throws -> Tensor { try unary(Int(TT_ABS)) }
    public func sin() throws -> Tensor { try unary(Int(TT_SIN)) }
    public func cos() throws -> Tensor { try unary(Int(TT_COS)) }
    public func tanh() throws -> Tensor { try unary(Int(TT_TANH)) }
    public func sigmoid() throws -> Tensor { try unary(Int(TT_SIGMOID)) }
    public func relu() throws -> Tensor { try unary(Int(TT_RELU)) }
    public func relu6() throws -> Tensor { try unary(Int(TT_RELU6)) }
    public func silu() throws -> Tensor { try unary(Int(TT_SILU)) }
    /// GELU, exact (erf) form by default; `tanh: true` for the approximation.
    public func gelu(tanh: Bool = false) throws -> Tensor { try unary(Int(tanh ? TT_GELU_TANH : TT_GELU)) }
    public func floor() throws -> Tensor { try unary(Int(TT_FLOOR)) }
    public func ceil() throws -> Tensor { try unary(Int(TT_CEIL)) }
    public func round() throws -> Tensor { try unary(Int(TT_ROUND)) }
    public func sign() throws -> Tensor { try unary(Int(TT_SIGN)) }
    public func reciprocal() throws -> Tensor { try unary(Int(TT_RECIPROCAL)) }
    public func square() throws -> Tensor { try unary(Int(TT_SQUARE)) }
    public func logicalNot() throws -> Tensor { try unary(Int(TT_LOGICAL_NOT)) }
    public func isFinite() throws -> Tensor { try unary(Int(TT_ISFINITE)) }
    public func isNaN() throws -> Tensor { try unary(Int(TT_ISNAN)) }
    public func log1p() throws -> Tensor { try unary(Int(TT_LOG1P)) }
    public func expm1() throws -> Tensor { try unary(Int(TT_EXPM1)) }
    public func erf() throws -> Tensor { try unary(Int(TT_ERF)) }

    public func pow(_ e: Double) throws -> Tensor { try binary(e, Int(TT_POW)) }
    public func pow(_ e: Tensor) throws -> Tensor { try binary(e, Int(TT_POW)) }
    public func maximum(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_MAXIMUM)) }
    public func minimum(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_MINIMUM)) }
    public func eq(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_EQ)) }
    public func eq(_ s: Double) throws -> Tensor { try binary(s, Int(TT_EQ)) }
    public func ne(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_NE)) }
    public func ne(_ s: Double) throws -> Tensor { try binary(s, Int(TT_NE)) }
    public func lt(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_LT)) }
    public func lt(_ s: Double) throws -> Tensor { try binary(s, Int(TT_LT)) }
    public func le(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_LE)) }
    public func le(_ s: Double) throws -> Tensor { try binary(s, Int(TT_LE)) }
    public func gt(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_GT)) }
    public func gt(_ s: Double) throws -> Tensor { try binary(s, Int(TT_GT)) }
    public func ge(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_GE)) }
    public func ge(_ s: Double) throws -> Tensor { try binary(s, Int(TT_GE)) }
    public func logicalAnd(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_AND)) }
    public func logicalOr(_ o: Tensor) throws -> Tensor { try binary(o, Int(TT_OR)) }
    public func remainder(_ s: Double) throws -> Tensor { try binary(s, Int(TT_REMAINDER)) }

    public func clamp(min lo: Double? = nil, max hi: Double? = nil) throws -> Tensor {
        try Tensor.make(self) { tt_clamp(handle, lo ?? 0, hi ?? 0, lo == nil ? 0 : 1, hi == nil ? 0 : 1) }
    }
    /// Elementwise `cond ? a : b` with broadcasting.
    public static func `where`(_ cond: Tensor, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        try make(cond, a, b) { tt_where(cond.handle, a.handle, b.handle) }
    }
}

// Operators (throwing, so one `try` covers a whole expression).
public func + (a: Tensor, b: Tensor) throws -> Tensor { try a.binary(b, Int(TT_ADD)) }
public func - (a: Tensor, b: Tensor) throws -> Tensor { try a.binary(b, Int(TT_SUB)) }
public func * (a: Tensor, b: Tensor) throws -> Tensor { try a.binary(b, Int(TT_MUL)) }
public func / (a: Tensor, b: Tensor) throws -> Tensor { try a.binary(b, Int(TT_DIV)) }
public func + (a: Tensor, s: Double) throws -> Tensor { try a.binary(s, Int(TT_ADD)) }
public func - (a: Tensor, s: Double) throws -> Tensor { try a.binary(s, Int(TT_SUB)) }
public func * (a: Tensor, s: Double) throws -> Tensor { try a.binary(s, Int(TT_MUL)) }
public func / (a: Tensor, s: Double) throws -> Tensor { try a.binary(s, Int(TT_DIV)) }
public func + (s: Double, a: Tensor) throws -> Tensor { try a.binary(s, Int(TT_ADD)) }
public func * (s: Double, a: Tensor) throws -> Tensor { try a.binary(s, Int(TT_MUL)) }
public func - (s: Double, a: Tensor) throws -> Tensor {
    try Tensor.make(a) { tt_rbinary_scalar(s, a.handle, Int32(TT_SUB)) }
}
public func / (s: Double, a: Tensor) throws -> Tensor {
    try Tensor.make(a) { tt_rbinary_scalar(s, a.handle, Int32(TT_DIV)) }
}
public prefix func - (a: Tensor) throws -> Tensor { try a.neg() }

// MARK: - reductions

extension Tensor {
    func reduce(_ op: Int32, _ dims: [Int], _ keepDim: Bool, correction: Int = 0) throws -> Tensor {
        let d = i64(dims)
        return try Tensor.make(self) {
            d.withUnsafeBufferPointer { tt_reduce(handle, op, $0.baseAddress, Int32(d.count), keepDim ? 1 : 0, Int32(correction)) }
        }
    }
    /// Sum over `dims` (all dims when empty).
    public func sum(_ dims: [Int] = [], keepDim: Bool = false) throws -> Tensor { try reduce(Int32(TT_SUM), dims, keepDim) }
    public func sum(dim: Int, keepDim: Bool = false) throws -> Tensor { try sum([dim], keepDim: keepDim) }
    public func mean(_ dims: [Int] = [], keepDim: Bool = false) throws -> Tensor { try reduce(Int32(TT_MEAN), dims, keepDim) }
    public func mean(dim: Int, keepDim: Bool = false) throws -> Tensor { try mean([dim], keepDim: keepDim) }
    public func max(_ dims: [Int] = [], keepDim: Bool = false) throws -> Tensor { try reduce(Int32(TT_AMAX), dims, keepDim) }
    public func min(_ dims: [Int] = [], keepDim: Bool = false) throws -> Tensor { try reduce(Int32(TT_AMIN), dims, keepDim) }
    public func logsumexp(dim: Int, keepDim: Bool = false) throws -> Tensor { try reduce(Int32(TT_LOGSUMEXP), [dim], keepDim) }
    public func prod() throws -> Tensor { try reduce(Int32(TT_PROD), [], false) }
    /// Variance; `unbiased` divides by N-1 like torch's default.
    public func variance(_ dims: [Int] = [], unbiased: Bool = true, keepDim: Bool = false) throws -> Tensor {
        try reduce(Int32(TT_VAR), dims, keepDim, correction: unbiased ? 1 : 0)
    }
    public func std(_ dims: [Int] = [], unbiased: Bool = true, keepDim: Bool = false) throws -> Tensor {
        try reduce(Int32(TT_STD), dims, keepDim, correction: unbiased ? 1 : 0)
    }
    public func norm() throws -> Tensor { try reduce(Int32(TT_NORM), [], false) }
    public func argmax(dim: Int, keepDim: Bool = false) throws -> Tensor {
        try Tensor.make(self) { tt_argmax(handle, Int64(dim), keepDim ? 1 : 0) }
    }
    public func argmin(dim: Int, keepDim: Bool = false) throws -> Tensor {
        try Tensor.make(self) { tt_argmin(handle, Int64(dim), keepDim ? 1 : 0) }
    }
    /// Max values and their indices along `dim`.
    public func max(dim: Int, keepDim: Bool = false) throws -> (values: Tensor, indices: Tensor) {
        var v: tt_tensor?, i: tt_tensor?
        try Tensor.status(self) { tt_max_dim(handle, Int64(dim), keepDim ? 1 : 0, &v, &i) }
        return (Tensor(handle: v!), Tensor(handle: i!))
    }
    public func topk(_ k: Int, dim: Int = -1, largest: Bool = true) throws -> (values: Tensor, indices: Tensor) {
        var v: tt_tensor?, i: tt_tensor?
        try Tensor.status(self) { tt_topk(handle, Int64(k), Int64(dim), largest ? 1 : 0, &v, &i) }
        return (Tensor(handle: v!), Tensor(handle: i!))
    }
    /// Stable sort along `dim`.
    public func sort(dim: Int = -1, descending: Bool = false) throws -> (values: Tensor, indices: Tensor) {
        var v: tt_tensor?, i: tt_tensor?
        try Tensor.status(self) { tt_sort(handle, Int64(dim), descending ? 1 : 0, &v, &i) }
        return (Tensor(handle: v!), Tensor(handle: i!))
    }
    public func cumsum(dim: Int) throws -> Tensor { try Tensor.make(self) { tt_cumsum(handle, Int64(dim)) } }
}

// MARK: - linear algebra and nn functions

extension Tensor {
    public func matmul(_ o: Tensor) throws -> Tensor { try Tensor.make(self, o) { tt_matmul(handle, o.handle) } }
    public func bmm(_ o: Tensor) throws -> Tensor { try Tensor.make(self, o) { tt_bmm(handle, o.handle) } }
    public func softmax(dim: Int) throws -> Tensor { try Tensor.make(self) { tt_softmax(handle, Int64(dim)) } }
    public func logSoftmax(dim: Int) throws -> Tensor { try Tensor.make(self) { tt_log_softmax(handle, Int64(dim)) } }
}

/// Functional forms of the nn operations (module types wrap these).
public enum F {
    /// y = x Wᵀ + b, weight shaped [out, in] as in PyTorch checkpoints.
    public static func linear(_ x: Tensor, _ w: Tensor, _ b: Tensor? = nil) throws -> Tensor {
        try Tensor.make(x, w, b) { tt_linear(x.handle, w.handle, b?.handle) }
    }
    public static func embedding(_ weight: Tensor, _ indices: Tensor) throws -> Tensor {
        try Tensor.make(weight, indices) { tt_embedding(weight.handle, indices.handle) }
    }
    /// Attention over [batch, heads, seq, dim]. `mask` is boolean (true = attend) or additive
    /// float; `enableGQA` lets k/v have fewer heads than q.
    public static func scaledDotProductAttention(
        _ q: Tensor, _ k: Tensor, _ v: Tensor, mask: Tensor? = nil, causal: Bool = false,
        scale: Double? = nil, enableGQA: Bool = false
    ) throws -> Tensor {
        try Tensor.make(q, k, v, mask) {
            tt_sdpa(q.handle, k.handle, v.handle, mask?.handle, causal ? 1 : 0, scale ?? 0, enableGQA ? 1 : 0)
        }
    }
    public static func conv2d(
        _ x: Tensor, _ w: Tensor, _ b: Tensor? = nil, stride: (Int, Int) = (1, 1),
        padding: (Int, Int) = (0, 0), dilation: (Int, Int) = (1, 1), groups: Int = 1
    ) throws -> Tensor {
        let s: [Int64] = [Int64(stride.0), Int64(stride.1)]
        let p: [Int64] = [Int64(padding.0), Int64(padding.1)]
        let d: [Int64] = [Int64(dilation.0), Int64(dilation.1)]
        return try Tensor.make(x, w, b) { tt_conv2d(x.handle, w.handle, b?.handle, s, p, d, Int64(groups)) }
    }
    /// Batch norm with running statistics (inference form).
    public static func batchNorm(_ x: Tensor, weight: Tensor?, bias: Tensor?, mean: Tensor, variance: Tensor, eps: Double) throws -> Tensor {
        try Tensor.make(x, weight, bias, mean, variance) {
            tt_batch_norm(x.handle, weight?.handle, bias?.handle, mean.handle, variance.handle, eps)
        }
    }
    public static func layerNorm(_ x: Tensor, shape: [Int], weight: Tensor?, bias: Tensor?, eps: Double) throws -> Tensor {
        let s = i64(shape)
        return try Tensor.make(x, weight, bias) {
            s.withUnsafeBufferPointer { tt_layer_norm(x.handle, $0.baseAddress, Int32(s.count), weight?.handle, bias?.handle, eps) }
        }
    }
    public static func rmsNorm(_ x: Tensor, shape: [Int], weight: Tensor?, eps: Double) throws -> Tensor {
        let s = i64(shape)
        return try Tensor.make(x, weight) {
            s.withUnsafeBufferPointer { tt_rms_norm(x.handle, $0.baseAddress, Int32(s.count), weight?.handle, eps) }
        }
    }
    /// Cross entropy of logits [N, C] against class indices [N]; targets equal to
    /// `ignoreIndex` contribute nothing.
    public static func crossEntropy(_ logits: Tensor, _ target: Tensor, ignoreIndex: Int = -100, reduction: Reduction = .mean) throws -> Tensor {
        try Tensor.make(logits, target) { tt_cross_entropy(logits.handle, target.handle, Int64(ignoreIndex), reduction.rawValue) }
    }
    public static func nllLoss(_ logp: Tensor, _ target: Tensor, ignoreIndex: Int = -100, reduction: Reduction = .mean) throws -> Tensor {
        try Tensor.make(logp, target) { tt_nll_loss(logp.handle, target.handle, Int64(ignoreIndex), reduction.rawValue) }
    }
    /// Draws `n` indices per row of `probs` (non-negative, need not sum to 1).
    public static func multinomial(_ probs: Tensor, _ n: Int, replacement: Bool = false, generator: Generator? = nil) throws -> Tensor {
        try withExtendedLifetime(generator) {
            try Tensor.make(probs) { tt_multinomial(probs.handle, Int64(n), replacement ? 1 : 0, generator?.handle) }
        }
    }
    /// Constant padding; `pad` lists (before, after) pairs starting from the last dim, as torch's F.pad.
    public static func pad(_ x: Tensor, _ pad: [Int], value: Double = 0) throws -> Tensor {
        let p = i64(pad)
        return try Tensor.make(x) { p.withUnsafeBufferPointer { tt_pad(x.handle, $0.baseAddress, Int32(p.count), value) } }
    }
}

// MARK: - shape and indexing

extension Tensor {
    public func reshape(_ shape: [Int]) throws -> Tensor {
        let s = i64(shape)
        return try Tensor.make(self) { s.withUnsafeBufferPointer { tt_reshape(handle, $0.baseAddress, Int32(s.count)) } }
    }
    public func view(_ shape: [Int]) throws -> Tensor {
        let s = i64(shape)
        return try Tensor.make(self) { s.withUnsafeBufferPointer { tt_view(handle, $0.baseAddress, Int32(s.count)) } }
    }
    public func permute(_ dims: [Int]) throws -> Tensor {
        let s = i64(dims)
        return try Tensor.make(self) { s.withUnsafeBufferPointer { tt_permute(handle, $0.baseAddress, Int32(s.count)) } }
    }
    public func transpose(_ d0: Int, _ d1: Int) throws -> Tensor {
        try Tensor.make(self) { tt_transpose(handle, Int64(d0), Int64(d1)) }
    }
    public func contiguous() throws -> Tensor { try Tensor.make(self) { tt_contiguous(handle) } }
    public func expand(_ shape: [Int]) throws -> Tensor {
        let s = i64(shape)
        return try Tensor.make(self) { s.withUnsafeBufferPointer { tt_expand(handle, $0.baseAddress, Int32(s.count)) } }
    }
    public func squeeze(_ dim: Int) throws -> Tensor { try Tensor.make(self) { tt_squeeze(handle, Int64(dim)) } }
    public func unsqueeze(_ dim: Int) throws -> Tensor { try Tensor.make(self) { tt_unsqueeze(handle, Int64(dim)) } }
    public func flatten() throws -> Tensor { try reshape([-1]) }
    public func narrow(dim: Int, start: Int, length: Int) throws -> Tensor {
        try Tensor.make(self) { tt_narrow(handle, Int64(dim), Int64(start), Int64(length)) }
    }
    /// Python-style slice `[start:end:step]` along `dim` (negative bounds count from the end).
    public func slice(dim: Int, start: Int = 0, end: Int = Int.max, step: Int = 1) throws -> Tensor {
        try Tensor.make(self) { tt_slice(handle, Int64(dim), Int64(start), Int64(end == Int.max ? Int64.max : Int64(end)), Int64(step)) }
    }
    public func select(dim: Int, index: Int) throws -> Tensor {
        try Tensor.make(self) { tt_select(handle, Int64(dim), Int64(index)) }
    }
    public func indexSelect(dim: Int, index: Tensor) throws -> Tensor {
        try Tensor.make(self, index) { tt_index_select(handle, Int64(dim), index.handle) }
    }
    public func gather(dim: Int, index: Tensor) throws -> Tensor {
        try Tensor.make(self, index) { tt_gather(handle, Int64(dim), index.handle) }
    }
    public func scatter(dim: Int, index: Tensor, src: Tensor) throws -> Tensor {
        try Tensor.make(self, index, src) { tt_scatter(handle, Int64(dim), index.handle, src.handle) }
    }
    public func maskedFill(_ mask: Tensor, _ value: Double) throws -> Tensor {
        try Tensor.make(self, mask) { tt_masked_fill(handle, mask.handle, value) }
    }
    public static func cat(_ ts: [Tensor], dim: Int = 0) throws -> Tensor {
        let h = withHandles(ts) { tt_cat($0, $1, Int64(dim)) }
        guard let h else { throw lastError() }
        return Tensor(handle: h)
    }
    public static func stack(_ ts: [Tensor], dim: Int = 0) throws -> Tensor {
        let h = withHandles(ts) { tt_stack($0, $1, Int64(dim)) }
        guard let h else { throw lastError() }
        return Tensor(handle: h)
    }
    /// Splits into pieces of the given sizes along `dim` (views).
    public func split(_ sizes: [Int], dim: Int) throws -> [Tensor] {
        var start = 0
        return try sizes.map { n in
            defer { start += n }
            return try narrow(dim: dim, start: start, length: n)
        }
    }
    public func chunk(_ n: Int, dim: Int) throws -> [Tensor] {
        let len = size(dim)
        guard len % n == 0 else { throw TorchError("chunk: size \(len) of dim \(dim) is not divisible by \(n)") }
        return try split(Array(repeating: len / n, count: n), dim: dim)
    }
    public func repeatInterleave(_ repeats: Int, dim: Int) throws -> Tensor {
        try Tensor.make(self) { tt_repeat_interleave(handle, Int64(repeats), Int64(dim)) }
    }
    public func `repeat`(_ repeats: [Int]) throws -> Tensor {
        let r = i64(repeats)
        return try Tensor.make(self) { r.withUnsafeBufferPointer { tt_repeat(handle, $0.baseAddress, Int32(r.count)) } }
    }
    public func flip(_ dims: [Int]) throws -> Tensor {
        let d = i64(dims)
        return try Tensor.make(self) { d.withUnsafeBufferPointer { tt_flip(handle, $0.baseAddress, Int32(d.count)) } }
    }
    public func tril(_ diagonal: Int = 0) throws -> Tensor { try Tensor.make(self) { tt_tril(handle, Int64(diagonal)) } }
    public func triu(_ diagonal: Int = 0) throws -> Tensor { try Tensor.make(self) { tt_triu(handle, Int64(diagonal)) } }

    // MARK: in place (caches, optimisers; not recorded for autograd)

    public func copy_(_ src: Tensor) throws { try Tensor.status(self, src) { tt_copy_(handle, src.handle) } }
    /// `cached` (a copy of `w` in another dtype, made from its current values) standing in the graph for `w`
    /// cast now: the backward casts the gradient back to `w`'s dtype.
    public static func cachedCast(_ w: Tensor, _ cached: Tensor) throws -> Tensor {
        try Tensor.make(w, cached) { tt_cached_cast(w.handle, cached.handle) }
    }
    /// Exchanges this tensor's storage with `other`'s (same shape and dtype) without copying: each keeps
    /// its identity and gradient; the version counters move with the storages (see `contentVersion`).
    public func swap_(_ other: Tensor) throws { try Tensor.status(self, other) { tt_swap_(handle, other.handle) } }
    public func fill_(_ v: Double) throws { try Tensor.status(self) { tt_fill_(handle, v) } }
    public func add_(_ o: Tensor, alpha: Double = 1) throws { try Tensor.status(self, o) { tt_add_(handle, o.handle, alpha) } }
    public func mul_(_ s: Double) throws { try Tensor.status(self) { tt_mul_scalar_(handle, s) } }
}

// MARK: - autograd

extension Tensor {
    public var requiresGrad: Bool { read { tt_requires_grad($0) } != 0 }
    /// Marks a leaf tensor as trainable (or not); returns self for chaining.
    @discardableResult
    public func requiresGrad(_ flag: Bool) throws -> Tensor {
        try Tensor.status(self) { tt_set_requires_grad(handle, flag ? 1 : 0) }
        return self
    }
    public var isLeaf: Bool { read { tt_is_leaf($0) } != 0 }
    /// Accumulates d(self)/d(leaf) into every leaf's `grad`. `self` must be a scalar unless
    /// `gradient` is given.
    public func backward(_ gradient: Tensor? = nil, retainGraph: Bool = false) throws {
        try Tensor.status(self, gradient) { tt_backward(handle, gradient?.handle, retainGraph ? 1 : 0) }
    }
    /// The accumulated gradient, nil when none has been computed.
    public var grad: Tensor? {
        read { h in tt_grad(h).map { Tensor(handle: $0) } }
    }
    public func zeroGrad() throws { try Tensor.status(self) { tt_zero_grad(handle) } }
    /// A zero gradient where none has been computed (so that every process of a data-parallel step
    /// reduces the same list of gradients); returns the gradient.
    @discardableResult
    public func ensureGrad() throws -> Tensor {
        if let g = grad { return g }
        let z = try Tensor.zeros(shape, dtype: dtype)
        try Tensor.status(self, z) { tt_set_grad(handle, z.handle) }
        return grad!
    }
    public func detach() throws -> Tensor { try Tensor.make(self) { tt_detach(handle) } }
}

import Foundation

/// A node of the parameter tree. Subclasses create their tensors, then `register` them
/// under the exact names HF checkpoints use, so that dotted paths such as
/// `model.layers.3.self_attn.q_proj.weight` come out of `namedParameters()`.
open class Module {
    public private(set) var ownParameters: [(name: String, tensor: Tensor)] = []
    public private(set) var ownBuffers: [(name: String, tensor: Tensor)] = []
    public private(set) var children: [(name: String, module: Module)] = []

    public init() {}

    @discardableResult
    public func register(_ name: String, _ t: Tensor) -> Tensor {
        ownParameters.append((name, t))
        return t
    }
    /// Non-trainable state that is saved and loaded (e.g. batch-norm running statistics).
    @discardableResult
    public func registerBuffer(_ name: String, _ t: Tensor) -> Tensor {
        ownBuffers.append((name, t))
        return t
    }
    @discardableResult
    public func register<M: Module>(_ name: String, _ m: M) -> M {
        children.append((name, m))
        return m
    }
    /// Replaces a registered child (used to wrap a Linear with LoRA).
    public func replaceChild(_ name: String, with m: Module) {
        if let i = children.firstIndex(where: { $0.name == name }) { children[i].module = m }
    }

    /// Every parameter with its dotted name; a tensor shared by two modules (tied
    /// embeddings) is listed once, under its first name.
    public func namedParameters(prefix: String = "") -> [(name: String, tensor: Tensor)] {
        var seen = Set<ObjectIdentifier>()
        var out: [(String, Tensor)] = []
        visit(prefix: prefix) { name, t, isBuffer in
            if !isBuffer, seen.insert(ObjectIdentifier(t)).inserted { out.append((name, t)) }
        }
        return out
    }
    public func namedBuffers(prefix: String = "") -> [(name: String, tensor: Tensor)] {
        var out: [(String, Tensor)] = []
        visit(prefix: prefix) { name, t, isBuffer in if isBuffer { out.append((name, t)) } }
        return out
    }
    /// Every submodule with its dotted name (this module itself is "").
    public func namedModules(prefix: String = "") -> [(name: String, module: Module)] {
        [(prefix, self)] + children.flatMap { $0.module.namedModules(prefix: prefix.isEmpty ? $0.name : prefix + "." + $0.name) }
    }
    public var parameters: [Tensor] { namedParameters().map(\.tensor) }
    public var trainableParameters: [(name: String, tensor: Tensor)] { namedParameters().filter { $0.tensor.requiresGrad } }
    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.count } }

    func visit(prefix: String, _ f: (String, Tensor, Bool) -> Void) {
        let p = prefix.isEmpty ? "" : prefix + "."
        for (n, t) in ownParameters { f(p + n, t, false) }
        for (n, t) in ownBuffers { f(p + n, t, true) }
        for (n, m) in children { m.visit(prefix: p + n, f) }
    }

    /// Parameters and buffers by name, every name (tied tensors appear under each name).
    public func stateDict() -> [String: Tensor] {
        var d: [String: Tensor] = [:]
        visit(prefix: "") { name, t, _ in d[name] = t }
        return d
    }

    /// Sets requiresGrad on every parameter whose name matches one of `patterns`
    /// (`*` matches any run of characters; no pattern = all parameters).
    public func setTrainable(_ flag: Bool, matching patterns: [String] = []) throws {
        for (name, t) in namedParameters() where patterns.isEmpty || patterns.contains(where: { globMatch($0, name) }) {
            try t.requiresGrad(flag)
        }
    }
    public func freeze(matching patterns: [String] = []) throws { try setTrainable(false, matching: patterns) }
    public func unfreeze(matching patterns: [String] = []) throws { try setTrainable(true, matching: patterns) }

    /// Copies values from `state` into the registered tensors (converting dtype).
    /// Shape mismatches are reported, not applied; `strict` throws if anything is off.
    @discardableResult
    public func load(_ state: [String: Tensor], strict: Bool = true) throws -> LoadReport {
        var report = LoadReport()
        let mine = stateDict()
        try noGrad {
            for (name, t) in mine.sorted(by: { $0.key < $1.key }) {
                guard let src = state[name] else { report.missing.append(name); continue }
                if src.shape != t.shape {
                    report.mismatched.append((name, expected: t.shape, found: src.shape))
                    continue
                }
                try t.copy_(src)
                report.loaded += 1
            }
        }
        report.unexpected = state.keys.filter { mine[$0] == nil }.sorted()
        if strict, !report.isClean { throw TorchError("load: \(report)") }
        return report
    }
}

public struct LoadReport: CustomStringConvertible {
    public var loaded = 0
    public var missing: [String] = []
    public var unexpected: [String] = []
    public var mismatched: [(name: String, expected: [Int], found: [Int])] = []
    public var isClean: Bool { missing.isEmpty && unexpected.isEmpty && mismatched.isEmpty }
    public var description: String {
        var parts = ["\(loaded) loaded"]
        if !missing.isEmpty { parts.append("missing \(missing.count): \(missing.prefix(8).joined(separator: ", "))\(missing.count > 8 ? ", …" : "")") }
        if !unexpected.isEmpty { parts.append("unexpected \(unexpected.count): \(unexpected.prefix(8).joined(separator: ", "))\(unexpected.count > 8 ? ", …" : "")") }
        if !mismatched.isEmpty {
            parts.append("shape mismatch: " + mismatched.prefix(8).map { "\($0.name) expected \($0.expected) found \($0.found)" }.joined(separator: "; "))
        }
        return parts.joined(separator: "; ")
    }
}

/// Glob with `*` only, which is all parameter-name patterns need.
public func globMatch(_ pattern: String, _ s: String) -> Bool {
    let p = Array(pattern.utf8), t = Array(s.utf8)
    var pi = 0, ti = 0, star = -1, mark = 0
    while ti < t.count {
        if pi < p.count, p[pi] == t[ti] { pi += 1; ti += 1 }
        else if pi < p.count, p[pi] == UInt8(ascii: "*") { star = pi; mark = ti; pi += 1 }
        else if star >= 0 { pi = star + 1; mark += 1; ti = mark }
        else { return false }
    }
    while pi < p.count, p[pi] == UInt8(ascii: "*") { pi += 1 }
    return pi == p.count
}

// MARK: - layers

/// Uniform(-bound, bound) init as PyTorch's default for Linear/Conv (kaiming_uniform with a=√5).
func uniformInit(_ shape: [Int], bound: Double, generator: Generator?) throws -> Tensor {
    try (Tensor.rand(shape, generator: generator) * (2 * bound) - bound)
}

public final class Linear: Module {
    public let weight: Tensor
    public let bias: Tensor?
    public let inFeatures: Int, outFeatures: Int

    /// `initialize: false` leaves the memory unset, for layers about to be loaded from a checkpoint.
    public init(_ inFeatures: Int, _ outFeatures: Int, bias: Bool = true, initialize: Bool = true, generator: Generator? = nil) throws {
        self.inFeatures = inFeatures
        self.outFeatures = outFeatures
        let bound = 1 / Double(inFeatures).squareRoot()
        weight = initialize ? try uniformInit([outFeatures, inFeatures], bound: bound, generator: generator) : try Tensor.empty([outFeatures, inFeatures])
        self.bias = !bias ? nil : initialize ? try uniformInit([outFeatures], bound: bound, generator: generator) : try Tensor.zeros([outFeatures])
        super.init()
        register("weight", weight)
        if let b = self.bias { register("bias", b) }
    }

    /// A low-rank adapter added to this layer (see `Module.addLoRA`).
    public private(set) var lora: LoRA?

    private var cast = CastCache()

    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        guard let lora else { return try F.linear(x, weight, bias, cache: &cast) }
        return try lora.apply(x, weight: weight, bias: bias)
    }

    func attachLoRA(rank: Int, alpha: Double, generator: Generator?) throws {
        let adapter = try LoRA(inFeatures: inFeatures, outFeatures: outFeatures, rank: rank, alpha: alpha,
                               generator: generator)
        let a = Module(), b = Module()
        a.register("weight", adapter.a)
        b.register("weight", adapter.b)
        register("lora_A", a)
        register("lora_B", b)
        lora = adapter
    }

    /// The weight a pass without autograd multiplies by: the base weight with any adapter merged in.
    func inferenceWeight() throws -> Tensor { try lora?.merge(weight) ?? weight }

    /// Changes whenever the weight, bias or adapter holds other values (content versions).
    var versions: [ContentVersion] {
        [weight.contentVersion] + (bias.map { [$0.contentVersion] } ?? []) + (lora?.versions ?? [])
    }

    var loraChildren: [Module] { lora == nil ? [] : children.filter { $0.name.hasPrefix("lora_") }.map(\.module) }
}

public final class Embedding: Module {
    public let weight: Tensor
    public init(_ count: Int, _ dim: Int, initialize: Bool = true, generator: Generator? = nil) throws {
        weight = initialize ? try Tensor.randn([count, dim], generator: generator) : try Tensor.empty([count, dim])
        super.init()
        register("weight", weight)
    }
    public func callAsFunction(_ ids: Tensor) throws -> Tensor { try F.embedding(weight, ids) }
}

public final class RMSNorm: Module {
    public let weight: Tensor
    public let eps: Double
    public init(_ dim: Int, eps: Double = 1e-6) throws {
        weight = try Tensor.ones([dim])
        self.eps = eps
        super.init()
        register("weight", weight)
    }
    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        try F.rmsNorm(x, shape: [weight.size(0)], weight: weight, eps: eps)
    }
}

public final class LayerNorm: Module {
    public let weight: Tensor?, bias: Tensor?
    public let dim: Int, eps: Double
    public init(_ dim: Int, eps: Double = 1e-5, affine: Bool = true, bias: Bool = true) throws {
        self.dim = dim
        self.eps = eps
        weight = affine ? try Tensor.ones([dim]) : nil
        self.bias = affine && bias ? try Tensor.zeros([dim]) : nil
        super.init()
        if let w = weight { register("weight", w) }
        if let b = self.bias { register("bias", b) }
    }
    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        try F.layerNorm(x, shape: [dim], weight: weight, bias: bias, eps: eps)
    }
}

public final class Conv2d: Module {
    public let weight: Tensor, bias: Tensor?
    public let stride: (Int, Int), padding: (Int, Int), groups: Int

    public init(_ inChannels: Int, _ outChannels: Int, kernel: (Int, Int), stride: (Int, Int) = (1, 1),
                padding: (Int, Int) = (0, 0), groups: Int = 1, bias: Bool = true, generator: Generator? = nil) throws {
        let fanIn = inChannels / groups * kernel.0 * kernel.1
        let bound = 1 / Double(fanIn).squareRoot()
        weight = try uniformInit([outChannels, inChannels / groups, kernel.0, kernel.1], bound: bound, generator: generator)
        self.bias = bias ? try uniformInit([outChannels], bound: bound, generator: generator) : nil
        self.stride = stride
        self.padding = padding
        self.groups = groups
        super.init()
        register("weight", weight)
        if let b = self.bias { register("bias", b) }
    }
    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        try F.conv2d(x, weight, bias, stride: stride, padding: padding, groups: groups)
    }
}

/// Batch norm in inference form: running statistics are buffers, never updated.
public final class BatchNorm2d: Module {
    public let weight: Tensor, bias: Tensor, runningMean: Tensor, runningVar: Tensor
    public let eps: Double
    public init(_ channels: Int, eps: Double = 1e-5) throws {
        weight = try Tensor.ones([channels])
        bias = try Tensor.zeros([channels])
        runningMean = try Tensor.zeros([channels])
        runningVar = try Tensor.ones([channels])
        self.eps = eps
        super.init()
        register("weight", weight)
        register("bias", bias)
        registerBuffer("running_mean", runningMean)
        registerBuffer("running_var", runningVar)
    }
    /// Statistics of this layer's input on the domain the model was trained on (see `calibration`).
    public var source: (mean: Tensor, variance: Tensor)?
    /// Label-free test-time recalibration (after Schneider et al. 2020, "covariate shift
    /// adaptation"): `.measureSource` records the batch's input statistics as `source`;
    /// `.matchSource` fixes a per-channel affine map that gives the batch's input the source's
    /// mean and variance. Measured on one batch in one forward pass, so every layer sees the
    /// already corrected output of the layers before it. `.off` (the default) only applies a
    /// correction fixed earlier, if any.
    public enum Calibration: Sendable { case off, measureSource, matchSource }
    public var calibration = Calibration.off
    public private(set) var correction: (scale: Tensor, shift: Tensor)?

    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        var x = x
        switch calibration {
        case .off: break
        case .measureSource:
            source = try (x.mean([0, 2, 3]), x.variance([0, 2, 3], unbiased: false))
        case .matchSource:
            guard let source else { throw TorchError("batch norm: no source statistics to match") }
            let m = try x.mean([0, 2, 3]), v = try x.variance([0, 2, 3], unbiased: false)
            let scale = try ((source.variance + eps) / (v + eps)).sqrt()
            try setCorrection(scale: scale, shift: source.mean - scale * m)
        }
        if let c = correction {
            x = try x * c.scale.view([1, -1, 1, 1]) + c.shift.view([1, -1, 1, 1])
        }
        return try F.batchNorm(x, weight: weight, bias: bias, mean: runningMean, variance: runningVar, eps: eps)
    }

    /// Sets (or with nil, removes) the input correction x → scale·x + shift, per channel.
    public func setCorrection(scale: Tensor?, shift: Tensor?) throws {
        guard let scale, let shift else { correction = nil; return }
        let n = weight.size(0)
        guard scale.shape == [n], shift.shape == [n] else {
            throw TorchError("batch norm correction has shapes \(scale.shape) and \(shift.shape), expected [\(n)]")
        }
        correction = (scale, shift)
    }
}

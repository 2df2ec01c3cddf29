import Foundation

/// Anything that maps [.., in] → [.., out] like a Linear (a plain one or a LoRA-wrapped one).
public protocol LinearLayer: Module {
    var weight: Tensor { get }
    func callAsFunction(_ x: Tensor) throws -> Tensor
}

extension Linear: LinearLayer {}

/// A frozen Linear plus a trainable low-rank update: y = base(x) + (alpha/r) · B(A(x)).
/// The base parameters keep their checkpoint names (`weight`, `bias`) so the wrapped model
/// still loads base checkpoints; the adapter adds `lora_A.weight` and `lora_B.weight`.
public final class LoRALinear: Module, LinearLayer {
    public let base: Linear
    public let loraA: Tensor, loraB: Tensor
    public let scale: Double
    /// Off = the base layer alone (the frozen starting model, e.g. as the KL reference).
    public var enabled = true
    public var weight: Tensor { base.weight }

    public init(_ base: Linear, rank: Int, alpha: Double, generator: Generator? = nil) throws {
        self.base = base
        // As PEFT: A is kaiming-uniform, B starts at zero, so the wrapped layer starts exactly
        // equal to the base layer.
        let bound = 1 / Double(base.inFeatures).squareRoot()
        loraA = try (Tensor.rand([rank, base.inFeatures], generator: generator) * (2 * bound) - bound)
        loraB = try Tensor.zeros([base.outFeatures, rank])
        scale = alpha / Double(rank)
        super.init()
        register("weight", base.weight)
        if let b = base.bias { register("bias", b) }
        let a = Module(), bm = Module()
        a.register("weight", loraA)
        bm.register("weight", loraB)
        register("lora_A", a)
        register("lora_B", bm)
        try base.weight.requiresGrad(false)
        try base.bias?.requiresGrad(false)
        try loraA.requiresGrad(true)
        try loraB.requiresGrad(true)
    }

    /// W + scale·B·A for forward passes without autograd (rollout, evaluation): one matmul
    /// instead of three plus an add, which matters when decoding runs one token at a time.
    /// Rebuilt when any of the three tensors has been modified in place since (optimiser step, load).
    private var merged: (weight: Tensor, versions: [Int])?

    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        guard enabled else { return try base(x) }
        guard !LibTorch.gradEnabled else { return try base(x) + F.linear(F.linear(x, loraA), loraB) * scale }
        let versions = [base.weight.version, loraA.version, loraB.version]
        if merged?.versions != versions {
            merged = (try base.weight + loraB.matmul(loraA) * scale, versions)
        }
        return try F.linear(x, merged!.weight, base.bias)
    }
}

import Foundation

/// A trainable low-rank update of a Linear (Hu et al. 2021): y = W x + b + (alpha/r) · B A x.
/// Its tensors are registered on the Linear as `lora_A.weight` and `lora_B.weight`, so a model with
/// adapters keeps every base parameter name and still loads base checkpoints.
public final class LoRA {
    public let a: Tensor, b: Tensor
    public let rank: Int
    public let scale: Double
    /// W + scale·B·A for passes without autograd (rollout, evaluation): one matmul instead of three
    /// plus an add per call. Rebuilt when W, A or B holds other values since (optimiser step, load,
    /// weight swap), which their content versions tell.
    private var merged: (weight: Tensor, versions: [ContentVersion])?
    private var cast = CastCache(), baseCast = CastCache()

    init(inFeatures: Int, outFeatures: Int, rank: Int, alpha: Double, generator: Generator?) throws {
        // As PEFT: A is uniform(±1/√in), B starts at zero, so the layer starts equal to the base layer.
        let bound = 1 / Double(inFeatures).squareRoot()
        a = try Tensor.rand([rank, inFeatures], generator: generator) * (2 * bound) - bound
        b = try Tensor.zeros([outFeatures, rank])
        self.rank = rank
        scale = alpha / Double(rank)
    }

    func apply(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> Tensor {
        guard !LibTorch.gradEnabled else {
            // The adapter's two thin products stay fp32 under bf16: they are cheap, and small updates
            // of B would round away in bf16. The sum takes the base output's dtype (the input's).
            let base = try F.linear(x, weight, bias, cache: &baseCast)
            let update = try F.linear(F.linear(x.to(.float32), a), b) * scale
            return try base + update.to(base.dtype)
        }
        let versions = [weight.contentVersion, a.contentVersion, b.contentVersion]
        if merged?.versions != versions { merged = (try merge(weight), versions) }
        return try F.linear(x, merged!.weight, bias, cache: &cast)
    }

    func merge(_ weight: Tensor) throws -> Tensor { try noGrad { try weight + b.matmul(a) * scale } }

    var versions: [ContentVersion] { [a.contentVersion, b.contentVersion] }
}

/// Linears that read the same input (q/k/v, gate/up) as one product in passes without autograd: their
/// weights (LoRA merged) concatenated, in the precision of the product, and rebuilt when any of them
/// changes; a decode step then casts its input and launches a product once instead of per projection.
/// Under autograd each linear runs on its own, so gradients reach every weight and adapter as before.
public final class FusedLinears {
    let parts: [Linear]
    /// Mixed biased and unbiased parts would need a padded bias; they simply run one by one.
    let fusable: Bool
    private var fused: (weight: Tensor, bias: Tensor?, versions: [ContentVersion], bf16: Bool)?

    public init(_ parts: [Linear]) {
        self.parts = parts
        fusable = parts.count > 1 && Set(parts.map { $0.bias == nil }).count == 1
    }

    public func callAsFunction(_ x: Tensor) throws -> [Tensor] {
        guard !LibTorch.gradEnabled, fusable else { return try parts.map { try $0(x) } }
        let bf16 = Precision.current == .bf16 && [.float32, .bfloat16].contains(x.dtype)
        let versions = parts.flatMap(\.versions)
        if fused?.versions != versions || fused?.bf16 != bf16 {
            fused = nil
            fused = try concatenated(bf16: bf16, versions: versions)
        }
        let (w, b) = (fused!.weight, fused!.bias)
        let y = bf16 ? try F.linear(x.to(.bfloat16), w, b).to(x.dtype) : try F.linear(x, w, b)
        return try y.split(parts.map(\.outFeatures), dim: -1)
    }

    private func concatenated(bf16: Bool, versions: [ContentVersion]) throws
        -> (weight: Tensor, bias: Tensor?, versions: [ContentVersion], bf16: Bool) {
        try noGrad {
            let dtype: DType = bf16 ? .bfloat16 : .float32
            let w = try Tensor.cat(parts.map { try $0.inferenceWeight() }, dim: 0).to(dtype)
            let biases = parts.compactMap(\.bias)
            return (w, biases.isEmpty ? nil : try Tensor.cat(biases, dim: 0).to(dtype), versions, bf16)
        }
    }
}

extension Module {
    /// Attaches LoRA adapters to every Linear below this module whose own name (the last part of its
    /// parameter path, e.g. `q_proj`) is in `targets`; returns how many. Linears that already carry an
    /// adapter are left alone. Which parameters train is the caller's choice (see `requiresGrad`).
    @discardableResult
    public func addLoRA(rank: Int, alpha: Double, targets: Set<String>, generator: Generator) throws -> Int {
        guard rank > 0 else { throw TorchError("LoRA rank must be positive, got \(rank)") }
        var added = 0
        for (name, m) in namedModules() {
            guard let linear = m as? Linear, linear.lora == nil,
                  targets.contains(String(name.split(separator: ".").last ?? "")) else { continue }
            try linear.attachLoRA(rank: rank, alpha: alpha, generator: generator)
            added += 1
        }
        return added
    }

    /// The LoRA adapter modules (`lora_A`, `lora_B`) below this module.
    public var loraModules: [Module] {
        namedModules().compactMap { $0.module as? Linear }.flatMap { $0.loraChildren }
    }

    /// The normalisation layers below this module (batch, layer and RMS norms).
    public var normLayers: [Module] { namedModules().map(\.module).filter { $0 is NormLayer } }
}

/// Marks normalisation layers, whose affine parameters test-time adaptation may train alone.
public protocol NormLayer: Module {}
extension BatchNorm2d: NormLayer {}
extension LayerNorm: NormLayer {}
extension RMSNorm: NormLayer {}

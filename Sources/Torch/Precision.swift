import Foundation

/// What matrix products compute in. `.bf16` is PyTorch's CPU autocast for linear layers: they take fp32
/// inputs, multiply in bf16 with fp32 accumulation, and return fp32 (rounded through bf16); norms,
/// softmax, attention, losses and the optimiser stay fp32, and the weights themselves stay fp32 (the
/// master copy that AdamW updates). The LM head is a linear layer too (see `OutputHead`).
public enum Precision: String, Sendable, CaseIterable {
    case fp32, bf16

    /// The process-wide setting (fp32 unless a caller chooses otherwise).
    nonisolated(unsafe) public static var current = Precision.fp32

    /// Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm).
    public static var cpuHasBF16: Bool {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return false }
        return info.contains("avx512_bf16") || info.contains("amx_bf16") || info.contains(" bf16")
    }
}

/// A weight's low-precision copy, rebuilt when the weight changes in place (libtorch's version counter)
/// or is another tensor (a merged LoRA weight is rebuilt as a new tensor, whose counter starts again).
/// For a weight that trains, under autograd, the cast is part of the graph instead, so the fp32 master
/// weight gets the gradient.
public struct CastCache {
    private var cached: (source: Tensor, version: Int, tensor: Tensor)?

    public init() {}

    public mutating func bf16(_ w: Tensor) throws -> Tensor {
        guard !(LibTorch.gradEnabled && w.requiresGrad) else { return try w.to(.bfloat16) }
        let v = w.version
        if cached?.source !== w || cached?.version != v { cached = (w, v, try noGrad { try w.to(.bfloat16) }) }
        // A frozen weight's copy carries no graph, so autograd passes may share it too.
        return cached!.tensor
    }
}

extension F {
    /// `linear` under the current precision; `cache` holds the weight's bf16 copy.
    public static func linear(_ x: Tensor, _ w: Tensor, _ b: Tensor?, cache: inout CastCache) throws -> Tensor {
        guard Precision.current == .bf16, x.dtype == .float32 else { return try linear(x, w, b) }
        return try linear(x.to(.bfloat16), cache.bf16(w), b?.to(.bfloat16)).to(.float32)
    }
}

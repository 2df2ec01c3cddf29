import Foundation

/// What matrix products compute in. `.bf16` follows PyTorch's CPU autocast: linear layers multiply in bf16
/// with fp32 accumulation; an fp32 input gives an fp32 output (rounded through bf16), a bf16 input a bf16
/// output, so a block that casts its input once (`activations`) keeps its products (q/k/v, o_proj,
/// gate/up → down) in bf16 as autocast does. Norms, the residual stream, attention (see `LlamaAttention`),
/// softmax of the logits, losses and the optimiser stay fp32, and the weights themselves stay fp32 (the
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

    /// `x` in the dtype a block's matrix products run in: bf16 under `.bf16`, else unchanged.
    public static func activations(_ x: Tensor) throws -> Tensor {
        current == .bf16 && x.dtype == .float32 ? try x.to(.bfloat16) : x
    }
}

/// A weight's low-precision copies, rebuilt when the weight holds other values (its content version: written
/// in place, or other storage swapped in) or is another tensor (a merged LoRA weight is rebuilt as a new
/// tensor, whose counter starts again). For a weight that trains, under autograd, the copy enters the graph
/// through a node that hands the gradient back to the fp32 master weight.
public struct CastCache {
    /// Two entries: a weight's live values and the reference values swapped in for the KL pass each step.
    private var entries: [(source: Tensor, content: ContentVersion, tensor: Tensor)] = []

    public init() {}

    /// `w` in bf16, cast once per content. Under autograd a trained weight gets the cached copy through a
    /// graph node whose backward casts the gradient back, so the training forward reuses the rollout's cast.
    public mutating func bf16(_ w: Tensor) throws -> Tensor {
        let content = w.contentVersion
        let copy: Tensor
        if let hit = entries.first(where: { $0.source === w && $0.content == content }) {
            copy = hit.tensor
        } else {
            copy = try noGrad { try w.to(.bfloat16) }
            entries = Array((entries.filter { $0.source === w } + [(w, content, copy)]).suffix(2))
        }
        guard LibTorch.gradEnabled && w.requiresGrad else { return copy }
        return try Tensor.cachedCast(w, copy)
    }
}

extension F {
    /// `linear` under the current precision; `cache` holds the weight's bf16 copy. Under bf16 the output
    /// has the input's dtype.
    public static func linear(_ x: Tensor, _ w: Tensor, _ b: Tensor?, cache: inout CastCache) throws -> Tensor {
        guard Precision.current == .bf16 else { return try linear(x, w, b) }
        switch x.dtype {
        case .bfloat16: return try linear(x, cache.bf16(w), b?.to(.bfloat16))
        case .float32: return try linear(x.to(.bfloat16), cache.bf16(w), b?.to(.bfloat16)).to(.float32)
        default: return try linear(x, w, b)
        }
    }
}

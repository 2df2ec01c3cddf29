import CTorch
import Foundation

/// AdamW (decoupled weight decay, Loshchilov & Hutter) on libtorch's fused kernel.
public final class AdamW {
    public let params: [Tensor]
    public var lr: Double
    public let beta1: Double, beta2: Double, eps: Double, weightDecay: Double
    private var expAvg: [Tensor] = []
    private var expAvgSq: [Tensor] = []
    private var steps: [Tensor] = []
    public private(set) var stepCount = 0

    public init(_ params: [Tensor], lr: Double, betas: (Double, Double) = (0.9, 0.999), eps: Double = 1e-8,
                weightDecay: Double = 0.01) throws {
        self.params = params
        self.lr = lr
        beta1 = betas.0
        beta2 = betas.1
        self.eps = eps
        self.weightDecay = weightDecay
        try noGrad {
            for p in params {
                expAvg.append(try Tensor.zeros(p.shape, dtype: p.dtype))
                expAvgSq.append(try Tensor.zeros(p.shape, dtype: p.dtype))
                steps.append(try Tensor.scalar(0, dtype: .float32))
            }
        }
    }

    /// One update of every parameter that has a gradient.
    public func step() throws {
        var p: [Tensor] = [], g: [Tensor] = [], m: [Tensor] = [], v: [Tensor] = [], s: [Tensor] = []
        for i in params.indices {
            guard let grad = params[i].grad else { continue }
            p.append(params[i]); g.append(grad); m.append(expAvg[i]); v.append(expAvgSq[i]); s.append(steps[i])
        }
        stepCount += 1
        guard !p.isEmpty else { return }
        let rc = withExtendedLifetime([p, g, m, v, s]) {
            tt_adamw_step(p.map { $0.handle }, g.map { $0.handle }, m.map { $0.handle }, v.map { $0.handle },
                          s.map { $0.handle }, Int32(p.count), lr, beta1, beta2, weightDecay, eps)
        }
        if rc != 0 { throw Tensor.lastError() }
    }

    public func zeroGrad() throws { for p in params { try p.zeroGrad() } }

    /// Optimiser state, for checkpoints that resume exactly.
    public func state() -> [String: Tensor] {
        var d: [String: Tensor] = [:]
        for i in params.indices {
            d["\(i).exp_avg"] = expAvg[i]
            d["\(i).exp_avg_sq"] = expAvgSq[i]
            d["\(i).step"] = steps[i]
        }
        return d
    }
    public func loadState(_ d: [String: Tensor]) throws {
        try noGrad {
            for i in params.indices {
                guard let a = d["\(i).exp_avg"], let b = d["\(i).exp_avg_sq"], let s = d["\(i).step"] else {
                    throw TorchError("AdamW.loadState: no state for parameter \(i)")
                }
                try expAvg[i].copy_(a)
                try expAvgSq[i].copy_(b)
                try steps[i].copy_(s)
            }
        }
    }
}

/// Global L2 norm of the gradients of `params`; when finite and above `maxNorm` the gradients
/// are scaled down to it. A non-finite norm is returned as is so the caller can skip the step.
public func clipGradNorm(_ params: [Tensor], maxNorm: Double) throws -> Double {
    let grads = params.compactMap(\.grad)
    var norm = 0.0
    let rc = withExtendedLifetime(grads) {
        tt_clip_grad_norm(grads.map { $0.handle }, Int32(grads.count), maxNorm, &norm)
    }
    if rc != 0 { throw Tensor.lastError() }
    return norm
}

/// Learning-rate schedules, evaluated per optimiser step.
public enum LRSchedule: Sendable {
    case constant
    /// Linear warm-up from 0 over `warmup` steps, then cosine decay to `minRatio`·lr at `total`.
    case cosine(warmup: Int, total: Int, minRatio: Double = 0)

    /// Multiplier of the base lr for 0-based `step`.
    public func factor(at step: Int) -> Double {
        switch self {
        case .constant:
            return 1
        case let .cosine(warmup, total, minRatio):
            // HF/verl form: lr grows as step/warmup, so step 0 of a warm-up has lr 0.
            if warmup > 0, step < warmup { return Double(step) / Double(warmup) }
            let span = Swift.max(1, total - warmup)
            let progress = Swift.min(1, Double(step - warmup) / Double(span))
            return minRatio + (1 - minRatio) * 0.5 * (1 + cos(Double.pi * progress))
        }
    }
}

import Foundation
import Models
import Torch

/// The reference's loss settings (verl): PPO-clip with dual clip, token-mean, low_var_kl.
public struct PolicyLossConfig: Sendable {
    public var clip = 0.2
    public var dualClip = 3.0
    public var klCoef = 0.001
    public init() {}
}

public enum GRPO {
    /// log p(response token | prompt, earlier response tokens) for each response, [B, R], and the
    /// mask of real tokens [B, R] (responses are right-padded to the longest).
    ///
    /// The prompt is run once at batch 1; the responses then run against its keys/values. With
    /// autograd on, gradients reach the prompt (and the image embeddings in it) once, summed
    /// over the responses, instead of once per response.
    public static func sequenceLogprobs(lm: CausalLM, prompt: PreparedPrompt, responses: [[Int]], padId: Int) throws -> (Tensor, Tensor) {
        let b = responses.count
        let r = responses.map(\.count).max() ?? 0
        guard b > 0, r > 0 else { throw DatasetError(message: "sequenceLogprobs: no response tokens") }
        var tokens: [Int64] = [], mask: [Float] = []
        for resp in responses {
            tokens += resp.map { Int64($0) } + Array(repeating: Int64(padId), count: r - resp.count)
            mask += Array(repeating: 1, count: resp.count) + Array(repeating: 0, count: r - resp.count)
        }
        let tok = try Tensor(tokens, shape: [b, r])
        let cache = KVCache(layers: lm.layerCount, capacity: 0, differentiable: true)
        let hPrompt = try lm.forward(embeddings: prompt.embeddings, positions: prompt.positions, cache: cache, valid: nil)
        let last = try lm.logits(hPrompt.narrow(dim: 1, start: hPrompt.size(1) - 1, length: 1)).reshape([1, -1])
        // The prompt's last position predicts every response's first token.
        let first = try tokenLogprobs(last.expand([b, last.size(1)]), tok.narrow(dim: 1, start: 0, length: 1).squeeze(1))
            .unsqueeze(1)
        var logp = first
        if r > 1 {
            let input = try tok.narrow(dim: 1, start: 0, length: r - 1)
            let pos = try (Tensor.arange(r - 1).unsqueeze(0) + Double(prompt.nextPosition)).expand([b, r - 1])
            let h = try lm.forward(embeddings: lm.embed(input), positions: pos, cache: cache, valid: nil)
            let rest = try tokenLogprobs(lm.logits(h), tok.narrow(dim: 1, start: 1, length: r - 1))
            logp = try Tensor.cat([first, rest], dim: 1)
        }
        return (logp, try Tensor(mask, shape: [b, r]))
    }

    /// log p(target) under `logits` [..., V] for `targets` [...]: the target's logit minus the
    /// log-sum-exp. Unlike gathering from a log-softmax, this keeps no second vocabulary-sized
    /// tensor (a [responses, tokens, 49k] one per step) for the backward pass.
    static func tokenLogprobs(_ logits: Tensor, _ targets: Tensor) throws -> Tensor {
        try logits.gather(dim: -1, index: targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim: -1)
    }

    /// Token-mean of `x` over `mask`.
    public static func maskedMean(_ x: Tensor, _ mask: Tensor) throws -> Tensor {
        try (x * mask).sum() / mask.sum().clamp(min: 1)
    }

    public struct PolicyLoss {
        public var loss: Tensor
        /// Share of trained tokens whose ratio the clip cut.
        public var clipFraction: Double
        /// max |log ratio| over trained tokens: 0 while the update is on-policy.
        public var maxAbsLogRatio: Double
    }

    /// PPO-clip with dual clip (verl's compute_policy_loss): for A<0 the loss is capped at
    /// −A·c so that a very large ratio cannot dominate.
    public static func policyLoss(logp: Tensor, oldLogp: Tensor, advantages: Tensor, mask: Tensor,
                                  config: PolicyLossConfig) throws -> PolicyLoss {
        let adv = try advantages.unsqueeze(1)
        let logRatio = try logp - oldLogp
        let ratio = try logRatio.clamp(min: -20, max: 20).exp()
        let l1 = try adv.neg() * ratio
        let l2 = try adv.neg() * ratio.clamp(min: 1 - config.clip, max: 1 + config.clip)
        let clipped = try l1.maximum(l2)
        let l3 = try adv.neg() * config.dualClip
        let dual = try clipped.minimum(l3)
        let losses = try Tensor.where(adv.lt(0), dual, clipped)
        let loss = try maskedMean(losses, mask)
        return try noGrad {
            PolicyLoss(loss: loss, clipFraction: try maskedMean(l2.gt(l1).to(.float32), mask).item(),
                       maxAbsLogRatio: try (logRatio.abs() * mask).max().item())
        }
    }

    /// "low_var_kl" (k3 estimator) of the policy from the reference per token, clamped to
    /// [−10, 10], token-mean.
    public static func lowVarKL(logp: Tensor, refLogp: Tensor, mask: Tensor) throws -> Tensor {
        let d = try refLogp - logp
        return try maskedMean((d.exp() - d - 1).clamp(min: -10, max: 10), mask)
    }
}

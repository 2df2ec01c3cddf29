import Foundation
import XCTest
@testable import Models
@testable import Torch
@testable import TTRV

/// A small random Llama (vocab 40) for loss and adaptation tests.
func tinyLlama(vocab: Int = 40, seed: UInt64 = 3) throws -> LlamaForCausalLM {
    var c = LlamaConfig(vocabSize: vocab, hiddenSize: 16, intermediateSize: 32, numHiddenLayers: 2, numAttentionHeads: 4, numKeyValueHeads: 2)
    c.rmsNormEps = 1e-5
    let m = try LlamaForCausalLM(c)
    let g = Generator(seed: seed)
    try noGrad { for p in m.parameters { try p.copy_(Tensor.randn(p.shape, generator: g) * 0.5) } }
    return m
}

func ids(_ xs: [Int]) throws -> Tensor { try Tensor(xs.map { Int64($0) }, shape: [1, xs.count]) }

func textPrompt(_ m: LlamaForCausalLM, _ ids: [Int]) throws -> PreparedPrompt {
    PreparedPrompt(embeddings: try m.embed(Tensor(ids.map { Int64($0) }, shape: [1, ids.count])),
                   positions: try Tensor.arange(ids.count).unsqueeze(0), nextPosition: ids.count, tokenIds: ids)
}

final class GRPOTests: XCTestCase {
    /// PPO-clip with dual clip, written out per token:
    /// ratio r = exp(logp − old); for A ≥ 0: max(−A r, −A clip(r, 0.8, 1.2));
    /// for A < 0: min(that, −3A); token-mean over the mask.
    func testPolicyLossMatchesHandComputation() throws {
        let logp: [[Double]] = [[-0.5, -1.0], [-2.0, -0.1]]
        let old: [[Double]] = [[-0.7, -1.0], [-0.2, -0.3]]
        let adv = [1.5, -2.0]
        let mask: [[Double]] = [[1, 1], [1, 0]]
        var sum = 0.0, n = 0.0
        for i in 0..<2 {
            for j in 0..<2 where mask[i][j] == 1 {
                let r = Foundation.exp(logp[i][j] - old[i][j])
                var l = max(-adv[i] * r, -adv[i] * min(max(r, 0.8), 1.2))
                if adv[i] < 0 { l = min(l, -adv[i] * 3) }
                sum += l
                n += 1
            }
        }
        // token 0 of row 0: r = e^0.2 = 1.2214 → clipped to 1.2: max(−1.832, −1.8) = −1.8
        // token 0 of row 1: r = e^−1.8 = 0.165 → max(0.331, 1.6) = 1.6, below the dual cap 6
        let loss = try GRPO.policyLoss(logp: Tensor(logp.flatMap { $0 }, shape: [2, 2]), oldLogp: Tensor(old.flatMap { $0 }, shape: [2, 2]),
                                            advantages: Tensor(adv), mask: Tensor(mask.flatMap { $0 }, shape: [2, 2]), config: PolicyLossConfig())
        XCTAssertEqual(try loss.loss.item(), sum / n, accuracy: 1e-12)
        XCTAssertEqual(sum / n, (-1.8 + -1.5 + 1.6) / 3, accuracy: 1e-12)
    }

    func testDualClipCapsLargeRatiosOnNegativeAdvantage() throws {
        // r = e^3 ≈ 20: −A·r = 40 would dominate; the dual clip caps it at −A·3 = 6.
        let loss = try GRPO.policyLoss(logp: Tensor([0.0], shape: [1, 1]), oldLogp: Tensor([-3.0], shape: [1, 1]),
                                            advantages: Tensor([-2.0]), mask: Tensor([1.0], shape: [1, 1]), config: PolicyLossConfig())
        XCTAssertEqual(try loss.loss.item(), 6, accuracy: 1e-12)
    }

    func testLowVarKLMatchesFormulaAndClamp() throws {
        // k3 = exp(ref − logp) − (ref − logp) − 1, clamped to [−10, 10]
        let lp = [-1.0, -0.5, -20.0], ref = [-1.2, -0.5, -1.0]
        let expected = zip(lp, ref).map { l, r in min(10, Foundation.exp(r - l) - (r - l) - 1) }
        XCTAssertEqual(expected[2], 10) // exp(19) is clamped
        let kl = try GRPO.lowVarKL(logp: Tensor(lp, shape: [1, 3]), refLogp: Tensor(ref, shape: [1, 3]), mask: Tensor([1.0, 1, 1], shape: [1, 3]))
        XCTAssertEqual(try kl.item(), expected.reduce(0, +) / 3, accuracy: 1e-12)
    }

    /// Shared-prefix log-probs (prompt once, responses against its cache) equal running every
    /// full sequence on its own, and so do their gradients.
    func testSharedPrefixLogprobsAndGradientsEqualFullSequences() throws {
        let m = try tinyLlama()
        let prompt = [3, 7, 1, 9, 12], responses = [[5, 6, 2], [8, 2], [5, 5, 5]]
        try m.unfreeze()
        let (lp, mask) = try withGrad { try GRPO.sequenceLogprobs(lm: m, prompt: textPrompt(m, prompt), responses: responses, padId: 0) }
        XCTAssertEqual(try mask.floats(), [1, 1, 1, 1, 1, 0, 1, 1, 1])
        try GRPO.maskedMean(lp, mask).backward()
        let shared = try m.model.layers[0].self_attn.q_proj.weight.grad!.floats()
        let sharedEmb = try m.model.embed_tokens.weight.grad!.floats()
        for p in m.parameters { try p.zeroGrad() }

        var total = try Tensor.scalar(0)
        var reference: [Float] = []
        for r in responses {
            let logp = try m(ids(prompt + r)).squeeze(0).logSoftmax(dim: -1)
            for (j, tok) in r.enumerated() {
                let v = try logp.select(dim: 0, index: prompt.count - 1 + j).select(dim: 0, index: tok)
                reference.append(Float(try v.item()))
                total = try total + v
            }
        }
        try (total / Double(reference.count)).backward()
        let mine = try lp.floats().enumerated().filter { try mask.floats()[$0.offset] == 1 }.map(\.element)
        for (a, b) in zip(mine, reference) { XCTAssertEqual(a, b, accuracy: 1e-5) }
        let full = try m.model.layers[0].self_attn.q_proj.weight.grad!.floats()
        let fullEmb = try m.model.embed_tokens.weight.grad!.floats()
        XCTAssertLessThan(zip(shared, full).map { abs($0 - $1) }.max()!, 1e-5)
        XCTAssertLessThan(zip(sharedEmb, fullEmb).map { abs($0 - $1) }.max()!, 1e-5)
    }

    /// d(PPO + KL loss)/d(weights) against central differences on a few weights of a tiny model.
    func testLossGradientMatchesFiniteDifferences() throws {
        let m = try tinyLlama()
        let prompt = try textPrompt(m, [4, 2, 9])
        let responses = [[5, 6], [7, 1], [5, 3]]
        let adv = try Tensor([1.0, -0.5, -0.5].map { Float($0) })
        let (old, _) = try noGrad { try GRPO.sequenceLogprobs(lm: m, prompt: prompt, responses: responses, padId: 0) }
        let ref = try old - 0.3 // a reference that differs, so the KL term has a gradient
        let oldShift = try old + 0.1 // ratios away from 1 (inside the clip range)
        func loss() throws -> Tensor {
            let (lp, mask) = try GRPO.sequenceLogprobs(lm: m, prompt: textPrompt(m, [4, 2, 9]), responses: responses, padId: 0)
            let pg = try GRPO.policyLoss(logp: lp, oldLogp: oldShift, advantages: adv, mask: mask, config: PolicyLossConfig())
            return try pg.loss + GRPO.lowVarKL(logp: lp, refLogp: ref, mask: mask) * 0.5
        }
        let w = m.model.layers[1].mlp.down_proj.weight
        try w.requiresGrad(true)
        try withGrad { try loss().backward() }
        let analytic = try w.grad!.floats()
        let base = try w.floats()
        let h: Float = 1e-2
        for i in [0, 5, 17, 40, 101] {
            func at(_ delta: Float) throws -> Double {
                var v = base
                v[i] += delta
                try noGrad { try w.copy_(Tensor(v, shape: w.shape)) }
                return try noGrad { try loss().item() }
            }
            let numeric = (try at(h) - at(-h)) / Double(2 * h)
            try noGrad { try w.copy_(Tensor(base, shape: w.shape)) }
            XCTAssertEqual(Double(analytic[i]), numeric, accuracy: 2e-3 + 2e-2 * abs(numeric), "weight \(i)")
        }
    }
}

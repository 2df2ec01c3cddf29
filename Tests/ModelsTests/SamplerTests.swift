import Foundation
import XCTest
@testable import Models
@testable import Torch

/// The sampler draws from softmax(logits / T), hand-computed here, and reports each draw's log-probability.
final class SamplerTests: XCTestCase {
    func testDrawsFollowTheSoftmaxAndLogprobsMatchIt() throws {
        let logits: [Float] = [2.0, 1.0, 0.0, -1.0, -30.0, 0.5]
        let rows = 40_000
        for temperature in [1.0, 0.7] {
            let z = logits.map { exp(Double($0) / temperature) }
            let p = z.map { $0 / z.reduce(0, +) }
            let batch = try Tensor(Array([[Float]](repeating: logits, count: rows).joined()), shape: [rows, logits.count])
            let (ids, lps) = try Sampler.sample(batch, params: SamplingParams(temperature: temperature, seed: 7),
                                                generator: Generator(seed: 7))
            var counts = [Int](repeating: 0, count: logits.count)
            for (id, lp) in zip(ids, lps) {
                counts[id] += 1
                XCTAssertEqual(Double(lp), log(p[id]), accuracy: 1e-5)
            }
            for (k, c) in counts.enumerated() {
                let sd = (Double(rows) * p[k] * (1 - p[k])).squareRoot()
                XCTAssertEqual(Double(c), Double(rows) * p[k], accuracy: 5 * sd + 1, "T \(temperature), token \(k)")
            }
            XCTAssertEqual(counts[4], 0, "a token of probability 1e-14 is not drawn in 40k tries")
        }
    }

    func testTopKAndTopPKeepTheUnfilteredLogprob() throws {
        let logits: [Float] = [3.0, 2.0, -1.0, -2.0]
        let rows = 2_000
        let batch = try Tensor(Array([[Float]](repeating: logits, count: rows).joined()), shape: [rows, logits.count])
        let z = logits.map { exp(Double($0)) }
        let p = z.map { $0 / z.reduce(0, +) }
        for params in [SamplingParams(topK: 2, seed: 1), SamplingParams(topP: 0.8, seed: 1)] {
            let (ids, lps) = try Sampler.sample(batch, params: params, generator: Generator(seed: 1))
            XCTAssertTrue(ids.allSatisfy { $0 < 2 }, "only the two most likely tokens survive the filter")
            for (id, lp) in zip(ids, lps) { XCTAssertEqual(Double(lp), log(p[id]), accuracy: 1e-5) }
        }
    }
}

/// Under bf16 the LM head's logits are rounded (8 mantissa bits); greedy decoding re-scores the best few in fp32.
final class OutputHeadTests: XCTestCase {
    func testRescoringRecoversTheFP32WinnerOfABF16Tie() throws {
        Precision.current = .bf16
        defer { Precision.current = .fp32 }
        // 100.1 and 100.2 both round to 100 in bf16 (steps of 0.5 there): a tie that argmax breaks by index.
        let head = OutputHead(weight: try Tensor([100.1, 100.2, -5, 3, 7, 1] as [Float], shape: [6, 1]))
        let hidden = try Tensor([1] as [Float], shape: [1, 1])
        let logits = try noGrad { try head.logits(hidden) }
        XCTAssertEqual(try logits.floats()[0], try logits.floats()[1], "bf16 rounds both to the same logit")
        XCTAssertEqual(try logits.argmax(dim: -1).ints(), [0])
        let rescored = try noGrad { try head.rescoringBest(logits, hidden: hidden) }
        XCTAssertEqual(try rescored.argmax(dim: -1).ints(), [1])
        XCTAssertEqual(Double(try rescored.floats()[1]), 100.2, accuracy: 1e-4)
        Precision.current = .fp32
        XCTAssertEqual(try noGrad { try head.rescoringBest(logits, hidden: hidden) }.floats(), try logits.floats(),
                       "a no-op in fp32")
    }
}

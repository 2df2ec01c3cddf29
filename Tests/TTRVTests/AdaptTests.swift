import Foundation
import XCTest
@testable import Models
@testable import Torch
@testable import TTRV

/// A text-only "VLM" over a tiny random decoder, enough to drive the adaptation loop.
final class TextVLM: VisionLanguageModel {
    let model: LlamaForCausalLM
    let tokenizer: Tokenizer
    let stopIds: Set<Int>
    let module: Module
    var lm: CausalLM { model }
    var parts: ModelParts { ModelParts(vision: [], projector: [], language: model) }
    var defaultTrainedParts: [ModelPart] { [.lm] }

    init() throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures")
        tokenizer = try Tokenizer(tokenizerJSON: fixtures.appendingPathComponent("tokenizer/qwen2/tokenizer.json"))
        let m = try tinyLlama(vocab: tokenizer.vocabSize, seed: 5)
        // Sharper output distribution, so that the first rollout has a clear majority (a random
        // model spreads its samples over the whole vocabulary).
        try noGrad { try m.lmHead.mul_(6) }
        model = m
        stopIds = [tokenizer.id(of: "<|im_end|>")!]
        module = Module()
        module.register("model", model)
    }

    func prepare(text: String, image: Image?, system: String?) throws -> PreparedPrompt {
        try textPrompt(model, tokenizer.encode(text))
    }
}

final class AdaptTests: XCTestCase {
    func testAdaptationRaisesTheMajorityAnswerWithoutLabels() throws {
        let vlm = try TextVLM()
        let item = Item(id: "q", prompt: "which shape is it?", image: nil, answer: nil, options: nil, label: nil)
        // p(answer) = the mass of every next token whose reply parses to that answer.
        let stop = vlm.stopIds.first!
        let answerOfToken = (0..<vlm.tokenizer.vocabSize).map { id in
            extractReferenceAnswer(id == stop ? "<|im_end|>" : vlm.tokenizer.decode([id], skipSpecial: true))
        }
        func mass(_ probs: [Float], _ answer: String) -> Float {
            zip(probs, answerOfToken).filter { $0.1 == answer }.map(\.0).reduce(0, +)
        }
        func nextTokenProbs() throws -> [Float] {
            try noGrad {
                let p = try vlm.prepare(text: item.prompt, image: nil, system: nil)
                let h = try vlm.lm.forward(embeddings: p.embeddings, positions: p.positions, cache: nil, valid: nil)
                return try vlm.lm.logits(h.narrow(dim: 1, start: h.size(1) - 1, length: 1)).reshape([-1]).softmax(dim: 0).floats()
            }
        }
        let before = try nextTokenProbs()
        var o = AdaptOptions()
        o.mode = .reference
        o.votes = 16
        o.trainSamples = 16
        o.maxNewTokens = 1 // one-token replies: the answer is the token
        o.lr = 3e-3
        o.klCoef = 0.001
        o.adaptSamples = 1
        o.batchPrompts = 1
        o.epochs = 4
        o.warmupRatio = 0
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("adapt-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        let adapter = try Adapter(vlm: vlm, options: o, out: out, log: { _ in })
        // The majority of the first rollout is what the label-free reward pushes towards.
        let steps = Adapter.schedule(items: [item], options: o)
        XCTAssertEqual(steps.count, 4)
        var logs: [StepLog] = []
        for (i, b) in steps.enumerated() { logs.append(try adapter.step(b, index: i, epoch: i, totalSteps: steps.count)) }
        let after = try nextTokenProbs()
        // From a nearly flat start, whichever answer the votes favour early is reinforced (which one depends on
        // the sampled stream): the policy concentrates on the answer it ends up voting for.
        let majority = try XCTUnwrap(logs.last!.majorities[0])
        XCTAssertGreaterThan(mass(after, majority), mass(before, majority) + 0.2,
                             "p(\(majority)) \(mass(before, majority)) → \(mass(after, majority))")
        XCTAssertGreaterThan(logs.last!.majorityRatio, logs.first!.majorityRatio)
        XCTAssertTrue(logs.allSatisfy { $0.gradNorm.isFinite && $0.skippedUpdates == 0 })
        XCTAssertGreaterThan(logs.last!.kl, 0, "the policy moved away from the frozen start")
    }

    func testScheduleMatchesReferenceStepCount() {
        let items = (0..<20).map { Item(id: "\($0)", prompt: "p", image: nil, answer: nil, options: nil, label: nil) }
        var o = AdaptOptions()
        o.adaptSamples = 20
        o.batchPrompts = 4
        o.epochs = 2
        XCTAssertEqual(Adapter.schedule(items: items, options: o).count, 10) // floor(20/4)·2
        o.oneExample = true
        XCTAssertTrue(Adapter.schedule(items: items, options: o).allSatisfy { $0.allSatisfy { $0.id == "0" } })
    }
}

final class AdaptVisionNormTests: XCTestCase {
    /// `eval_after_norm` evaluates between the matching and the RL steps: the report carries that accuracy,
    /// which differs from the base model's (the matching changes the image features), and a resumed run
    /// reuses the stored evaluation.
    func testEvalAfterNormSeparatesTheTwoGains() throws {
        let data = try Dataset.open("fashion-mnist-c:contrast:5")
        let items = Dataset(name: data.name, items: Array(data.items.prefix(8)))
        var o = smallOptions(votes: 3)
        o.maxNewTokens = 3
        o.evalLimit = 8
        o.evalBatch = 8
        o.visionNorm = true
        o.evalAfterNorm = true
        let out = tempDir("after-norm")
        let first = try Adapter(vlm: try ModelRegistry.load("default"), options: o, out: out, log: { _ in })
            .run(adaptData: items, evalData: items, modelName: "default")
        let norm = try readJSON(EvalReport.self, from: out.appendingPathComponent("eval_after_norm.json"))
        let base = try readJSON(EvalReport.self, from: out.appendingPathComponent("eval_before.json"))
        XCTAssertEqual(first.accuracyAfterNorm, norm.accuracy)
        XCTAssertNotEqual(norm.predictions.map(\.response), base.predictions.map(\.response), "the matching changes replies")
        var logs: [String] = []
        let again = try Adapter(vlm: try ModelRegistry.load("default"), options: o, out: out, log: { logs.append($0) })
            .run(adaptData: items, evalData: items, modelName: "default")
        XCTAssertEqual(again.accuracyAfterNorm, norm.accuracy)
        XCTAssertTrue(logs.contains { $0.contains("eval_after_norm.json: reusing") }, "\(logs)")
    }

    func testVisionNormOnAModelWithoutBatchNormIsAClearError() throws {
        var o = AdaptOptions()
        o.visionNorm = true
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("adapt-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        let adapter = try Adapter(vlm: try TextVLM(), options: o, out: out, log: { _ in })
        let data = Dataset(name: "one", items: [Item(id: "q", prompt: "which?", image: nil, answer: nil, options: nil, label: nil)])
        XCTAssertThrowsError(try adapter.run(adaptData: data, evalData: data, modelName: "tiny")) {
            XCTAssertTrue("\($0)".contains("--vision-norm needs a composed VLM"), "\($0)")
        }
    }
}

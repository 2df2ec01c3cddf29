import Foundation
import XCTest
@testable import Models
@testable import TTRV

/// `ttrv eval` and a short `ttrv adapt` on the tiny random Qwen2.5-VL and InternVL checkpoints:
/// the whole path (loader, processor, batched prefill, fan-out, shared-prefix training with the
/// vision tower frozen, checkpoints, report) runs end to end.
final class VLMEndToEndTests: XCTestCase {
    let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures")

    func items(_ dir: URL) -> Dataset {
        let images = ["wide.png", "tall.png", "wide.png", "tall.png"]
        let items = images.enumerated().map { i, name in
            Item(id: "\(i)", prompt: recognitionPrompt(options: ["cat", "dog", "bird", "fish"]), image: .file(dir.appendingPathComponent(name)),
                 answer: ["A", "B", "C", "D"][i], options: ["cat", "dog", "bird", "fish"], label: nil)
        }
        return Dataset(name: "tiny", items: items)
    }

    func runEndToEnd(model: URL, images: URL) throws {
        let vlm = try ModelRegistry.load(model.path)
        let data = items(images)
        var eo = EvalOptions()
        eo.maxTokens = 3
        eo.votes = 3
        let r = try Evaluator.run(vlm, dataset: data, modelName: "tiny", options: eo, progressLabel: "tiny eval")
        XCTAssertEqual(r.items, 4)
        XCTAssertEqual(r.predictions.count, 4)
        XCTAssertNotNil(r.majAccuracy)
        // Diagnostics computed from the stored predictions, independently of the evaluator's counting.
        let differs = r.predictions.filter { $0.majority != $0.prediction }.count
        XCTAssertEqual(r.majorityDiffersShare, Double(differs) / 4)
        XCTAssertEqual(r.passAtN, Double(r.predictions.filter { $0.passAtN == true }.count) / 4)
        XCTAssertGreaterThanOrEqual(r.passAtN ?? 0, r.majAccuracy ?? 1, "pass@N bounds maj@N")

        var o = AdaptOptions()
        o.mode = .reference // random weights answer garbage; reference mode still votes on it
        o.votes = 4
        o.trainSamples = 2
        o.maxNewTokens = 2
        o.adaptSamples = 2
        o.batchPrompts = 2
        o.epochs = 1
        o.evalBatch = 4
        o.lr = 1e-4
        o.train = [.projector, .lm]
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("e2e-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        let frozenBefore = try vlm.module.namedParameters().filter { $0.name.contains("vision") || $0.name.contains("visual") }.prefix(1).map { try $0.tensor.floats() }
        let report = try Adapter(vlm: vlm, options: o, out: out, log: { _ in }).run(adaptData: data, evalData: data, modelName: "tiny")
        XCTAssertEqual(report.steps, 1)
        XCTAssertEqual(report.evalItems, 4)
        for f in ["report.json", "report.html", "adapt_log.jsonl", "adapted.safetensors", "checkpoint/state.json"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: out.appendingPathComponent(f).path), f)
        }
        let frozenAfter = try vlm.module.namedParameters().filter { $0.name.contains("vision") || $0.name.contains("visual") }.prefix(1).map { try $0.tensor.floats() }
        XCTAssertTrue(frozenBefore == frozenAfter, "the vision tower stays frozen")
    }

    func testQwen25VLEvalAndAdapt() throws {
        let dir = fixtures.appendingPathComponent("qwen25vl")
        try runEndToEnd(model: dir, images: dir)
    }

    func testInternVLEvalAndAdapt() throws {
        try runEndToEnd(model: fixtures.appendingPathComponent("internvl/tiny"), images: fixtures.appendingPathComponent("internvl"))
    }
}

import Foundation
import XCTest
@testable import Models
@testable import TTRV
import Torch

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

/// Vision batch-norm matching for a model trained on several kinds of image: each is a source domain, and
/// unlabelled test images are matched to the domain that needs the smallest correction.
final class VisionSourceTests: XCTestCase {
    func images(_ spec: String, _ n: Int) throws -> [Image] {
        try Dataset.open(spec).items.prefix(n).compactMap { try $0.image?.load() }
    }

    func testShiftedImagesMatchTheirOwnDomainAndTheFileRoundTrips() throws {
        let vlm = try XCTUnwrap(try ModelRegistry.load("default") as? ComposedVLM)
        try vlm.measureVisionSources([("garments", try images("fashion-mnist:train", 32)),
                                      ("shapes", try images("easy-vqa:train", 32))])
        let stats = try vlm.visionSourceStats()
        let layers = vlm.encoder.batchNorms.count
        XCTAssertEqual(stats.count, 2 * 2 * layers)
        XCTAssertEqual(Set(stats.keys.map { String($0.split(separator: "/")[0]) }), ["garments", "shapes"])
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("sources-\(UUID().uuidString).safetensors")
        defer { try? FileManager.default.removeItem(at: file) }
        try saveSafeTensors(stats, metadata: [:], to: file)
        let reloaded = try XCTUnwrap(try ModelRegistry.load("default") as? ComposedVLM)
        try reloaded.loadVisionSourceStats(file)
        for (spec, domain) in [("fashion-mnist-c:contrast:5", "garments"), ("fashion-mnist-c:gaussian_noise:3", "garments"),
                               ("easy-vqa-c:contrast:5", "shapes"), ("easy-vqa-c:gaussian_noise:5", "shapes")] {
            let corrections = try reloaded.matchVisionSource(try images(spec, 12))
            XCTAssertEqual(reloaded.matchedVisionSource, domain, spec)
            XCTAssertEqual(corrections.count, 2 * layers)
        }
        // One domain keeps the unprefixed layout of earlier files.
        try vlm.measureVisionSources([("garments", try images("fashion-mnist:train", 8))])
        XCTAssertTrue(try vlm.visionSourceStats().keys.allSatisfy { !$0.contains("/") })
        try vlm.matchVisionSource(try images("fashion-mnist-c:contrast:5", 4))
        XCTAssertEqual(vlm.matchedVisionSource, "")
    }

    func testAFileMissingALayerIsAnErrorNamingIt() throws {
        let vlm = try XCTUnwrap(try ModelRegistry.load("default") as? ComposedVLM)
        try vlm.measureVisionSources([("a", try images("fashion-mnist:train", 4)), ("b", try images("easy-vqa:train", 4))])
        var stats = try vlm.visionSourceStats()
        let dropped = "b/" + vlm.encoder.batchNorms[3].name + ".variance"
        stats[dropped] = nil
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("sources-\(UUID().uuidString).safetensors")
        defer { try? FileManager.default.removeItem(at: file) }
        try saveSafeTensors(stats, metadata: [:], to: file)
        XCTAssertThrowsError(try vlm.loadVisionSourceStats(file)) {
            XCTAssertTrue("\($0)".contains(file.path) && "\($0)".contains("b/" + vlm.encoder.batchNorms[3].name), "\($0)")
        }
        try saveSafeTensors([:], metadata: [:], to: file)
        XCTAssertThrowsError(try vlm.loadVisionSourceStats(file)) { XCTAssertTrue("\($0)".contains(file.path), "\($0)") }
    }
}

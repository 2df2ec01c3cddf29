import Foundation
import XCTest
@testable import Models
@testable import Torch

/// Checks against Tests/Fixtures/effnet, written by scripts/reference/efficientnet_fixtures.py
/// from the `efficientnet_lite_pytorch` reference model.
final class EfficientNetTests: XCTestCase {
    static let dir = fixturesRoot.appendingPathComponent("effnet")
    static let weightsURL = EfficientNetLite.defaultWeightsPath(repoRoot: repoRoot)
    nonisolated(unsafe) static var cached: EfficientNetLite?

    func model() throws -> EfficientNetLite {
        guard FileManager.default.fileExists(atPath: Self.weightsURL.path) else {
            throw XCTSkip("EfficientNet-Lite0 weights not installed (\(Self.weightsURL.path)); run `make setup`")
        }
        if let m = Self.cached { return m }
        let m = try EfficientNetLite.load(Self.weightsURL)
        Self.cached = m
        return m
    }

    func expected() throws -> [[String: Any]] {
        let url = Self.dir.appendingPathComponent("expected.json")
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        return json["images"] as! [[String: Any]]
    }

    func referenceLogits(_ ref: Any?) throws -> Tensor {
        let r = ref as! [String: Any]
        let offset = r["offset"] as! Int, n = r["count"] as! Int
        let bin = try Data(contentsOf: Self.dir.appendingPathComponent("logits.bin"))
        return try bin.subdata(in: offset..<(offset + 4 * n)).withUnsafeBytes { try Tensor(bytes: $0, dtype: .float32, shape: [n]) }
    }

    /// Reference values at flat indices of `t`, within `tol`.
    func checkProbes(_ t: Tensor, _ probes: Any?, tol: Float, _ what: String) throws {
        let p = probes as! [String: Any]
        let flat = try t.floats()
        for (i, v) in zip(p["index"] as! [Int], p["values"] as! [Double]) {
            XCTAssertEqual(flat[i], Float(v), accuracy: tol, "\(what) at flat index \(i)")
        }
    }

    func input(for run: [String: Any], image: Image) throws -> Tensor {
        if run["kind"] as! String == "eval" { return try EfficientNetLite.preprocess(image, size: run["size"] as! Int) }
        let w = run["width"] as! Int, h = run["height"] as! Int
        let resized = image.rgb().resized(width: w, height: h, filter: .bicubic)
        return try Tensor(resized.floatCHW(mean: [127], std: [128], scale: 1), shape: [1, 3, h, w])
    }

    func testMatchesReferenceOnSamplePhotos() throws {
        let model = try model()
        let classes = try String(contentsOf: Self.dir.appendingPathComponent("imagenet_classes.txt"), encoding: .utf8)
            .split(separator: "\n").map(String.init)
        XCTAssertEqual(classes.count, 1000)
        for entry in try expected() {
            let name = entry["name"] as! String
            let image = try Image.load(Self.dir.appendingPathComponent(entry["file"] as! String))
            XCTAssertEqual(image.channels, entry["mode"] as! String == "L" ? 1 : 3, name)
            for run in entry["runs"] as! [[String: Any]] {
                let what = "\(name) \(run["kind"]!) \(run["size"] ?? "\(run["width"]!)x\(run["height"]!)")"
                let x = try input(for: run, image: image)
                XCTAssertEqual(x.shape, run["input_shape"] as! [Int], what)
                XCTAssertEqual(try x.to(.float64).sum().item(), run["input_sum"] as! Double, accuracy: 1e-3, "\(what) input sum")
                XCTAssertEqual(try x.flatten().narrow(dim: 0, start: 0, length: 8).floats(), (run["input_first"] as! [Double]).map { Float($0) }, what)
                try checkProbes(x, run["input_probes"], tol: 1e-6, "\(what) input")

                let (logits, feats) = try noGrad { (try model(x), try model.features(x)) }
                XCTAssertEqual(logits.shape, [1, 1000], what)
                let diff = try (logits.squeeze(0) - referenceLogits(run["logits"])).abs().max().item()
                XCTAssertLessThan(diff, 1e-3, "\(what): max |logit - reference|")
                let top = try logits.squeeze(0).topk(5)
                let ids = try top.indices.ints()
                XCTAssertEqual(ids, run["top5_ids"] as! [Int], "\(what) top-5 \(ids.map { classes[$0] })")
                XCTAssertEqual(ids.map { classes[$0] }, run["top5_names"] as! [String], what)
                for (mine, ref) in zip(try top.values.floats(), run["top5_logits"] as! [Double]) {
                    XCTAssertEqual(mine, Float(ref), accuracy: 1e-3, "\(what) top-5 logit")
                }

                XCTAssertEqual(feats.shape, run["features_shape"] as! [Int], what)
                let sum = try feats.to(.float64).sum().item(), refSum = run["features_sum"] as! Double
                XCTAssertEqual(sum, refSum, accuracy: 1e-4 * abs(refSum), "\(what) feature-map sum")
                try checkProbes(feats, run["features_probes"], tol: 1e-3, "\(what) features")
            }
        }
    }

    /// The photos are meant to be recognisable; guards against fixtures from a broken reference.
    func testReferenceTopClassesAreSensible() throws {
        let top = try Dictionary(uniqueKeysWithValues: expected().map {
            ($0["name"] as! String, ($0["runs"] as! [[String: Any]])[0]["top5_names"] as! [String])
        })
        XCTAssertEqual(top["coffee"]?.first, "espresso")
        XCTAssertEqual(top["chelsea"]?.first, "Egyptian cat")
        XCTAssertTrue(top["rocket"]?.contains("space shuttle") ?? false)
    }

    func testImageTokensAreTheFeatureMapRowMajor() throws {
        let model = try model()
        let image = try Image.load(Self.dir.appendingPathComponent("chelsea.png"))
        for (size, side) in [(224, 7), (112, 4)] {
            let x = try EfficientNetLite.preprocess(image, size: size)
            let (tokens, feats) = try noGrad { (try model.imageTokens(x), try model.features(x)) }
            XCTAssertEqual(tokens.shape, [1, side * side, 1280])
            XCTAssertLessThanOrEqual(tokens.size(1), 64)
            for t in [0, side + 1, side * side - 1] {
                let fromMap = try feats.select(dim: 2, index: t / side).select(dim: 2, index: t % side)
                XCTAssertEqual(try tokens.select(dim: 1, index: t).floats(), try fromMap.floats(), "token \(t) at \(size)px")
            }
        }
        // Inference-form batch norm: a sample's tokens do not depend on its batch mates.
        let a = try EfficientNetLite.preprocess(image, size: 112)
        let b = try EfficientNetLite.preprocess(Image.load(Self.dir.appendingPathComponent("coffee.png")), size: 112)
        let (single, batched) = try noGrad { (try model.imageTokens(a), try model.imageTokens(Tensor.cat([a, b], dim: 0))) }
        XCTAssertLessThan(try (batched.narrow(dim: 0, start: 0, length: 1) - single).abs().max().item(), 1e-4)
    }

    /// Test-time batch-norm matching: on the source images themselves it is the identity; on a
    /// low-contrast copy it brings the encoder's tokens back towards the clean ones.
    func testVisionNormMatchingUndoesAContrastShift() throws {
        _ = try model() // skips when the weights are not installed
        let encoder = EfficientNetEncoder(net: try EfficientNetLite.load(Self.weightsURL), imageSize: 112, cropPadding: 0)
        let clean = try ["astronaut", "camera", "chelsea", "coffee", "rocket"].map { try Image.load(Self.dir.appendingPathComponent("\($0).png")) }
        let shifted = clean.map { applyShift(.contrast, severity: 4, to: $0, seed: 0) }
        func tokens(_ images: [Image]) throws -> Tensor { try Tensor.cat(images.map { try encoder.encode($0) }, dim: 0) }
        let reference = try tokens(clean)
        func distance(_ t: Tensor) throws -> Double { try ((t - reference).pow(2).sum() / reference.pow(2).sum()).item() }

        try encoder.calibrate(clean, mode: .measureSource)
        XCTAssertEqual(encoder.batchNorms.count, 49)
        XCTAssertTrue(encoder.batchNorms.allSatisfy { $0.module.source != nil && $0.module.correction == nil })
        XCTAssertEqual(try tokens(clean).floats(), try reference.floats(), "measuring leaves the encoder unchanged")

        try encoder.calibrate(clean, mode: .matchSource)
        XCTAssertLessThan(try distance(tokens(clean)), 1e-6, "matching the source to itself is the identity")

        for (_, bn) in encoder.batchNorms { try bn.setCorrection(scale: nil, shift: nil) }
        let before = try distance(tokens(shifted))
        try encoder.calibrate(shifted, mode: .matchSource)
        let after = try distance(tokens(shifted))
        XCTAssertGreaterThan(before, 0.05, "the contrast shift moves the tokens")
        XCTAssertLessThan(after, before / 2, "matching recovers most of the clean tokens (before \(before), after \(after))")
        XCTAssertThrowsError(try encoder.calibrate([], mode: .matchSource))
    }

    func testMissingWeightsFileIsNamed() {
        let url = URL(fileURLWithPath: "/nonexistent/efficientnet-lite0.pth")
        XCTAssertThrowsError(try EfficientNetLite.load(url)) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains(url.path) && text.contains("not found"), text)
        }
    }

    func testMismatchedStateDictNamesTheKeys() throws {
        var weights = try EfficientNetLite().stateDict()
        weights["_blocks.3._depthwise_conv.weight"] = try Tensor.zeros([144, 1, 3, 3]) // lite0 has 5x5 here
        weights["_bn1.running_var"] = nil
        weights["_blocks.0._se_reduce.weight"] = try Tensor.zeros([8, 32, 1, 1])
        weights["_bn0.num_batches_tracked"] = try Tensor.zeros([], dtype: .int64)
        XCTAssertThrowsError(try EfficientNetLite(weights: weights)) { error in
            let text = "\(error)"
            for part in ["_blocks.3._depthwise_conv.weight", "[144, 1, 5, 5]", "[144, 1, 3, 3]", "_bn1.running_var", "_blocks.0._se_reduce.weight"] {
                XCTAssertTrue(text.contains(part), "'\(part)' missing from: \(text)")
            }
            XCTAssertFalse(text.contains("num_batches_tracked"), text)
        }
    }

    func testCheckpointOfAnotherModelIsRejected() {
        // A valid torch.save file (the reader's own fixture): reading succeeds, the model must refuse it.
        let other = fixturesRoot.appendingPathComponent("ckpt/torch_legacy.pt")
        XCTAssertThrowsError(try EfficientNetLite.load(other)) { error in
            let text = "\(error)"
            for part in [other.path, "missing", "_blocks.0._bn1.bias", "unexpected", "conv.weight"] {
                XCTAssertTrue(text.contains(part), "'\(part)' missing from: \(text)")
            }
        }
    }

    func testConfigMatchesCheckpointLayout() throws {
        let config = EfficientNetConfig.lite0
        XCTAssertEqual(config.blocks.count, 16)
        XCTAssertEqual(try JSONDecoder().decode(EfficientNetConfig.self, from: JSONEncoder().encode(config)), config)
        let model = try EfficientNetLite(config: config)
        XCTAssertEqual(model.parameterCount, 4_652_008) // sum over the .pth's weights and biases
        let names = Set(model.stateDict().keys)
        for key in ["_conv_stem.weight", "_bn0.running_mean", "_blocks.0._depthwise_conv.weight", "_blocks.15._expand_conv.weight",
                    "_blocks.8._bn2.running_var", "_conv_head.weight", "_bn1.bias", "_fc.weight", "_fc.bias"] {
            XCTAssertTrue(names.contains(key), key)
        }
        XCTAssertFalse(names.contains("_blocks.0._expand_conv.weight")) // expand ratio 1: no expansion
        guard FileManager.default.fileExists(atPath: Self.weightsURL.path) else { return }
        let file = try TorchCheckpoint.load(Self.weightsURL)
        XCTAssertEqual(names, Set(file.keys.filter { !$0.hasSuffix("num_batches_tracked") }))
    }
}

import Foundation
import XCTest
@testable import Models
@testable import Torch

final class ComposedVLMTests: XCTestCase {
    func makeVLM(lora: Int? = nil) throws -> ComposedVLM {
        guard FileManager.default.fileExists(atPath: LMLoader.defaultLMPath(repoRoot: repoRoot).path) else { throw XCTSkip("run make setup") }
        var c = ComposedConfig()
        c.loraRank = lora
        return try ComposedVLM.create(c, root: repoRoot, seed: 1)
    }

    func testImageIsSplicedAtThePlaceholder() throws {
        let vlm = try makeVLM()
        let img = try Image.load(fixturesRoot.appendingPathComponent("effnet/coffee.png"))
        let p = try noGrad { try vlm.prepare(text: "<image> \n What is it?", image: img, system: nil) }
        let slots = p.tokenIds.enumerated().filter { $0.element == -1 }.map(\.offset)
        XCTAssertEqual(slots.count, 16, "112 px → 4×4 image tokens")
        XCTAssertEqual(slots, Array(slots.first!...slots.last!), "contiguous")
        let before = vlm.tokenizer.decode(Array(p.tokenIds[..<slots.first!]))
        XCTAssertTrue(before.hasSuffix("<|im_start|>user\n"), before)
        XCTAssertEqual(p.embeddings.size(1), p.tokenIds.count)
        let expected = try noGrad { try vlm.imageEmbeddings(img) }
        let spliced = try p.embeddings.narrow(dim: 1, start: slots.first!, length: 16)
        XCTAssertEqual(try (spliced - expected).abs().max().item(), 0)
        // Without a placeholder the image goes first; two placeholders are refused.
        let q = try noGrad { try vlm.prepare(text: "What is it?", image: img, system: nil) }
        XCTAssertEqual(q.tokenIds.filter { $0 == -1 }.count, 16)
        XCTAssertThrowsError(try vlm.prepare(text: "<image> <image>", image: img, system: nil))
        XCTAssertThrowsError(try vlm.prepare(text: "<image> hi", image: nil, system: nil))
    }

    /// Features encoded as one batch (what evaluation prefetches) equal those of one image at a time.
    func testBatchedPrefetchMatchesSingleImages() throws {
        let vlm = try makeVLM()
        let names = try FileManager.default.contentsOfDirectory(atPath: fixturesRoot.appendingPathComponent("effnet").path)
            .filter { $0.hasSuffix(".png") || $0.hasSuffix(".jpg") }.sorted()
        let images = try names.map { try Image.load(fixturesRoot.appendingPathComponent("effnet/\($0)")) }
        XCTAssertGreaterThan(images.count, 1)
        let single = try noGrad { try images.map { try vlm.imageEmbeddings($0) } }
        vlm.clearImageCache()
        try noGrad { try vlm.prefetchImageFeatures(images + images) }  // duplicates are encoded once
        for (img, expected) in zip(images, single) {
            let batched = try noGrad { try vlm.imageEmbeddings(img) }
            XCTAssertLessThan(try (batched - expected).abs().max().item(), 1e-4)
        }
    }

    func testSaveLoadRoundTripAndBadWeights() throws {
        let vlm = try makeVLM(lora: 4)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vlm-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try noGrad { try vlm.projector.linear_2.weight.mul_(3) }
        try vlm.save(to: dir)
        XCTAssertTrue(vlm.ownParameters.contains { $0.name.contains("lora_A") })
        // The chat template is saved with the model and found again on load.
        vlm.chatTemplate = try ChatTemplate(jinja: "T{{ messages[0].content }}", file: "t.jinja", specialTokens: vlm.chatTemplate.specialTokens)
        try vlm.save(to: dir)
        let back = try ComposedVLM.load(dir, root: repoRoot)
        XCTAssertEqual(back.chatTemplate.origin, dir.appendingPathComponent("chat_template.jinja").path)
        XCTAssertEqual(try back.chatTemplate.render([.user("<image>")], addGenerationPrompt: true), "T<image>")
        for ((n1, a), (n2, b)) in zip(vlm.ownParameters, back.ownParameters) {
            XCTAssertEqual(n1, n2)
            XCTAssertEqual(try a.floats(), try b.floats(), n1)
        }
        var state = try SafeTensorsFile(url: dir.appendingPathComponent("model.safetensors")).tensors()
        state.removeValue(forKey: "multi_modal_projector.linear_1.bias")
        try saveSafeTensors(state, to: dir.appendingPathComponent("model.safetensors"))
        XCTAssertThrowsError(try ComposedVLM.load(dir, root: repoRoot)) { e in
            XCTAssertTrue("\(e)".contains("model.safetensors") && "\(e)".contains("linear_1.bias"), "\(e)")
        }
    }
}

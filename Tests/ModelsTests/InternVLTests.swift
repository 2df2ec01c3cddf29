import Foundation
import XCTest
@testable import Models
@testable import Torch

/// Parity with HF transformers' InternVL on the tiny random checkpoints written by
/// scripts/reference/internvl_fixtures.py (Tests/Fixtures/internvl).
final class InternVLTests: XCTestCase {
    static let dir = fixturesRoot.appendingPathComponent("internvl")
    nonisolated(unsafe) static let fx = try! BinFixture(dir)
    nonisolated(unsafe) static let model = try! InternVL.load(dir.appendingPathComponent("tiny"))

    var fx: BinFixture { Self.fx }
    func image(_ name: String) throws -> Image { try Image.load(Self.dir.appendingPathComponent("\(name).png")) }

    func testTilingGridMatchesHF() {
        let rows = fx.json["tiling"] as! [[Int]]
        XCTAssertGreaterThan(rows.count, 600)
        for r in rows {
            let g = InternVLImageProcessor.grid(width: r[1], height: r[0], tileSize: r[2], minTiles: 1, maxTiles: r[3])
            XCTAssertEqual([g.columns, g.rows], [r[4], r[5]], "\(r[1])x\(r[0]) tile \(r[2]) max \(r[3])")
        }
    }

    func testPixelValuesMatchHFProcessor() throws {
        let processor = Self.model.processor
        XCTAssertEqual(processor.maxTiles, 6) // read from preprocessor_config.json
        for (name, entry) in fx.json["processor"] as! [String: [String: Any]] {
            let img = try image(name)
            let g = InternVLImageProcessor.grid(width: img.width, height: img.height, tileSize: processor.tileSize,
                                                minTiles: processor.minTiles, maxTiles: processor.maxTiles)
            XCTAssertEqual([g.columns, g.rows], entry["grid"] as! [Int], name)
            let mine = try processor.pixelValues(img), ref = try fx.array(entry["pixel_values"])
            XCTAssertEqual(mine.shape, ref.shape, name)
            XCTAssertEqual(mine.size(0), entry["num_patches"] as! Int, name)
            XCTAssertLessThan(try maxAbsDiff(mine, ref), 1e-5, "\(name) pixel values")
        }
    }

    func testVisionFeatures() throws {
        let v = fx.json["vision"] as! [String: Any]
        let pixels = try Self.model.processor.pixelValues(image(v["image"] as! String))
        try noGrad {
            let hidden = try Self.model.vision_tower(pixels)
            XCTAssertLessThan(try maxAbsDiff(hidden, fx.array(v["last_hidden_state"])), 1e-4, "vision tower")
            let features = try Self.model.imageFeatures(pixels)
            XCTAssertLessThan(try maxAbsDiff(features, fx.array(v["image_features"])), 1e-4, "projected features")
        }
    }

    /// Full prompt logits through `prepare` (processor + chat template + splice) and greedy decoding
    /// through the generation engine.
    func checkPrompts(_ model: InternVL, only: String? = nil) throws {
        for p in fx.json["prompts"] as! [[String: Any]] where only == nil || p["name"] as? String == only {
            let name = p["name"] as! String
            let prepared = try noGrad {
                try model.prepare(text: p["text"] as! String, image: (p["image"] as? String).map { try image($0) },
                                  system: p["system"] as? String)
            }
            // PreparedPrompt marks image-feature positions with −1.
            let want = (p["input_ids"] as! [Int]).map { $0 == model.imageTokenId ? -1 : $0 }
            XCTAssertEqual(prepared.tokenIds, want, "\(name) prompt ids")
            let logits = try noGrad {
                try model.lm.logits(model.lm.forward(embeddings: prepared.embeddings, positions: prepared.positions, cache: nil, valid: nil))
            }
            let d = try maxAbsDiff(logits.squeeze(0), fx.array(p["logits"]))
            XCTAssertLessThan(d, 1e-4, "\(name): max abs logits diff \(d)")
            let gen = TextGenerator(lm: model.lm, tokenizer: model.tokenizer, stopIds: [])
            let out = try gen.generate(prepared, params: .greedy(maxTokens: 8))[0]
            XCTAssertEqual(out.tokens, p["greedy_ids"] as! [Int], "\(name) greedy continuation")
        }
    }

    func testLogitsAndGreedyMatchHF() throws {
        try checkPrompts(Self.model)
        // Each image went through the frozen tower once; repeating a prompt reuses its features.
        let cached = Self.model.featureCache.count
        try checkPrompts(Self.model, only: "wide_user")
        XCTAssertEqual(Self.model.featureCache.count, cached)
    }

    func testRemoteCodeLayoutLoadsToSameModel() throws {
        let remote = try InternVL.load(Self.dir.appendingPathComponent("remote"))
        XCTAssertTrue(remote.config.remoteCode)
        XCTAssertEqual(remote.processor.maxTiles, 6) // from max_dynamic_patch
        let mine = Self.model.stateDict()
        for (name, t) in remote.stateDict() {
            XCTAssertEqual(try maxAbsDiff(t, XCTUnwrap(mine[name], name)), 0, name)
        }
        XCTAssertEqual(Set(remote.stateDict().keys), Set(mine.keys))
        try checkPrompts(remote, only: "tall_system")
    }

    func testRenameTable() {
        let cases = [
            "vision_model.encoder.layers.11.attn.qkv.weight": "vision_tower.encoder.layer.11.attention.qkv.weight",
            "vision_model.encoder.layers.0.ls2": "vision_tower.encoder.layer.0.lambda_2",
            "vision_model.encoder.layers.3.norm1.bias": "vision_tower.encoder.layer.3.layernorm_before.bias",
            "vision_model.embeddings.patch_embedding.weight": "vision_tower.embeddings.patch_embeddings.projection.weight",
            "mlp1.3.bias": "multi_modal_projector.linear_2.bias",
            "model.language_model.layers.0.mlp.up_proj.weight": "language_model.model.layers.0.mlp.up_proj.weight",
            "lm_head.weight": "language_model.lm_head.weight",
        ]
        for (from, to) in cases { XCTAssertEqual(InternVLWeights.rename(from), to, from) }
        XCTAssertNil(InternVLWeights.rename("language_model.model.norm.weight"))
        XCTAssertNil(InternVLWeights.rename("vision_model.encoder.layers.x.ls1"))
    }

    /// The InternViT-6B branches: RMSNorm, QK norm, no q/k/v bias, final LayerNorm.
    func testRMSNormQKNormVisionTower() throws {
        let dir = Self.dir.appendingPathComponent("vit6b")
        let config = try JSONDecoder().decode(InternVisionConfig.self, from: Data(contentsOf: dir.appendingPathComponent("config.json")))
        XCTAssertEqual(config.normType, "rms_norm")
        XCTAssertTrue(config.useQKNorm)
        let tower = try InternVisionModel(config)
        try tower.load(SafeTensorsFile(url: dir.appendingPathComponent("model.safetensors")).tensors(as: .float32))
        let v = fx.json["vit6b"] as! [String: Any]
        let pixels = try Self.model.processor.pixelValues(image(v["image"] as! String))
        let d = try noGrad { try maxAbsDiff(tower(pixels), fx.array(v["last_hidden_state"])) }
        XCTAssertLessThan(d, 1e-4)
    }

    /// Training setup as adapt uses it: the vision tower stays frozen and gets no gradient, while the
    /// decoder and projector do, through the spliced image embeddings.
    func testFrozenVisionTowerAndGradients() throws {
        let model = try InternVL.load(Self.dir.appendingPathComponent("tiny"))
        XCTAssertTrue(model.vision_tower.parameters.allSatisfy { !$0.requiresGrad })
        try model.unfreeze()
        try model.vision_tower.freeze()
        let loss = try withGrad {
            let p = try model.prepare(text: "Describe.", image: image("wide"), system: nil)
            let h = try model.lm.forward(embeddings: p.embeddings, positions: p.positions, cache: nil, valid: nil)
            return try model.lm.logits(h).logSoftmax(dim: -1).select(dim: 2, index: 5).mean()
        }
        try loss.backward()
        XCTAssertTrue(model.vision_tower.parameters.allSatisfy { $0.grad == nil })
        XCTAssertGreaterThan(try XCTUnwrap(model.multi_modal_projector.linear_1.weight.grad).abs().sum().item(), 0)
        XCTAssertGreaterThan(try XCTUnwrap(model.language_model.model.layers[0].mlp.up_proj.weight.grad).abs().sum().item(), 0)
    }

    func testPromptWithoutImagePlaceholderAndErrors() throws {
        let m = Self.model
        let ids = try m.promptIds(text: "Look: <image> now", tiles: 2, system: nil)
        XCTAssertEqual(ids.filter { $0 == m.imageTokenId }.count, 2 * m.config.tokensPerTile)
        XCTAssertEqual(ids.filter { $0 == m.imageStartId }.count, 1)
        XCTAssertThrowsError(try m.embed(ids: ids, features: nil))
        XCTAssertThrowsError(try m.vision_tower(Tensor.zeros([1, 3, 28, 28])))
    }
}

import Foundation
import XCTest
@testable import Models
@testable import Torch

/// A tiny random Qwen2.5-VL against HF transformers (scripts/reference/qwen25vl_fixtures.py).
final class Qwen25VLTests: XCTestCase {
    static let dir = fixturesRoot.appendingPathComponent("qwen25vl")
    nonisolated(unsafe) static var shared: (Qwen25VL, BinFixture)?

    func loaded() throws -> (Qwen25VL, BinFixture) {
        if let s = Self.shared { return s }
        let s = (try Qwen25VL.load(Self.dir), try BinFixture(Self.dir))
        Self.shared = s
        return s
    }

    var prompts: [[String: Any]] { get throws { try loaded().1.json["prompts"] as! [[String: Any]] } }

    func image(_ p: [String: Any]) throws -> Image? {
        try (p["image"] as? String).map { try Image.load(Self.dir.appendingPathComponent($0)) }
    }

    func prepared(_ p: [String: Any]) throws -> PreparedPrompt {
        try loaded().0.prepare(text: p["text"] as! String, image: image(p), system: p["system"] as? String)
    }

    func grid(_ p: [String: Any]) -> (t: Int, h: Int, w: Int) {
        let g = p["image_grid_thw"] as! [Int]
        return (g[0], g[1], g[2])
    }

    func testSmartResize() throws {
        let r = { (h: Int, w: Int) in try Qwen25VLImageProcessor.smartResize(height: h, width: w, factor: 28, minPixels: 3136, maxPixels: 12544) }
        XCTAssertTrue(try r(200, 70) == (196, 56), "70/28 = 2.5 rounds to even")
        XCTAssertTrue(try r(90, 300) == (56, 196), "max_pixels branch floors")
        XCTAssertTrue(try r(20, 30) == (56, 84), "min_pixels branch ceils")
        XCTAssertThrowsError(try r(1, 300))
    }

    func testProcessorMatchesHF() throws {
        let (vlm, fx) = try loaded()
        for p in try prompts where p["image"] is String {
            let (pixels, g) = try vlm.processor(image(p)!)
            XCTAssertTrue(g == grid(p), "\(p["name"]!): grid \(g)")
            let d = try maxAbsDiff(pixels, fx.array(p["pixel_values"]))
            XCTAssertLessThan(d, 1e-5, "\(p["name"]!): pixel values differ by \(d)")
        }
    }

    func testVisionTowerMatchesHF() throws {
        let (vlm, fx) = try loaded()
        try noGrad {
            for p in try prompts where p["image"] is String {
                let out = try vlm.model.visual(fx.array(p["pixel_values"]), grids: [grid(p)])
                let d = try maxAbsDiff(out, fx.array(p["vision_output"]))
                XCTAssertLessThan(d, 1e-4, "\(p["name"]!): vision output differs by \(d)")
            }
        }
    }

    /// Both images in one call: frames become two equal attention groups.
    func testVisionTowerBatchesImages() throws {
        let (vlm, fx) = try loaded()
        try noGrad {
            let ps = try prompts.filter { $0["image"] is String }
            let out = try vlm.model.visual(Tensor.cat(ps.map { try fx.array($0["pixel_values"]) }, dim: 0), grids: ps.map(grid))
            let want = try Tensor.cat(ps.map { try fx.array($0["vision_output"]) }, dim: 0)
            XCTAssertLessThan(try maxAbsDiff(out, want), 1e-4)
        }
    }

    /// Grouped attention equals attention under the block-diagonal mask it replaces.
    func testAttentionGroupsEqualBlockDiagonalMask() throws {
        let g = Generator(seed: 3)
        for segments in [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 2], [0, 0, 0]] {
            let n = segments.count
            let q = try Tensor.randn([1, 2, n, 4], generator: g), k = try Tensor.randn([1, 2, n, 4], generator: g)
            let v = try Tensor.randn([1, 2, n, 4], generator: g)
            let s = try Tensor(segments.map { Int64($0) })
            let mask = try s.unsqueeze(1).eq(s.unsqueeze(0)).unsqueeze(0).unsqueeze(0)
            let want = try F.scaledDotProductAttention(q, k, v, mask: mask)
            let got = try Qwen25AttentionGroups(segments: segments).attend(q, k, v)
            XCTAssertLessThan(try maxAbsDiff(got, want), 1e-6, "\(segments)")
        }
    }

    func testPromptPositionsAndLogitsMatchHF() throws {
        let (vlm, fx) = try loaded()
        try noGrad {
            for p in try prompts {
                let name = p["name"] as! String
                let prompt = try prepared(p)
                let ids = p["input_ids"] as! [Int]
                // PreparedPrompt marks image-feature positions with −1.
                XCTAssertEqual(prompt.tokenIds, ids.map { $0 == vlm.config.imageTokenId ? -1 : $0 }, "\(name): token ids")
                let pos = try prompt.positions.ints()
                XCTAssertEqual(pos, (p["position_ids"] as! [[Int]]).flatMap { $0 }, "\(name): M-RoPE positions")
                XCTAssertEqual(prompt.nextPosition, ids.count + (p["rope_delta"] as! Int), "\(name): next position")
                let logits = try vlm.lm.logits(vlm.lm.forward(embeddings: prompt.embeddings, positions: prompt.positions, cache: nil, valid: nil))
                let d = try maxAbsDiff(logits.squeeze(0), fx.array(p["logits"]))
                XCTAssertLessThan(d, 1e-4, "\(name): logits differ by \(d)")
            }
        }
    }

    func testGreedyFanOutAndKVCacheDecode() throws {
        let (vlm, fx) = try loaded()
        let gen = TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: [])
        try noGrad {
            for p in try prompts {
                let name = p["name"] as! String
                let prompt = try prepared(p)
                let want = p["greedy10_ids"] as! [Int]
                let outs = try gen.generate(prompt, samples: 2, params: .greedy(maxTokens: 10))
                for o in outs { XCTAssertEqual(o.tokens, want, "\(name): greedy continuation") }

                // Step-by-step cached decode vs HF's no-cache logits and vs our own recompute.
                let ref = try fx.array(p["decode_logits"])
                let fed = Array(want.dropLast())
                let cache = KVCache(layers: vlm.lm.layerCount, capacity: 4) // small on purpose: exercises growth
                _ = try vlm.lm.forward(embeddings: prompt.embeddings, positions: prompt.positions, cache: cache, valid: nil)
                let t = prompt.tokenIds.count
                let next = (0..<fed.count).map { Int64(prompt.nextPosition + $0) }
                let nextPos = try Tensor(next, shape: [1, 1, fed.count]).expand([3, 1, fed.count])
                let full = try vlm.lm.logits(vlm.lm.forward(
                    embeddings: Tensor.cat([prompt.embeddings, vlm.lm.embed(ids(fed))], dim: 1),
                    positions: Tensor.cat([prompt.positions, nextPos], dim: 2), cache: nil, valid: nil)).squeeze(0)
                for (s, tok) in fed.enumerated() {
                    let h = try vlm.lm.forward(embeddings: vlm.lm.embed(ids([tok])), positions: Tensor([next[s]], shape: [1, 1]),
                                               cache: cache, valid: nil)
                    let step = try vlm.lm.logits(h).reshape([-1])
                    XCTAssertLessThan(try maxAbsDiff(step, ref.select(dim: 0, index: s + 1)), 1e-4, "\(name) kv step \(s) vs HF")
                    XCTAssertLessThan(try maxAbsDiff(step, full.select(dim: 0, index: t + s)), 1e-4, "\(name) kv step \(s) vs recompute")
                }
            }
        }
    }

    func testBatchedPrefillMatchesSingle() throws {
        let (vlm, _) = try loaded()
        let gen = TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: [])
        let ps = try prompts
        let outs = try gen.generateBatch(try ps.map(prepared), params: .greedy(maxTokens: 10))
        for (o, p) in zip(outs, ps) { XCTAssertEqual(o.tokens, p["greedy10_ids"] as! [Int], "\(p["name"]!): batched greedy") }
    }

    /// transformers 5 names (`model.language_model.*`, `model.visual.*`), its nested config, an
    /// untied lm_head and a single model.safetensors load to the same network.
    func testCurrentLayoutUntiedSingleFile() throws {
        let (vlm, _) = try loaded()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qwen25vl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        for f in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"] {
            try FileManager.default.copyItem(at: Self.dir.appendingPathComponent(f), to: dir.appendingPathComponent(f))
        }
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: Self.dir.appendingPathComponent("config_v5.json"))) as! [String: Any]
        XCTAssertNotNil(config["text_config"])
        config["tie_word_embeddings"] = false
        try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("config.json"))
        var state = try LMLoader.readSafeTensorsDir(Self.dir)
        state = Dictionary(uniqueKeysWithValues: state.map { (Qwen2_5_VLForConditionalGeneration.currentName($0.key), $0.value) })
        XCTAssertNotNil(state["model.language_model.embed_tokens.weight"])
        XCTAssertNotNil(state["model.visual.merger.mlp.0.weight"])
        state["lm_head.weight"] = try state["model.language_model.embed_tokens.weight"]!.contiguous() * 1.0
        try saveSafeTensors(state, to: dir.appendingPathComponent("model.safetensors"))

        let other = try Qwen25VL.load(dir)
        XCTAssertFalse(other.chatTemplate.isBuiltin)
        XCTAssertFalse(other.config.tieWordEmbeddings)
        XCTAssertEqual(other.config.mropeSection, vlm.config.mropeSection)
        try noGrad {
            let p = try prompts[1]
            let a = try vlm.prepare(text: p["text"] as! String, image: image(p), system: p["system"] as? String)
            let b = try other.prepare(text: p["text"] as! String, image: image(p), system: p["system"] as? String)
            let la = try vlm.lm.logits(vlm.lm.forward(embeddings: a.embeddings, positions: a.positions, cache: nil, valid: nil))
            let lb = try other.lm.logits(other.lm.forward(embeddings: b.embeddings, positions: b.positions, cache: nil, valid: nil))
            XCTAssertEqual(try maxAbsDiff(la, lb), 0)
        }

        state.removeValue(forKey: "model.visual.blocks.2.attn.qkv.bias")
        try saveSafeTensors(state, to: dir.appendingPathComponent("model.safetensors"))
        XCTAssertThrowsError(try Qwen25VL.load(dir)) { XCTAssertTrue("\($0)".contains("model.visual.blocks.2.attn.qkv.bias"), "\($0)") }
    }

    func testImageSlotsMustMatchImages() throws {
        let (vlm, _) = try loaded()
        let ids = vlm.tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>hi")
        XCTAssertThrowsError(try vlm.prepare(ids: ids, images: []))
    }
}

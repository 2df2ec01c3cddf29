import Foundation
import XCTest
@testable import Models
@testable import Torch

/// End to end: each family's `prepare` on the tiny test checkpoints, through the checkpoint's own chat
/// template and image expansion, gives the prompt ids transformers builds (processor +
/// apply_chat_template; scripts/reference/prompt_fixtures.py), images before, between and after text,
/// and greedy generation from it continues as transformers' `generate` does.
final class PromptParityTests: XCTestCase {
    struct Case: Decodable {
        let name: String
        let image: String?
        let system: String?
        let text: String
        let rendered: String
        let input_ids: [Int]
        /// transformers' greedy continuation (8 tokens, no EOS stop).
        let greedy_ids: [Int]
    }
    struct Fixtures: Decodable {
        let lm: [Case]
        let qwen25vl: [Case]
        let internvl: [Case]
        let internvl_remote: [Case]
    }
    static let fx = try! JSONDecoder().decode(Fixtures.self, from: Data(contentsOf: fixturesRoot.appendingPathComponent("prompts.json")))

    /// `imageToken`: the id transformers' prompt holds at each image-feature position, where
    /// `PreparedPrompt.tokenIds` holds −1.
    func check(_ vlm: VisionLanguageModel, _ cases: [Case], images: URL, imageToken: Int? = nil, _ label: String) throws {
        XCTAssertEqual(cases.count, label == "lm" ? 2 : 5)
        for c in cases {
            let image = try c.image.map { try Image.load(images.appendingPathComponent($0)) }
            let p = try noGrad { try vlm.prepare(text: c.text, image: image, system: c.system) }
            XCTAssertEqual(p.tokenIds, c.input_ids.map { $0 == imageToken ? -1 : $0 }, "\(label) \(c.name)")
            let out = try TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: []).generate(p, params: .greedy(maxTokens: 8))
            XCTAssertEqual(out[0].tokens, c.greedy_ids, "\(label) \(c.name): greedy continuation")
        }
    }

    /// tiny-llama's weights with a tokenizer and a template of its own (an HF directory as a user brings it).
    func testLanguageModelDirectory() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lmchat-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let fm = FileManager.default
        for f in ["config.json", "model.safetensors"] {
            try fm.createSymbolicLink(at: dir.appendingPathComponent(f), withDestinationURL: fixturesRoot.appendingPathComponent("lm/tiny-llama/\(f)"))
        }
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            try fm.createSymbolicLink(at: dir.appendingPathComponent(f), withDestinationURL: fixturesRoot.appendingPathComponent("lm/chat/\(f)"))
        }
        let lm = try LMLoader.load(dir)
        XCTAssertFalse(lm.template.isBuiltin)
        XCTAssertEqual(try lm.template.render([.user(Self.fx.lm[0].text)], addGenerationPrompt: true), Self.fx.lm[0].rendered)
        try check(TextOnlyVLM(lm), Self.fx.lm, images: dir, "lm")
    }

    func testQwen25VL() throws {
        let vlm = try Qwen25VL.load(fixturesRoot.appendingPathComponent("qwen25vl"))
        XCTAssertFalse(vlm.chatTemplate.isBuiltin)
        try check(vlm, Self.fx.qwen25vl, images: fixturesRoot.appendingPathComponent("qwen25vl"),
                  imageToken: vlm.config.imageTokenId, "qwen25vl")
    }

    func testInternVLBothLayouts() throws {
        let images = fixturesRoot.appendingPathComponent("internvl")
        let hf = try InternVL.load(images.appendingPathComponent("tiny"))
        XCTAssertTrue(hf.chatTemplate.origin.hasSuffix("chat_template.jinja"))
        try check(hf, Self.fx.internvl, images: images, imageToken: hf.imageTokenId, "internvl -hf")
        let remote = try InternVL.load(images.appendingPathComponent("remote"))
        XCTAssertTrue(remote.chatTemplate.origin.hasSuffix("tokenizer_config.json"))
        try check(remote, Self.fx.internvl_remote, images: images, imageToken: remote.imageTokenId, "internvl remote")
    }

    /// `--chat-template` replaces the checkpoint's template; one that emits no image slot is an error.
    func testOverrideAndMissingImageSlot() throws {
        let vlm = try Qwen25VL.load(fixturesRoot.appendingPathComponent("qwen25vl"))
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("tpl-\(UUID().uuidString).jinja")
        defer { try? FileManager.default.removeItem(at: url) }
        try Data("{% for m in messages %}{{ m.content if m.content is string else m.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join }}{% endfor %}".utf8).write(to: url)
        vlm.chatTemplate = try ChatTemplate.load(url)
        XCTAssertEqual(try vlm.prepare(text: "Hi there", image: nil, system: nil).tokenIds, vlm.tokenizer.encode("Hi there"))
        let image = try Image.load(fixturesRoot.appendingPathComponent("qwen25vl/wide.png"))
        XCTAssertThrowsError(try vlm.prepare(text: "Hi", image: image, system: nil)) {
            XCTAssertTrue("\($0)".contains("0 image slot(s) for 1 image(s)"), "\($0)")
        }
    }

    /// The default VLM's own template renders the prompt its weights were trained on (SmolLM2's ChatML).
    func testDefaultVLMTemplate() throws {
        let dir = fixturesRoot.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("models/default-vlm")
        let t = try XCTUnwrap(try ChatTemplate.find(in: dir))
        for messages in [[ChatMessage.user("<image>\nWhat is it?")], [.system("S"), .user("Q <image>")]] {
            XCTAssertEqual(try t.render(messages, addGenerationPrompt: true), try ChatTemplate.smolLM2.render(messages, addGenerationPrompt: true))
        }
        XCTAssertEqual(try t.render([.user(parts: "What is it?", images: 1)], addGenerationPrompt: false),
                       "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                       + "<|im_start|>user\n<image>What is it?<|im_end|>\n")
    }
}

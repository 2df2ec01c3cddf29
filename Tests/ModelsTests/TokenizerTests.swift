import Foundation
import XCTest

@testable import Models

/// Fixtures come from scripts/reference/tokenizer_fixtures.py (HF tokenizers / transformers).
final class TokenizerTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/tokenizer")

    struct Decode: Decodable {
        let ids: [Int]
        let text: String
        let text_skip_special: String
    }

    struct Chat: Decodable {
        struct Message: Decodable {
            struct Item: Decodable {
                let type: String
                let text: String?
            }
            let role: String
            let content: Content
        }
        /// A plain string, or an HF content list of image/text items.
        enum Content: Decodable {
            case text(String)
            case items([Message.Item])
            init(from decoder: Decoder) throws {
                let c = try decoder.singleValueContainer()
                if let s = try? c.decode(String.self) { self = .text(s) } else { self = .items(try c.decode([Message.Item].self)) }
            }
        }
        let messages: [Message]
        let add_generation_prompt: Bool
        let text: String
        let ids: [Int]

        var chatMessages: [ChatMessage] {
            messages.map { m in
                switch m.content {
                case .text(let s): return ChatMessage(role: m.role, content: s)
                case .items(let items):
                    return ChatMessage(role: m.role, content: .parts(items.map { $0.type == "image" ? .image : .text($0.text ?? "") }))
                }
            }
        }
    }

    struct Family: Decodable {
        let texts: [String]
        let ids: [[Int]]
        let ids_no_special: [[Int]]
        let ids_digits_split: [[Int]]?
        let decode: [Decode]
        let chat: [Chat]
        let bos_id: Int?
        let eos_id: Int?
        let pad_id: Int?
        let vocab_size: Int
    }

    static let cases: [String: Family] = {
        let data = try! Data(contentsOf: fixtures.appendingPathComponent("cases.json"))
        return try! JSONDecoder().decode([String: Family].self, from: data)
    }()

    nonisolated(unsafe) static var loaded: [String: Tokenizer] = [:]

    func tokenizer(_ name: String) throws -> Tokenizer {
        if let t = Self.loaded[name] { return t }
        let t = try Tokenizer(tokenizerJSON: Self.fixtures.appendingPathComponent("\(name)/tokenizer.json"))
        Self.loaded[name] = t
        return t
    }

    /// The GGUF-array initializer, fed the same vocabulary the way a GGUF stores it.
    func ggufTokenizer(_ name: String, pre: String) throws -> Tokenizer {
        let url = Self.fixtures.appendingPathComponent("\(name)/tokenizer.json")
        let root = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        let model = root["model"] as! [String: Any]
        let vocab = model["vocab"] as! [String: Int]
        let added = root["added_tokens"] as! [[String: Any]]
        let size = max(vocab.values.max()!, added.map { $0["id"] as! Int }.max() ?? 0) + 1
        var tokens = [String](repeating: "", count: size)
        var types = [Int](repeating: 1, count: size)
        for (t, i) in vocab { tokens[i] = t }
        for a in added {
            tokens[a["id"] as! Int] = a["content"] as! String
            types[a["id"] as! Int] = (a["special"] as! Bool) ? 3 : 4
        }
        let merges = (model["merges"] as! [Any]).map { m in (m as? String) ?? (m as! [String]).joined(separator: " ") }
        let family = Self.cases[name]!
        return try Tokenizer(
            tokens: tokens, merges: merges, tokenTypes: types, bosId: family.bos_id, eosId: family.eos_id,
            padId: family.pad_id, preTokenizer: pre)
    }

    func assertEncodes(_ tok: Tokenizer, _ texts: [String], _ expected: [[Int]], parseSpecial: Bool = true,
                       file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(texts.count, expected.count, file: file, line: line)
        for (text, ids) in zip(texts, expected) {
            XCTAssertEqual(tok.encode(text, parseSpecial: parseSpecial), ids, "\(text.debugDescription)", file: file, line: line)
        }
    }

    // MARK: - Encoding

    func testSmolLM2Encode() throws {
        let f = Self.cases["smollm2"]!
        let tok = try tokenizer("smollm2")
        XCTAssertEqual(tok.vocabSize, f.vocab_size)
        assertEncodes(tok, f.texts, f.ids)
        // Encoding again goes through the word cache; it must not change anything.
        assertEncodes(tok, f.texts, f.ids)
    }

    func testQwen2Encode() throws {
        let f = Self.cases["qwen2"]!
        let tok = try tokenizer("qwen2")
        XCTAssertEqual(tok.vocabSize, f.vocab_size)
        assertEncodes(tok, f.texts, f.ids)
    }

    func testSpecialTokensAsText() throws {
        for name in ["smollm2", "qwen2"] {
            let f = Self.cases[name]!
            assertEncodes(try tokenizer(name), f.texts, f.ids_no_special, parseSpecial: false)
        }
    }

    func testGGUFArraysInit() throws {
        // llama.cpp's "smollm" isolates every \p{N} (like SmolLM2's original tokenizer.json); the
        // fixture records HF ids under that pipeline separately.
        let smol = try ggufTokenizer("smollm2", pre: "smollm")
        let f = Self.cases["smollm2"]!
        assertEncodes(smol, f.texts, f.ids_digits_split!)
        XCTAssertEqual(smol.bosId, 1)
        XCTAssertEqual(smol.eosId, 2)
        XCTAssertTrue(smol.isSpecial(2))
        XCTAssertFalse(smol.isSpecial(100))

        let qwen = try ggufTokenizer("qwen2", pre: "qwen2")
        let q = Self.cases["qwen2"]!
        assertEncodes(qwen, q.texts, q.ids)
        assertEncodes(qwen, q.texts, q.ids_no_special, parseSpecial: false)
        XCTAssertEqual(qwen.eosId, q.eos_id)
        XCTAssertFalse(qwen.isSpecial(qwen.id(of: "<tool_call>")!), "USER_DEFINED tokens are not special")
        XCTAssertThrowsError(try Tokenizer(tokens: ["a"], merges: [], tokenTypes: nil, bosId: nil, eosId: nil,
                                           padId: nil, preTokenizer: "no-such-pre"))
    }

    func testIdsAndSpecialFlags() throws {
        let tok = try tokenizer("qwen2")
        let q = Self.cases["qwen2"]!
        XCTAssertEqual(tok.id(of: "<|im_end|>"), q.eos_id)
        XCTAssertEqual(tok.id(of: "<|endoftext|>"), q.pad_id)
        XCTAssertNil(tok.id(of: "<|no_such_token|>"))
        XCTAssertTrue(tok.isSpecial(tok.id(of: "<|image_pad|>")!))
        XCTAssertFalse(tok.isSpecial(tok.id(of: "<tool_call>")!))
        XCTAssertFalse(tok.isSpecial(-1))
        XCTAssertFalse(tok.isSpecial(tok.vocabSize))
        // Special-token ids come from the sibling tokenizer_config.json.
        for name in ["smollm2", "qwen2"] {
            let t = try tokenizer(name), f = Self.cases[name]!
            XCTAssertEqual([t.bosId, t.eosId, t.padId], [f.bos_id, f.eos_id, f.pad_id], name)
        }
    }

    // MARK: - Decoding

    func testRoundTrip() throws {
        for name in ["smollm2", "qwen2"] {
            let tok = try tokenizer(name)
            for text in Self.cases[name]!.texts {
                let expected = name == "qwen2" ? text.precomposedStringWithCanonicalMapping : text
                // Compare scalars: String == is canonical equivalence and would hide NFC differences.
                XCTAssertEqual(Array(tok.decode(tok.encode(text)).unicodeScalars), Array(expected.unicodeScalars),
                               "\(name): \(text.debugDescription)")
            }
        }
    }

    func testDecodeMatchesHF() throws {
        for name in ["smollm2", "qwen2"] {
            let tok = try tokenizer(name)
            for c in Self.cases[name]!.decode {
                XCTAssertEqual(Array(tok.decode(c.ids).unicodeScalars), Array(c.text.unicodeScalars), "\(name) \(c.ids)")
                XCTAssertEqual(tok.decode(c.ids, skipSpecial: true), c.text_skip_special, "\(name) \(c.ids)")
            }
        }
    }

    func testStreamingDecoder() throws {
        var sawSplitCharacter = false
        for name in ["smollm2", "qwen2"] {
            let tok = try tokenizer(name)
            let f = Self.cases[name]!
            let streams = f.ids + f.chat.map(\.ids)
            for ids in streams {
                for skip in [false, true] {
                    var stream = StreamingDecoder(tokenizer: tok, skipSpecial: skip)
                    var out = ""
                    for id in ids {
                        let piece = stream.push(id)
                        XCTAssertFalse(piece.unicodeScalars.contains("\u{FFFD}"), "\(name) partial UTF-8 in \(ids)")
                        if piece.isEmpty && !tok.bytes(of: id).isEmpty && !(skip && tok.isSpecial(id)) {
                            sawSplitCharacter = true
                        }
                        out += piece
                    }
                    out += stream.flush()
                    XCTAssertEqual(Array(out.unicodeScalars), Array(tok.decode(ids, skipSpecial: skip).unicodeScalars))
                }
            }
            // Cut streams end mid-character: flush must give what a full decode gives (U+FFFD included).
            for c in f.decode {
                var stream = StreamingDecoder(tokenizer: tok)
                let out = c.ids.map { stream.push($0) }.joined() + stream.flush()
                XCTAssertEqual(Array(out.unicodeScalars), Array(c.text.unicodeScalars))
            }
        }
        XCTAssertTrue(sawSplitCharacter, "corpus should contain characters split across tokens")
    }

    func testStreamingHoldsBackSplitEmoji() throws {
        let tok = try tokenizer("smollm2")
        let ids = tok.encode("👨‍👩‍👧")
        XCTAssertGreaterThan(ids.count, 1)
        var stream = StreamingDecoder(tokenizer: tok)
        let pieces = ids.map { stream.push($0) }
        XCTAssertTrue(pieces.contains(""), "some token must end mid-character")
        XCTAssertEqual(pieces.joined() + stream.flush(), "👨‍👩‍👧")
    }

    func testCompletePrefix() {
        let euro: [UInt8] = [0xE2, 0x82, 0xAC]
        XCTAssertEqual(StreamingDecoder.completePrefix([0x41] + euro.prefix(2)), 1)
        XCTAssertEqual(StreamingDecoder.completePrefix([0x41] + euro), 4)
        XCTAssertEqual(StreamingDecoder.completePrefix([0xF0, 0x9F, 0x98]), 0)
        // Never valid whatever follows, so nothing to wait for.
        XCTAssertEqual(StreamingDecoder.completePrefix([0xE0, 0x80]), 2)
        XCTAssertEqual(StreamingDecoder.completePrefix([0x80, 0x80, 0x80, 0x80]), 4)
        XCTAssertEqual(StreamingDecoder.completePrefix([0xFF]), 1)
    }

    // MARK: - Chat

    func testChatTemplates() throws {
        for (name, template) in [("smollm2", ChatTemplate.smolLM2), ("qwen2", ChatTemplate.qwen2VL)] {
            let tok = try tokenizer(name)
            for c in Self.cases[name]!.chat {
                let text = try template.render(c.chatMessages, addGenerationPrompt: c.add_generation_prompt)
                XCTAssertEqual(text, c.text, name)
                XCTAssertEqual(tok.encode(text), c.ids, name)
            }
        }
    }

    // MARK: - Errors and speed

    func testRejectsUnsupportedConfigs() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tok-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent("tokenizer.json")
        let json = #"{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"pre_tokenizer":{"type":"Split","pattern":{"Regex":"\\d+"},"behavior":"Isolated"}}"#
        try Data(json.utf8).write(to: url)
        XCTAssertThrowsError(try Tokenizer(tokenizerJSON: url))
    }

    func testTimings() throws {
        let url = Self.fixtures.appendingPathComponent("smollm2/tokenizer.json")
        var start = Date()
        let tok = try Tokenizer(tokenizerJSON: url)
        let load = Date().timeIntervalSince(start)

        let chat = Self.cases["smollm2"]!.chat
        let prompt = chat.map(\.text).joined() + Self.cases["smollm2"]!.texts[2]
        _ = tok.encode(prompt)
        let n = 200
        start = Date()
        var count = 0
        for _ in 0..<n { count = tok.encode(prompt).count }
        let perEncode = Date().timeIntervalSince(start) / Double(n)
        print(String(format: "smollm2 load %.3f s; encode %d tokens %.1f µs", load, count, perEncode * 1e6))
        // Loose bounds: debug builds are several times slower than release.
        XCTAssertLessThan(load, 5)
        XCTAssertLessThan(perEncode, 0.01)
    }
}

import Foundation
import XCTest
@testable import Models
@testable import Torch

let fixturesRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures")
let repoRoot = fixturesRoot.deletingLastPathComponent().deletingLastPathComponent()

/// Reads `fixturesRoot.json` + `fixturesRoot.bin` written by scripts/reference/lm_fixtures.py.
struct BinFixture {
    let json: [String: Any]
    let bin: Data
    init(_ dir: URL) throws {
        json = try JSONSerialization.jsonObject(with: Data(contentsOf: dir.appendingPathComponent("fixtures.json"))) as! [String: Any]
        bin = try Data(contentsOf: dir.appendingPathComponent("fixtures.bin"))
    }
    func array(_ ref: Any?) throws -> Tensor {
        let r = ref as! [String: Any]
        let offset = r["offset"] as! Int, shape = r["shape"] as! [Int]
        let n = shape.reduce(1, *)
        return try bin.subdata(in: offset..<(offset + 4 * n)).withUnsafeBytes { try Tensor(bytes: $0, dtype: .float32, shape: shape) }
    }
}

func maxAbsDiff(_ a: Tensor, _ b: Tensor) throws -> Double { try (a - b).abs().max().item() }
func ids(_ xs: [Int]) throws -> Tensor { try Tensor(xs.map { Int64($0) }, shape: [1, xs.count]) }

final class LlamaTests: XCTestCase {
    func checkTiny(_ name: String) throws {
        let dir = fixturesRoot.appendingPathComponent("lm/\(name)")
        let model = try LMLoader.loadHFModel(dir)
        let fx = try BinFixture(dir)
        try noGrad {
            for seq in fx.json["sequences"] as! [[String: Any]] {
                let input = seq["input_ids"] as! [Int]
                let logits = try model(ids(input)).squeeze(0)
                let d = try maxAbsDiff(logits, fx.array(seq["logits"]))
                XCTAssertLessThan(d, 1e-4, "\(name) \(seq["name"]!): max abs logits diff \(d)")
                let gen = TextGenerator(lm: model, tokenizer: try tinyTokenizer(), stopIds: [])
                let out = try gen.generate(prompt: input, params: .greedy(maxTokens: 10))[0]
                XCTAssertEqual(out.tokens, seq["greedy10_ids"] as! [Int], "\(name) greedy continuation")
            }
            // Left-padded batch: logits at the valid positions equal the reference.
            let batch = fx.json["batched_left_padded"] as! [String: Any]
            let rows = batch["rows"] as! [[String: Any]]
            let prompts = rows.map { $0["input_ids"] as! [Int] }
            let maxLen = prompts.map(\.count).max()!
            var embeds: [Tensor] = [], valid: [Bool] = [], pos: [Int64] = []
            for p in prompts {
                let pad = maxLen - p.count
                embeds.append(try model.embed(ids(Array(repeating: 0, count: pad) + p)))
                valid += Array(repeating: false, count: pad) + Array(repeating: true, count: p.count)
                pos += Array(repeating: 0, count: pad) + (0..<p.count).map { Int64($0) }
            }
            let hidden = try model.forward(embeddings: Tensor.cat(embeds, dim: 0), positions: Tensor(pos, shape: [prompts.count, maxLen]),
                                           cache: nil, valid: Tensor(valid, shape: [prompts.count, maxLen]))
            let logits = try model.logits(hidden)
            for (i, row) in rows.enumerated() {
                let start = row["valid_start"] as! Int
                let mine = try logits.select(dim: 0, index: i).narrow(dim: 0, start: start, length: maxLen - start)
                let d = try maxAbsDiff(mine, fx.array(row["logits_valid"]))
                XCTAssertLessThan(d, 1e-4, "\(name) padded row \(i): \(d)")
            }
            // Batched generation through the engine matches the single-sequence reference.
            let gen = TextGenerator(lm: model, tokenizer: try tinyTokenizer(), stopIds: [])
            let outs = try gen.generateBatch(prompts: prompts, params: .greedy(maxTokens: 10))
            for (o, row) in zip(outs, rows) { XCTAssertEqual(o.tokens, row["greedy10_ids_batched"] as! [Int], "\(name) batched greedy") }

            // KV-cache decode equals the reference step logits and our own full recompute.
            let kv = fx.json["kv_decode"] as! [String: Any]
            let prompt = kv["prompt_ids"] as! [Int], fed = kv["fed_ids"] as! [Int]
            let stepRef = try fx.array(kv["step_logits"])
            let cache = KVCache(layers: model.layerCount, capacity: 8) // small on purpose: exercises growth
            _ = try model.forward(embeddings: model.embed(ids(prompt)), positions: Tensor.arange(prompt.count).unsqueeze(0), cache: cache, valid: nil)
            let full = try model(ids(prompt + fed)).squeeze(0)
            for (s, tok) in fed.enumerated() {
                let h = try model.forward(embeddings: model.embed(ids([tok])), positions: Tensor([Int64(prompt.count + s)], shape: [1, 1]), cache: cache, valid: nil)
                let step = try model.logits(h).reshape([-1])
                XCTAssertLessThan(try maxAbsDiff(step, stepRef.select(dim: 0, index: s)), 1e-4, "\(name) kv step \(s) vs HF")
                XCTAssertLessThan(try maxAbsDiff(step, full.select(dim: 0, index: prompt.count + s)), 1e-4, "\(name) kv step \(s) vs recompute")
            }
        }
    }

    func tinyTokenizer() throws -> Tokenizer {
        try Tokenizer(tokenizerJSON: fixturesRoot.appendingPathComponent("tokenizer/qwen2/tokenizer.json"))
    }

    /// A prompt fanned out to several rows becomes a prefix they share (not copied per row); each row's
    /// decode steps attend to it and to their own tokens, and give the logits of recomputing the row's whole
    /// sequence without a cache. With padding (rows of different lengths after the prefix) too.
    func testFanOutSharesThePromptAndMatchesRecompute() throws {
        for name in ["tiny-llama", "tiny-qwen2"] {
            let model = try LMLoader.loadHFModel(fixturesRoot.appendingPathComponent("lm/\(name)"))
            let prompt = [11, 200, 37, 90, 4, 301, 5]
            let fed: [[Int]] = [[77, 12, 9], [120, 33, 250], [400, 400, 8]]
            try noGrad {
                let promptPositions = try Tensor.arange(prompt.count).unsqueeze(0)
                let cache = KVCache(layers: model.layerCount, capacity: prompt.count + 1)  // grows while decoding
                _ = try model.forward(embeddings: model.embed(ids(prompt)), positions: promptPositions,
                                      cache: cache, valid: nil)
                try cache.selectRows([0, 0, 0])
                XCTAssertEqual(cache.shared, prompt.count, name)
                for step in 0..<3 {
                    let tok = try Tensor(fed.map { Int64($0[step]) }, shape: [3, 1])
                    let pos = try Tensor.full([3, 1], Double(prompt.count + step), dtype: .int64)
                    let h = try model.forward(embeddings: model.embed(tok), positions: pos, cache: cache, valid: nil)
                    let logits = try model.logits(h)
                    for r in 0..<3 {
                        let full = try model(ids(prompt + fed[r].prefix(step + 1)))
                        let want = try full.select(dim: 1, index: prompt.count + step).reshape([-1])
                        XCTAssertLessThan(try maxAbsDiff(logits.select(dim: 0, index: r).reshape([-1]), want), 1e-4,
                                          "\(name) row \(r) step \(step)")
                    }
                }
                XCTAssertEqual(cache.shared, prompt.count, "decoding keeps the prefix shared")

                // Rows of their own lengths after the shared prefix: left padding, masked.
                let padded = KVCache(layers: model.layerCount, capacity: 16)
                _ = try model.forward(embeddings: model.embed(ids(prompt)), positions: promptPositions,
                                      cache: padded, valid: nil)
                try padded.selectRows([0, 0])
                let rows = [[0, 0, 77], [120, 33, 250]], valid = [false, false, true, true, true, true]
                let n = prompt.count
                let pos = try Tensor([Int64(0), 0, Int64(n), Int64(n), Int64(n + 1), Int64(n + 2)], shape: [2, 3])
                let tokens = try Tensor(rows.flatMap { $0.map { Int64($0) } }, shape: [2, 3])
                let h = try model.forward(embeddings: model.embed(tokens), positions: pos, cache: padded,
                                          valid: Tensor(valid, shape: [2, 3]))
                let last = try model.logits(h.narrow(dim: 1, start: 2, length: 1))
                for (r, own) in [[77], [120, 33, 250]].enumerated() {
                    let want = try model(ids(prompt + own)).select(dim: 1, index: n + own.count - 1).reshape([-1])
                    XCTAssertLessThan(try maxAbsDiff(last.select(dim: 0, index: r).reshape([-1]), want), 1e-4,
                                      "\(name) padded row \(r)")
                }
            }
        }
    }

    func testTinyLlamaParity() throws { try checkTiny("tiny-llama") }
    func testTinyQwen2Parity() throws { try checkTiny("tiny-qwen2") }

    /// Prompts sharing a prefix (as chat prompts share the system turn) are prefilled with the
    /// prefix computed once; the continuations equal generating each prompt alone.
    func testSharedPrefixBatchEqualsSingleGeneration() throws {
        let model = try LMLoader.loadHFModel(fixturesRoot.appendingPathComponent("lm/tiny-llama"))
        let gen = TextGenerator(lm: model, tokenizer: try tinyTokenizer(), stopIds: [])
        let prefix = [11, 200, 37, 90, 4, 301]
        let prompts = [prefix + [5, 77], prefix + [120, 33, 250, 9, 41], prefix + [400]]
        XCTAssertEqual(gen.sharedPrefix(try prompts.map { p in
            PreparedPrompt(embeddings: try model.embed(ids(p)), positions: try Tensor.arange(p.count).unsqueeze(0), nextPosition: p.count, tokenIds: p)
        }), 6)
        let batched = try gen.generateBatch(prompts: prompts, params: .greedy(maxTokens: 8))
        for (p, out) in zip(prompts, batched) {
            XCTAssertEqual(out.tokens, try gen.generate(prompt: p, params: .greedy(maxTokens: 8))[0].tokens)
            let logp = try gen.generate(prompt: p, params: .greedy(maxTokens: 8))[0].logprobs
            for (a, b) in zip(out.logprobs, logp) { XCTAssertEqual(a, b, accuracy: 1e-4) }
        }
    }

    /// Fan-out of a batch: every sample of prompt i continues prompt i (greedy samples equal the
    /// single greedy reply; sampled tokens' log-probs equal a plain forward over prompt + reply).
    func testBatchFanOutKeepsEachSampleWithItsPrompt() throws {
        let model = try LMLoader.loadHFModel(fixturesRoot.appendingPathComponent("lm/tiny-llama"))
        let gen = TextGenerator(lm: model, tokenizer: try tinyTokenizer(), stopIds: [])
        let prompts = [[11, 200, 37, 90, 4, 301, 5, 77], [11, 200, 37, 90, 4, 301, 120, 33, 250, 9, 41], [7, 400]]
        let prepared = try prompts.map { p in
            PreparedPrompt(embeddings: try model.embed(ids(p)), positions: try Tensor.arange(p.count).unsqueeze(0), nextPosition: p.count, tokenIds: p)
        }
        let greedy = try gen.generateBatch(prepared, samples: 2, params: .greedy(maxTokens: 6))
        XCTAssertEqual(greedy.count, 6)
        for (i, p) in prompts.enumerated() {
            let single = try gen.generate(prompt: p, params: .greedy(maxTokens: 6))[0].tokens
            XCTAssertEqual(greedy[2 * i].tokens, single)
            XCTAssertEqual(greedy[2 * i + 1].tokens, single)
        }
        let sampled = try gen.generateBatch(prepared, samples: 3, params: SamplingParams(temperature: 1, topP: 1, maxTokens: 5, seed: 3))
        XCTAssertEqual(sampled.count, 9)
        for (k, out) in sampled.enumerated() {
            let p = prompts[k / 3], t = out.tokens
            let logp = try noGrad { () -> [Float] in
                let all = p + t.dropLast()
                let h = try model.forward(embeddings: model.embed(ids(all)), positions: Tensor.arange(all.count).unsqueeze(0), cache: nil, valid: nil)
                let l = try model.logits(h.narrow(dim: 1, start: p.count - 1, length: t.count)).logSoftmax(dim: -1)
                return try l.gather(dim: 2, index: Tensor(t.map { Int64($0) }, shape: [1, t.count, 1])).floats()
            }
            for (a, b) in zip(out.logprobs, logp) { XCTAssertEqual(a, b, accuracy: 1e-4, "sample \(k)") }
        }
        XCTAssertGreaterThan(Set(sampled.map(\.tokens)).count, 3, "samples differ")
    }

    func testWrongWeightsAreReported() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bad-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = fixturesRoot.appendingPathComponent("lm/tiny-llama")
        try FileManager.default.copyItem(at: src.appendingPathComponent("config.json"), to: dir.appendingPathComponent("config.json"))
        var state = try SafeTensorsFile(url: src.appendingPathComponent("model.safetensors")).tensors()
        state.removeValue(forKey: "model.layers.1.mlp.up_proj.weight")
        state["model.norm.weight"] = try Tensor.ones([7])
        try saveSafeTensors(state, to: dir.appendingPathComponent("model.safetensors"))
        XCTAssertThrowsError(try LMLoader.loadHFModel(dir)) { e in
            let msg = "\(e)"
            XCTAssertTrue(msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("model.norm.weight"), msg)
        }
        try Data("{\"hidden_size\": 3}".utf8).write(to: dir.appendingPathComponent("config.json"))
        XCTAssertThrowsError(try LMLoader.loadHFModel(dir)) { XCTAssertTrue("\($0)".contains("config.json")) }
    }
}

/// The real SmolLM2-135M-Instruct GGUF against transformers' output for the same file.
final class SmolLM2Tests: XCTestCase {
    nonisolated(unsafe) static var shared: LanguageModel?
    func lm() throws -> LanguageModel {
        let path = LMLoader.defaultLMPath(repoRoot: repoRoot)
        guard FileManager.default.fileExists(atPath: path.path) else { throw XCTSkip("run make setup: \(path.path) missing") }
        if let m = Self.shared { return m }
        let m = try LMLoader.load(path)
        Self.shared = m
        return m
    }
    var reference: [String: Any] {
        get throws { try JSONSerialization.jsonObject(with: Data(contentsOf: fixturesRoot.appendingPathComponent("lm/smollm2_logits.json"))) as! [String: Any] }
    }

    func testConfigAndUnpermutedQK() throws {
        let m = try lm()
        XCTAssertEqual(m.model.config.numHiddenLayers, 30)
        XCTAssertEqual(m.model.config.ropeTheta, 100_000)
        XCTAssertTrue(m.model.config.tieWordEmbeddings)
        let qk = try reference["qk_permutation"] as! [String: Any]
        let attn = m.model.model.layers[0].self_attn
        for (key, t, row) in [("hf_q_proj_row0_first8", attn.q_proj.weight, 0), ("hf_q_proj_row1_first8", attn.q_proj.weight, 1),
                              ("hf_k_proj_row0_first8", attn.k_proj.weight, 0)] {
            let mine = try t.select(dim: 0, index: row).narrow(dim: 0, start: 0, length: 8).floats()
            let ref = (qk[key] as! [Double]).map { Float($0) }
            for (a, b) in zip(mine, ref) { XCTAssertEqual(a, b, accuracy: 1e-6, key) }
        }
    }

    func testTokensAndLogitsMatchTransformers() throws {
        let m = try lm()
        for p in try reference["prompts"] as! [[String: Any]] {
            let name = p["name"] as! String
            let input = p["input_ids"] as! [Int]
            XCTAssertEqual(m.tokenizer.encode(p["text"] as! String), input, "\(name): token ids")
            let logits = try noGrad { try m.model(ids(input)).select(dim: 0, index: 0).select(dim: 0, index: input.count - 1) }
            let refIds = p["last_logits_top20_ids"] as! [Int], refVals = p["last_logits_top20_values"] as! [Double]
            let (vals, top) = try logits.topk(20)
            XCTAssertEqual(try top.ints(), refIds, "\(name): top-20 ids")
            for (a, b) in zip(try vals.doubles(), refVals) {
                XCTAssertLessThan(abs(a - b), 1e-3 * max(1, abs(b)), "\(name): top-20 logit \(a) vs \(b)")
            }
            let sum = try logits.to(.float64).sum().item(), ref = p["last_logits_sum"] as! Double
            XCTAssertLessThan(abs(sum - ref), 1e-4 * abs(ref) + 1, "\(name): logits checksum")
            let gen = TextGenerator(lm: m.model, tokenizer: m.tokenizer, stopIds: [])
            let out = try gen.generate(prompt: input, params: .greedy(maxTokens: 12))[0]
            XCTAssertEqual(out.tokens, p["greedy12_ids"] as! [Int], "\(name): greedy continuation")
        }
    }

    func testChatAnswersParisAndFanOutIsReproducible() throws {
        let m = try lm()
        let prompt = m.tokenizer.encode(try m.template.render([.user("What is the capital of France?")], addGenerationPrompt: true))
        let gen = TextGenerator(lm: m.model, tokenizer: m.tokenizer, stopIds: m.stopIds)
        var streamed = ""
        let greedy = try gen.generate(prompt: prompt, params: .greedy(maxTokens: 24)) { streamed += $0 }[0]
        XCTAssertTrue(greedy.text.contains("Paris"), greedy.text)
        XCTAssertEqual(streamed, greedy.text)
        let params = SamplingParams(temperature: 1, topP: 0.95, maxTokens: 6, seed: 11)
        let a = try gen.generate(prompt: prompt, samples: 8, params: params)
        let b = try gen.generate(prompt: prompt, samples: 8, params: params)
        XCTAssertEqual(a.map(\.tokens), b.map(\.tokens))
        XCTAssertGreaterThan(Set(a.map(\.tokens)).count, 1, "samples differ from each other")
        // Fan-out samples are real samples of the prompt: each token's log-prob matches a
        // recompute of the full sequence.
        let seq = prompt + a[3].tokens
        let logp = try noGrad { try m.model(ids(seq)).squeeze(0).logSoftmax(dim: -1) }
        for (i, tok) in a[3].tokens.enumerated() {
            let ref = try logp.select(dim: 0, index: prompt.count - 1 + i).select(dim: 0, index: tok).item()
            XCTAssertEqual(Double(a[3].logprobs[i]), ref, accuracy: 1e-3)
        }
    }
}

/// The SmolLM2 parity checks with bf16 matrix products (PyTorch CPU autocast semantics) against the fp32
/// transformers reference, with a bf16-sized tolerance: bf16 keeps 8 bits of mantissa, so the top logits
/// (≈ 15–25) move by up to ≈ 0.2. That can reorder near-ties: for "What is the capital of France?" the fp32
/// margin between "The" and "L" is 0.08 logits, and bf16 picks "L".
final class SmolLM2BF16Tests: XCTestCase {
    override func setUp() { Precision.current = .bf16 }
    override func tearDown() { Precision.current = .fp32 }

    func testLogitsUnderBF16() throws {
        let path = LMLoader.defaultLMPath(repoRoot: repoRoot)
        guard FileManager.default.fileExists(atPath: path.path) else { throw XCTSkip("run make setup: \(path.path) missing") }
        let m = try SmolLM2Tests.shared ?? LMLoader.load(path)
        let reference = try JSONSerialization.jsonObject(with: Data(contentsOf: fixturesRoot.appendingPathComponent(
            "lm/smollm2_logits.json"))) as! [String: Any]
        for p in reference["prompts"] as! [[String: Any]] {
            let name = p["name"] as! String
            let input = p["input_ids"] as! [Int]
            let logits = try noGrad { try m.model(ids(input)).select(dim: 0, index: 0).select(dim: 0, index: input.count - 1) }
            let refIds = p["last_logits_top20_ids"] as! [Int], refVals = p["last_logits_top20_values"] as! [Double]
            let all = try logits.doubles()
            for (id, v) in zip(refIds, refVals) {
                XCTAssertLessThan(abs(all[id] - v), 0.3, "\(name): logit of token \(id) (fp32 reference \(v))")
            }
            // The reference's top token is still at the top, up to such a tie.
            XCTAssertLessThan(all.max()! - all[refIds[0]], 0.3, "\(name): reference top token")
            // Greedy decoding re-scores the head's best few in fp32: it picks what an fp32 head would on the same
            // hidden state (the bf16 body itself still moves near-ties, as for "chat" above).
            let pos = try Tensor.arange(input.count).unsqueeze(0)
            let hidden = try noGrad {
                try m.model.forward(embeddings: m.model.embed(ids(input)), positions: pos, cache: nil, valid: nil)
                    .narrow(dim: 1, start: input.count - 1, length: 1).squeeze(1)
            }
            let rescored = try noGrad { try m.model.head.rescoringBest(m.model.logits(hidden), hidden: hidden) }
            let exact = try noGrad { try F.linear(hidden, m.model.lmHead) }
            XCTAssertEqual(try rescored.argmax(dim: -1).ints(), try exact.argmax(dim: -1).ints(), "\(name): greedy token")
        }
    }
}

import Foundation
import Models
import Torch

/// One row of bench-results.json. `ratio` is always "how many times better than the
/// reference": peer/ours for times, ours/peer for rates.
public struct BenchEntry: Codable {
    public var name: String
    public var value: Double
    public var unit: String
    public var peer_value: Double?
    public var ratio: Double?
    /// Times and memory are better when lower; rates when higher.
    public var higherIsBetter: Bool { !["s", "ms", "MiB", "x"].contains(unit) }

    enum CodingKeys: String, CodingKey { case name, value, unit, peer_value, ratio }

    public init(name: String, value: Double, unit: String) {
        self.name = name
        self.value = value
        self.unit = unit
    }
}

public enum Bench {
    /// Median of `reps` timed runs after one warm-up.
    public static func median(reps: Int, _ body: () throws -> Void) rethrows -> Double {
        try body()
        var ts: [Double] = []
        for _ in 0..<reps {
            let t0 = DispatchTime.now().uptimeNanoseconds
            try body()
            ts.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
        }
        return ts.sorted()[ts.count / 2]
    }

    public static func peakRSSMiB() -> Double {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
        for line in s.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            let kb = Double(line.split(separator: " ").dropFirst().first.map(String.init) ?? "0") ?? 0
            return kb / 1024
        }
        return 0
    }

    // MARK: foundation

    public static func matmul(m: Int, k: Int, n: Int, dtype: DType = .float32) throws -> Double {
        let a = try Tensor.randn([m, k]).to(dtype), b = try Tensor.randn([k, n]).to(dtype)
        let t = try median(reps: 7) { _ = try a.matmul(b) }
        return 2 * Double(m * k * n) / t / 1e9
    }

    /// A Llama-style stack with random weights (12 layers of SmolLM2's width by default).
    public static func blockStack(layers: Int = 12, seq: Int = 128) throws -> (forward: Double, backward: Double) {
        var c = LlamaConfig(vocabSize: 256, hiddenSize: 576, intermediateSize: 1536, numHiddenLayers: layers,
                            numAttentionHeads: 9, numKeyValueHeads: 3)
        c.ropeTheta = 100_000
        let model = try LlamaForCausalLM(c)
        let gen = Generator(seed: 0)
        try noGrad { for p in model.parameters { try p.copy_(Tensor.randn(p.shape, generator: gen) * 0.02) } }
        let x = try Tensor.randn([1, seq, 576], generator: gen)
        let pos = try Tensor.arange(seq).unsqueeze(0)
        let fwd = try median(reps: 5) { _ = try noGrad { try model.forward(embeddings: x, positions: pos, cache: nil, valid: nil) } }
        try model.unfreeze()
        let fb = try median(reps: 5) {
            try model.forward(embeddings: x, positions: pos, cache: nil, valid: nil).sum().backward()
            for p in model.parameters { try p.zeroGrad() }
        }
        return (fwd, fb)
    }

    // MARK: generation

    /// The peer's prompt: a ChatML multiple-choice question padded with description words to
    /// at most `targetTokens` tokens (same text as ../shared/bench/peer_ttrv.py).
    public static func peerPrompt(_ lm: LanguageModel, targetTokens: Int = 130) throws -> [Int] {
        let question = "Look at the description and identify what it shows. Choose the correct answer and respond with only the option letter (A, B, C, or D)."
        let options = ["a lighthouse", "a windmill", "a water tower", "a church steeple"]
        let description = "Description: A tall white cylindrical tower stands on a rocky point at the edge of the sea. Near its top there is a glass room with a large lamp, surrounded by a narrow iron balcony. A red stripe circles the middle of the tower, and a small keeper's house with a slate roof sits at its base. Waves break against the rocks below, gulls fly around the railing, and a fishing boat passes in the distance while the evening sky turns orange behind the clouds. A narrow gravel path leads from the road down to a wooden door, and a weathered sign beside the path warns visitors about the slippery stones near the water during high tide."
        let opts = zip("ABCD", options).map { "\($0). \($1)" }.joined(separator: "\n")
        let words = description.split(separator: " ")
        func render(_ n: Int) throws -> [Int] {
            let content = "\(question)\n\(words.prefix(n).joined(separator: " "))\nOptions:\n\(opts)"
            return lm.tokenizer.encode(try lm.template.render([.user(content)], addGenerationPrompt: true))
        }
        var best = try render(0)
        for n in 0...words.count {
            let ids = try render(n)
            if ids.count > targetTokens { break }
            best = ids
        }
        return best
    }

    public struct GenerationNumbers {
        public var promptTokens = 0
        public var prefillTokensPerS = 0.0
        public var decodeBatch1TokensPerS = 0.0
        public var decodeBatch32TokensPerS = 0.0
        public var fanout32TokensPerS = 0.0
    }

    public static func generation(_ lm: LanguageModel, newTokens: Int = 8, samples: Int = 32) throws -> GenerationNumbers {
        var r = GenerationNumbers()
        let prompt = try peerPrompt(lm)
        r.promptTokens = prompt.count
        let model = lm.model
        let ids = try Tensor(prompt.map { Int64($0) }, shape: [1, prompt.count])
        let pos = try Tensor.arange(prompt.count).unsqueeze(0)
        try noGrad {
            let tPrefill = try median(reps: 5) {
                let cache = KVCache(layers: model.layerCount, capacity: prompt.count + 1)
                let h = try model.forward(embeddings: model.embed(ids), positions: pos, cache: cache, valid: nil)
                _ = try model.logits(h.narrow(dim: 1, start: prompt.count - 1, length: 1))
            }
            r.prefillTokensPerS = Double(prompt.count) / tPrefill
            // Decode speed: per-step time of a cached forward at batch 1 and at batch 32.
            for batch in [1, samples] {
                let cache = KVCache(layers: model.layerCount, capacity: prompt.count + 64)
                _ = try model.forward(embeddings: model.embed(ids), positions: pos, cache: cache, valid: nil)
                if batch > 1 { try cache.selectRows(Array(repeating: 0, count: batch)) }
                var step = 0
                let tok = try Tensor.full([batch, 1], 100, dtype: .int64)
                let t = try median(reps: 9) {
                    let p = try Tensor.full([batch, 1], Double(prompt.count + step), dtype: .int64)
                    let h = try model.forward(embeddings: model.embed(tok), positions: p, cache: cache, valid: nil)
                    _ = try model.logits(h)
                    step += 1
                }
                if batch == 1 { r.decodeBatch1TokensPerS = 1 / t } else { r.decodeBatch32TokensPerS = Double(batch) / t }
            }
        }
        // Fan-out: every sample forced to `newTokens` tokens (no stop ids), prefill included.
        let gen = TextGenerator(lm: model, tokenizer: lm.tokenizer, stopIds: [])
        var seed: UInt64 = 0
        let tFan = try median(reps: 5) {
            seed += 1
            _ = try gen.generate(prompt: prompt, samples: samples, params: SamplingParams(temperature: 1, maxTokens: newTokens, seed: seed))
        }
        r.fanout32TokensPerS = Double(samples * newTokens) / tFan
        return r
    }

    /// Timed TTRV steps at the reference settings on the decoder alone (text MCQ prompt, 32 votes,
    /// 16 trained, ≤ 8 new tokens, full fp32 fine-tuning, PPO-clip + low_var_kl, AdamW), after one warm-up
    /// step. With `profile`, libtorch's operator profile of the measured steps is written there.
    public static func ttrvSteps(_ lm: LanguageModel, steps: Int = 5, out: URL, profile: String? = nil) throws
        -> [StepLog] {
        let vlm = TextOnlyVLM(lm)
        let promptIds = try peerPrompt(lm)
        // The peer's prompt as a user message (its chat wrapper is added back by prepare).
        let text = lm.tokenizer.decode(promptIds)
        let userText = text.components(separatedBy: "<|im_start|>user\n").last!.components(separatedBy: "<|im_end|>").first!
        let item = Item(id: "bench", prompt: userText, image: nil, answer: "A",
                        options: ["a lighthouse", "a windmill", "a water tower", "a church steeple"], label: "a lighthouse")
        var o = AdaptOptions()
        o.mode = .reference
        o.votes = 32
        o.trainSamples = 16
        o.maxNewTokens = 8
        o.batchPrompts = 1
        o.adaptSamples = 1
        o.epochs = steps + 1
        let adapter = try Adapter(vlm: vlm, options: o, out: out, log: { _ in })
        var logs: [StepLog] = []
        logs.append(try adapter.step([item], index: 0, epoch: 0, totalSteps: steps + 1))
        let measure = {
            for i in 1...steps { logs.append(try adapter.step([item], index: i, epoch: i, totalSteps: steps + 1)) }
        }
        if let profile { try LibTorch.profile(to: profile, measure) } else { try measure() }
        return Array(logs.dropFirst())
    }

    /// The bench entries of timed steps: medians of the step and of each of its stages.
    public static func stepMedians(_ logs: [StepLog]) -> [String: Double] {
        func med(_ f: (StepLog) -> Double) -> Double { let v = logs.map(f).sorted(); return v[v.count / 2] }
        return ["ttrv_step_seconds": med(\.seconds), "ttrv_rollout_seconds": med(\.rolloutSeconds),
                "ttrv_old_ref_logprob_seconds": med(\.oldRefSeconds), "ttrv_fwd_bwd_seconds": med(\.trainSeconds),
                "ttrv_optim_seconds": med(\.optimizerSeconds)]
    }

    /// Greedy evaluation throughput of a VLM on the first `items` items of `data` (images/s, after a warm-up batch).
    public static func evalImagesPerSecond(_ vlm: VisionLanguageModel, data: Dataset, items: Int = 64) throws -> Double {
        var o = EvalOptions()
        o.limit = min(16, items)
        _ = try Evaluator.run(vlm, dataset: data, modelName: "warm-up", options: o, progressLabel: "bench eval warm-up")
        vlm.clearImageCache()
        o.limit = items
        return try Evaluator.run(vlm, dataset: data, modelName: "bench", options: o, progressLabel: "bench eval").imagesPerSecond
    }

    // MARK: reference

    /// Runs ../shared/bench/peer_ttrv.py with $PEER_PYTHON, returning its flat results by name.
    public static func peer(mode: String, gguf: URL, precision: Precision = .fp32, log: (String) -> Void) -> [String: Double] {
        guard let python = ProcessInfo.processInfo.environment["PEER_PYTHON"], !python.isEmpty else { return [:] }
        let script = Paths.repoRoot.deletingLastPathComponent().appendingPathComponent("shared/bench/peer_ttrv.py")
        guard FileManager.default.fileExists(atPath: script.path) else {
            log("peer: \(script.path) not found; skipping the reference")
            return [:]
        }
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("peer-\(mode)-\(getpid()).json")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        let dtype = precision == .bf16 ? "bfloat16" : "float32"
        p.arguments = [script.path, "--mode", mode, "--gguf", gguf.path, "--json", out.path, "--dtype", dtype]
        log("peer: \(python) \(script.lastPathComponent) --mode \(mode) --dtype \(dtype) (takes a few minutes)")
        do {
            try p.run()
            p.waitUntilExit()
        } catch {
            log("peer: could not run \(python): \(error)")
            return [:]
        }
        guard p.terminationStatus == 0, let data = try? Data(contentsOf: out),
              let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let results = obj["results"] as? [[String: Any]] else {
            log("peer: failed (exit \(p.terminationStatus))")
            return [:]
        }
        var d: [String: Double] = [:]
        let suffix = precision == .bf16 ? "_bf16" : ""
        for r in results { if let n = r["name"] as? String, let v = r["value"] as? Double { d[n + suffix] = v } }
        return d
    }

    /// Fills peer_value and ratio where the reference measured the same quantity.
    public static func attach(_ entries: inout [BenchEntry], peer: [String: Double]) {
        for i in entries.indices {
            guard let p = peer[entries[i].name], p > 0, entries[i].value > 0 else { continue }
            entries[i].peer_value = p
            entries[i].ratio = entries[i].higherIsBetter ? entries[i].value / p : p / entries[i].value
        }
    }

    /// Merges `entries` into the JSON file (same names replaced), written atomically.
    public static func write(_ entries: [BenchEntry], to url: URL) throws {
        var all: [BenchEntry] = []
        if let data = try? Data(contentsOf: url), let old = try? JSONDecoder().decode([BenchEntry].self, from: data) {
            all = old.filter { o in !entries.contains { $0.name == o.name } }
        }
        all += entries
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(all).write(to: url, options: .atomic)
    }
}

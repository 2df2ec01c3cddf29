import Foundation
import Torch

public struct SamplingParams: Sendable {
    /// 0 means greedy.
    public var temperature: Double = 1
    public var topP: Double = 1
    /// 0 disables top-k.
    public var topK: Int = 0
    public var maxTokens: Int = 64
    public var stopStrings: [String] = []
    public var seed: UInt64 = 0

    public init(temperature: Double = 1, topP: Double = 1, topK: Int = 0, maxTokens: Int = 64,
                stopStrings: [String] = [], seed: UInt64 = 0) {
        self.temperature = temperature
        self.topP = topP
        self.topK = topK
        self.maxTokens = maxTokens
        self.stopStrings = stopStrings
        self.seed = seed
    }
    public static func greedy(maxTokens: Int) -> SamplingParams { SamplingParams(temperature: 0, maxTokens: maxTokens) }
}

public enum FinishReason: String, Sendable { case stop, length, stopString = "stop_string" }

/// One generated continuation.
public struct Completion: Sendable {
    /// Generated token ids, including the stop token when the reply ended on one.
    public var tokens: [Int] = []
    /// log p(token) under the sampling distribution (logits / temperature; raw logits when greedy).
    public var logprobs: [Float] = []
    /// Decoded reply without special tokens, cut before a stop string.
    public var text = ""
    public var finish: FinishReason = .length
}

/// Autoregressive generation over any `CausalLM`, with a KV cache.
public struct TextGenerator {
    public let lm: CausalLM
    public let tokenizer: Tokenizer
    public let stopIds: Set<Int>

    public init(lm: CausalLM, tokenizer: Tokenizer, stopIds: Set<Int>) {
        self.lm = lm
        self.tokenizer = tokenizer
        self.stopIds = stopIds
    }

    /// `samples` continuations of one prompt. The prompt is prefilled once and its cache is
    /// fanned out to every sample; `onText` streams the first sample's text as it is produced.
    public func generate(prompt: [Int], samples: Int = 1, params: SamplingParams, onText: ((String) -> Void)? = nil) throws -> [Completion] {
        let ids = try Tensor(prompt.map { Int64($0) }, shape: [1, prompt.count])
        return try generate(promptEmbeddings: noGrad { try lm.embed(ids) }, samples: samples, params: params, onText: onText)
    }

    /// As `generate(prompt:)` for a prompt already embedded ([1, T, hidden]; VLMs splice image
    /// embeddings in). `positions` default to 0..<T and decoding continues at `nextPosition`
    /// (default T); multimodal-RoPE models pass their own.
    public func generate(promptEmbeddings: Tensor, positions: Tensor? = nil, nextPosition: Int? = nil, samples: Int = 1,
                         params: SamplingParams, onText: ((String) -> Void)? = nil) throws -> [Completion] {
        try noGrad {
            let t = promptEmbeddings.size(1)
            let cache = KVCache(layers: lm.layerCount, capacity: t + params.maxTokens + 1)
            let pos = try positions ?? Tensor.arange(t).unsqueeze(0)
            let hidden = try lm.forward(embeddings: promptEmbeddings, positions: pos, cache: cache, valid: nil)
            var logits = try lm.logits(hidden.narrow(dim: 1, start: hidden.size(1) - 1, length: 1)).squeeze(1)
            if samples > 1 {
                try cache.selectRows(Array(repeating: 0, count: samples))
                logits = try logits.expand([samples, logits.size(1)])
            }
            return try decode(cache: cache, firstLogits: logits, nextPositions: Array(repeating: nextPosition ?? t, count: samples),
                              params: params, onText: onText)
        }
    }

    public func generate(_ prompt: PreparedPrompt, samples: Int = 1, params: SamplingParams, onText: ((String) -> Void)? = nil) throws -> [Completion] {
        try generate(promptEmbeddings: prompt.embeddings, positions: prompt.positions, nextPosition: prompt.nextPosition,
                     samples: samples, params: params, onText: onText)
    }

    /// One continuation per prompt, prompts of different lengths prefilled together (left padding).
    public func generateBatch(prompts: [[Int]], params: SamplingParams) throws -> [Completion] {
        let embeds = try noGrad { try prompts.map { p in try lm.embed(Tensor(p.map { Int64($0) }, shape: [1, p.count])) } }
        return try generateBatch(promptEmbeddings: embeds, params: params)
    }

    /// Batched prefill of already-embedded prompts, each [1, T_i, hidden].
    public func generateBatch(promptEmbeddings: [Tensor], params: SamplingParams) throws -> [Completion] {
        guard !promptEmbeddings.isEmpty else { return [] }
        return try noGrad {
            let lengths = promptEmbeddings.map { $0.size(1) }
            let maxLen = lengths.max()!
            let b = lengths.count, d = lm.hiddenSize
            var rows: [Tensor] = []
            var valid: [Bool] = [], positions: [Int64] = []
            for (e, n) in zip(promptEmbeddings, lengths) {
                let pad = maxLen - n
                rows.append(pad == 0 ? e : try Tensor.cat([Tensor.zeros([1, pad, d], dtype: e.dtype), e], dim: 1))
                valid += Array(repeating: false, count: pad) + Array(repeating: true, count: n)
                positions += Array(repeating: 0, count: pad) + (0..<n).map { Int64($0) }
            }
            let allValid = valid.allSatisfy { $0 }
            let cache = KVCache(layers: lm.layerCount, capacity: maxLen + params.maxTokens + 1)
            let hidden = try lm.forward(embeddings: Tensor.cat(rows, dim: 0), positions: Tensor(positions, shape: [b, maxLen]),
                                        cache: cache, valid: allValid ? nil : Tensor(valid, shape: [b, maxLen]))
            let logits = try lm.logits(hidden.narrow(dim: 1, start: maxLen - 1, length: 1)).squeeze(1)
            return try decode(cache: cache, firstLogits: logits, nextPositions: lengths, params: params, onText: nil)
        }
    }

    /// The decode loop shared by fan-out and batched generation.
    func decode(cache: KVCache, firstLogits: Tensor, nextPositions: [Int], params: SamplingParams,
                onText: ((String) -> Void)?) throws -> [Completion] {
        let b = nextPositions.count
        let rng = Generator(seed: params.seed)
        var out = [Completion](repeating: Completion(), count: b)
        var done = [Bool](repeating: false, count: b)
        var streams = (0..<b).map { _ in StreamingDecoder(tokenizer: tokenizer, skipSpecial: true) }
        var logits = firstLogits
        var positions = nextPositions
        for step in 0..<params.maxTokens {
            let (ids, lps) = try Sampler.sample(logits, params: params, generator: rng)
            for r in 0..<b where !done[r] {
                out[r].tokens.append(ids[r])
                out[r].logprobs.append(lps[r])
                if stopIds.contains(ids[r]) {
                    done[r] = true
                    out[r].finish = .stop
                    continue
                }
                let piece = streams[r].push(ids[r])
                out[r].text += piece
                if r == 0, !piece.isEmpty { onText?(piece) }
                if let cut = firstStop(in: out[r].text, params.stopStrings) {
                    out[r].text = String(out[r].text[..<cut])
                    done[r] = true
                    out[r].finish = .stopString
                }
            }
            if done.allSatisfy({ $0 }) || step == params.maxTokens - 1 { break }
            // Finished rows keep decoding a harmless token so the batch stays rectangular.
            let next = try Tensor(ids.map { Int64($0) }, shape: [b, 1])
            let pos = try Tensor(positions.map { Int64($0) }, shape: [b, 1])
            let hidden = try lm.forward(embeddings: lm.embed(next), positions: pos, cache: cache, valid: nil)
            logits = try lm.logits(hidden).squeeze(1)
            positions = positions.map { $0 + 1 }
        }
        for r in 0..<b where out[r].finish != .stopString {
            let rest = streams[r].flush()
            out[r].text += rest
            if r == 0, !rest.isEmpty { onText?(rest) }
        }
        return out
    }

    private func firstStop(in text: String, _ stops: [String]) -> String.Index? {
        stops.compactMap { text.range(of: $0)?.lowerBound }.min()
    }
}

public enum Sampler {
    /// Picks one token per row of `logits` [B, V]; returns ids and their log-probabilities.
    public static func sample(_ logits: Tensor, params: SamplingParams, generator: Generator) throws -> ([Int], [Float]) {
        let l = try logits.to(.float32)
        if params.temperature <= 0 {
            let ids = try l.argmax(dim: -1, keepDim: true)
            let lp = try l.logSoftmax(dim: -1).gather(dim: -1, index: ids)
            return (try ids.ints(), try lp.floats())
        }
        let scaled = try l / params.temperature
        var filtered = scaled
        if params.topK > 0, params.topK < l.size(-1) {
            let kth = try filtered.topk(params.topK, dim: -1).values.narrow(dim: -1, start: params.topK - 1, length: 1)
            filtered = try filtered.maskedFill(filtered.lt(kth), -Double.infinity)
        }
        if params.topP < 1 {
            let (sorted, order) = try filtered.sort(dim: -1, descending: true)
            let probs = try sorted.softmax(dim: -1)
            // Drop a token when the mass before it already reaches top-p (the first always stays).
            let before = try probs.cumsum(dim: -1) - probs
            let drop = try before.gt(params.topP)
            let dropOrig = try drop.scatter(dim: -1, index: order, src: drop)
            filtered = try filtered.maskedFill(dropOrig, -Double.infinity)
        }
        let ids = try F.multinomial(filtered.softmax(dim: -1), 1, generator: generator)
        let lp = try scaled.logSoftmax(dim: -1).gather(dim: -1, index: ids)
        return (try ids.ints(), try lp.floats())
    }
}

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
        try generateBatch([prepared(prompt)], samples: samples, params: params, onText: onText)
    }

    /// As `generate(prompt:)` for a prompt with image embeddings spliced in (and, for
    /// multimodal RoPE, its own positions).
    public func generate(_ prompt: PreparedPrompt, samples: Int = 1, params: SamplingParams, onText: ((String) -> Void)? = nil) throws -> [Completion] {
        try generateBatch([prompt], samples: samples, params: params, onText: onText)
    }

    /// One continuation per prompt, prompts of different lengths prefilled together (left padding).
    public func generateBatch(prompts: [[Int]], params: SamplingParams) throws -> [Completion] {
        try generateBatch(prompts.map(prepared), params: params)
    }

    /// A token prompt as a prepared one (positions 0..<T).
    private func prepared(_ ids: [Int]) throws -> PreparedPrompt {
        PreparedPrompt(embeddings: try noGrad { try lm.embed(Tensor(ids.map { Int64($0) }, shape: [1, ids.count])) },
                       positions: try Tensor.arange(ids.count).unsqueeze(0), nextPosition: ids.count, tokenIds: ids)
    }

    /// `samples` continuations per prepared prompt (grouped by prompt), prompts prefilled together
    /// with left padding and their cache rows then fanned out, so all samples of all prompts decode
    /// as one batch; positions travel with each prompt (M-RoPE prompts keep their 3-D positions).
    /// With 1-D positions the token prefix all prompts share (e.g. the system prompt) is computed
    /// once and its cache rows repeated. `onText` streams the first sample's text.
    ///
    /// `seeds` (one per prompt) gives each prompt its own random stream, drawn only for its unfinished
    /// samples, so a prompt's samples do not depend on which other prompts share the batch (data-parallel
    /// adaptation splits a step's prompts over processes). Without it, `params.seed` drives one stream.
    public func generateBatch(_ prompts: [PreparedPrompt], samples: Int = 1, params: SamplingParams,
                              seeds: [UInt64]? = nil, onText: ((String) -> Void)? = nil) throws -> [Completion] {
        guard !prompts.isEmpty else { return [] }
        if let seeds, seeds.count != prompts.count {
            throw ModelError("generateBatch: \(seeds.count) seeds for \(prompts.count) prompts")
        }
        return try noGrad {
            let mrope = prompts.contains { $0.positions.rank == 3 }
            let shared = mrope || prompts.count < 2 ? 0 : sharedPrefix(prompts)
            let lengths = prompts.map { $0.embeddings.size(1) - shared }
            let maxLen = lengths.max()!, d = lm.hiddenSize, b = prompts.count
            let cache = KVCache(layers: lm.layerCount, capacity: shared + maxLen + params.maxTokens + 1)
            if shared > 0 {
                _ = try lm.forward(embeddings: prompts[0].embeddings.narrow(dim: 1, start: 0, length: shared),
                                   positions: Tensor.arange(shared).unsqueeze(0), cache: cache, valid: nil)
                try cache.selectRows(Array(repeating: 0, count: b))
            }
            var rows: [Tensor] = [], posRows: [Tensor] = [], valid: [Bool] = []
            for (p, n) in zip(prompts, lengths) {
                let pad = maxLen - n
                let e = try p.embeddings.narrow(dim: 1, start: shared, length: n)
                rows.append(pad == 0 ? e : try Tensor.cat([Tensor.zeros([1, pad, d], dtype: e.dtype), e], dim: 1))
                var pos = try p.positions.to(.int64)
                if mrope && pos.rank == 2 { pos = try pos.unsqueeze(0).expand([3, 1, pos.size(-1)]) }
                let axis = pos.rank - 1
                pos = try pos.narrow(dim: axis, start: shared, length: n)
                var padShape = pos.shape
                padShape[axis] = pad
                posRows.append(pad == 0 ? pos : try Tensor.cat([Tensor.zeros(padShape, dtype: .int64), pos], dim: axis))
                valid += Array(repeating: false, count: pad) + Array(repeating: true, count: n)
            }
            let hidden = try lm.forward(embeddings: Tensor.cat(rows, dim: 0), positions: Tensor.cat(posRows, dim: mrope ? 1 : 0),
                                        cache: cache, valid: valid.allSatisfy { $0 } ? nil : Tensor(valid, shape: [b, maxLen]))
            let last = try hidden.narrow(dim: 1, start: maxLen - 1, length: 1).squeeze(1)
            var logits = try scored(lm.logits(last), hidden: last, params)
            var next = prompts.map(\.nextPosition)
            if samples > 1 {
                let source = (0..<b).flatMap { Array(repeating: $0, count: samples) } // prompt of each sample
                try cache.selectRows(source)
                logits = try logits.indexSelect(dim: 0, index: Tensor(source.map { Int64($0) }))
                next = source.map { next[$0] }
            }
            let streams = RandomStreams(seeds: seeds ?? [params.seed],
                                        promptOfRow: (0..<b).flatMap { Array(repeating: seeds == nil ? 0 : $0, count: samples) })
            return try decode(cache: cache, firstLogits: logits, nextPositions: next, params: params, random: streams,
                              onText: onText)
        }
    }

    /// Length of the token prefix every prompt shares, stopping before any image slot (ids < 0)
    /// and leaving each prompt at least one token of its own.
    func sharedPrefix(_ prompts: [PreparedPrompt]) -> Int {
        let first = prompts[0].tokenIds
        var n = 0
        let limit = prompts.map { $0.tokenIds.count - 1 }.min() ?? 0
        while n < limit, first[n] >= 0, prompts.allSatisfy({ $0.tokenIds[n] == first[n] }) { n += 1 }
        return n < 4 ? 0 : n
    }

    /// The decode loop shared by fan-out and batched generation. Finished rows are dropped from
    /// the batch once they are half of it, so one long reply does not keep 31 finished ones busy.
    func decode(cache: KVCache, firstLogits: Tensor, nextPositions: [Int], params: SamplingParams,
                random: RandomStreams, onText: ((String) -> Void)?) throws -> [Completion] {
        let b = nextPositions.count
        var out = [Completion](repeating: Completion(), count: b)
        var done = [Bool](repeating: false, count: b)
        var streams = (0..<b).map { _ in StreamingDecoder(tokenizer: tokenizer, skipSpecial: true) }
        var logits = firstLogits
        var positions = nextPositions
        var live = Array(0..<b) // the output row of each batch row
        for step in 0..<params.maxTokens {
            let (ids, lps) = try random.sample(logits, rows: live, done: done, params: params)
            for (k, r) in live.enumerated() where !done[r] {
                out[r].tokens.append(ids[k])
                out[r].logprobs.append(lps[k])
                if stopIds.contains(ids[k]) {
                    done[r] = true
                    out[r].finish = .stop
                    continue
                }
                let piece = streams[r].push(ids[k])
                out[r].text += piece
                if r == 0, !piece.isEmpty { onText?(piece) }
                if let cut = firstStop(in: out[r].text, params.stopStrings) {
                    out[r].text = String(out[r].text[..<cut])
                    done[r] = true
                    out[r].finish = .stopString
                }
            }
            if done.allSatisfy({ $0 }) || step == params.maxTokens - 1 { break }
            var next = ids
            let keep = live.indices.filter { !done[live[$0]] }
            if keep.count <= live.count / 2 {
                try cache.selectRows(keep)
                next = keep.map { ids[$0] }
                live = keep.map { live[$0] }
            }
            // Rows that finished but stay in the batch decode a harmless token.
            let tok = try Tensor(next.map { Int64($0) }, shape: [live.count, 1])
            let pos = try Tensor(live.map { Int64(positions[$0]) }, shape: [live.count, 1])
            let hidden = try lm.forward(embeddings: lm.embed(tok), positions: pos, cache: cache, valid: nil)
            let h = try hidden.squeeze(1)
            logits = try scored(lm.logits(h), hidden: h, params)
            for r in live { positions[r] += 1 }
        }
        for r in 0..<b where out[r].finish != .stopString {
            let rest = streams[r].flush()
            out[r].text += rest
            if r == 0, !rest.isEmpty { onText?(rest) }
        }
        return out
    }

    /// Greedy decoding decides by the largest logit: re-score the best few in fp32 (see `OutputHead`).
    private func scored(_ logits: Tensor, hidden: Tensor, _ params: SamplingParams) throws -> Tensor {
        params.temperature <= 0 ? try lm.head.rescoringBest(logits, hidden: hidden) : logits
    }

    private func firstStop(in text: String, _ stops: [String]) -> String.Index? {
        stops.compactMap { text.range(of: $0)?.lowerBound }.min()
    }
}

/// The random streams of a decode: one shared by every row, or one per prompt.
struct RandomStreams {
    let generators: [Generator]
    /// The stream of each output row.
    let streamOfRow: [Int]

    init(seeds: [UInt64], promptOfRow: [Int]) {
        generators = seeds.map { Generator(seed: $0) }
        streamOfRow = promptOfRow
    }

    /// Tokens for the batch rows (`rows[k]` is the output row of batch row k). With one stream every row
    /// draws; with one per prompt only unfinished rows draw, each from its prompt's stream, and finished
    /// rows get token 0 (they are ignored).
    func sample(_ logits: Tensor, rows: [Int], done: [Bool], params: SamplingParams) throws -> ([Int], [Float]) {
        guard generators.count > 1 else { return try Sampler.sample(logits, params: params, generator: generators[0]) }
        var ids = [Int](repeating: 0, count: rows.count), lps = [Float](repeating: 0, count: rows.count)
        for (s, gen) in generators.enumerated() {
            let mine = rows.indices.filter { streamOfRow[rows[$0]] == s && !done[rows[$0]] }
            guard !mine.isEmpty else { continue }
            let sub = try logits.indexSelect(dim: 0, index: Tensor(mine.map { Int64($0) }))
            let (i, l) = try Sampler.sample(sub, params: params, generator: gen)
            for (k, row) in mine.enumerated() { (ids[row], lps[row]) = (i[k], l[k]) }
        }
        return (ids, lps)
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
        // Inverse-CDF sampling: one uniform per row against the cumulative probabilities (in fp64, so that
        // the vocabulary's 49k additions do not drift), where multinomial draws an exponential per token.
        let probs = try filtered.softmax(dim: -1)
        let cdf = try probs.to(.float64).cumsum(dim: -1)
        let total = try cdf.narrow(dim: -1, start: cdf.size(-1) - 1, length: 1)
        // (Kept above 0, so that a token of probability 0 at the start of the vocabulary is never drawn.)
        let u = try (Tensor.rand([probs.size(0), 1], dtype: .float64, generator: generator) * total).clamp(min: 1e-300)
        let ids = try cdf.lt(u).sum(dim: -1, keepDim: true).clamp(max: Double(cdf.size(-1) - 1)).to(.int64)
        // The log-probability under the (unfiltered) temperature-scaled distribution.
        let unfiltered = params.topK <= 0 || params.topK >= l.size(-1)
        let lp = unfiltered && params.topP >= 1 ? try probs.gather(dim: -1, index: ids).log()
            : try scaled.gather(dim: -1, index: ids) - scaled.logsumexp(dim: -1, keepDim: true)
        return (try ids.ints(), try lp.floats())
    }
}

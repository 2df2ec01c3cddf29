import Foundation
import Torch

/// A decoder-only language model as the generation engine and the VLMs use it.
public protocol CausalLM: AnyObject {
    var layerCount: Int { get }
    var hiddenSize: Int { get }
    var vocabSize: Int { get }
    func embed(_ ids: Tensor) throws -> Tensor
    /// Hidden states after the final norm, [B, T, hidden]. `positions` are RoPE positions
    /// [B, T]; `valid` [B, T] marks real (non-padding) tokens; `cache` receives the new keys/values.
    func forward(embeddings: Tensor, positions: Tensor, cache: KVCache?, valid: Tensor?) throws -> Tensor
    func logits(_ hidden: Tensor) throws -> Tensor
    /// The output projection behind `logits`.
    var head: OutputHead { get }
}

extension CausalLM {
    public func logits(_ hidden: Tensor) throws -> Tensor { try head.logits(hidden) }
}

/// The projection from hidden states to vocabulary logits. Under bf16 it multiplies in bf16 like every
/// other linear layer — as PyTorch's CPU autocast does for the reference — because in fp32 this one
/// [vocab × hidden] product costs as much as the rest of a small model. Its logits then carry bf16
/// rounding (steps of 0.125 near 25), so greedy decoding re-scores each row's few best tokens in fp32
/// (`rescoringBest`) and picks what an fp32 head would.
public final class OutputHead {
    public let weight: Tensor
    private var cast = CastCache()

    public init(weight: Tensor) { self.weight = weight }

    public func logits(_ hidden: Tensor) throws -> Tensor { try F.linear(hidden, weight, nil, cache: &cast) }

    /// `logits` [B, V] of `hidden` [B, H] with each row's `k` largest entries replaced by their fp32
    /// values (a no-op in fp32). bf16 rounding moves a logit by at most 2⁻⁸ of its size, so the fp32
    /// winner is among the few largest unless k tokens tie within that.
    public func rescoringBest(_ logits: Tensor, hidden: Tensor, k: Int = 4) throws -> Tensor {
        guard Precision.current == .bf16, logits.size(-1) > k else { return logits }
        let b = hidden.size(0), h = hidden.size(-1)
        let best = try logits.topk(k, dim: -1).indices
        let rows = try weight.indexSelect(dim: 0, index: best.reshape([-1])).reshape([b, k, h])
        let exact = try rows.matmul(hidden.reshape([b, h, 1]).to(.float32)).reshape([b, k])
        return try logits.scatter(dim: -1, index: best, src: exact)
    }
}

/// Llama-family configuration, decoded from HF `config.json` (Llama, Qwen2, SmolLM2) or GGUF metadata.
public struct LlamaConfig: Codable, Sendable {
    public var modelType: String = "llama"
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numKeyValueHeads: Int
    public var headDim: Int?
    public var rmsNormEps: Double = 1e-6
    public var ropeTheta: Double = 10_000
    public var tieWordEmbeddings: Bool = false
    public var attentionBias: Bool?
    public var maxPositionEmbeddings: Int = 2048
    public var bosTokenId: Int?
    public var eosTokenId: Int?

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type", vocabSize = "vocab_size", hiddenSize = "hidden_size"
        case intermediateSize = "intermediate_size", numHiddenLayers = "num_hidden_layers"
        case numAttentionHeads = "num_attention_heads", numKeyValueHeads = "num_key_value_heads"
        case headDim = "head_dim", rmsNormEps = "rms_norm_eps", ropeTheta = "rope_theta"
        case tieWordEmbeddings = "tie_word_embeddings", attentionBias = "attention_bias"
        case maxPositionEmbeddings = "max_position_embeddings", bosTokenId = "bos_token_id", eosTokenId = "eos_token_id"
        case ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
    }

    public init(vocabSize: Int, hiddenSize: Int, intermediateSize: Int, numHiddenLayers: Int, numAttentionHeads: Int,
                numKeyValueHeads: Int, modelType: String = "llama") {
        self.vocabSize = vocabSize
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.numHiddenLayers = numHiddenLayers
        self.numAttentionHeads = numAttentionHeads
        self.numKeyValueHeads = numKeyValueHeads
        self.modelType = modelType
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        modelType = try c.decodeIfPresent(String.self, forKey: .modelType) ?? "llama"
        vocabSize = try c.decode(Int.self, forKey: .vocabSize)
        hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
        intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
        numHiddenLayers = try c.decode(Int.self, forKey: .numHiddenLayers)
        numAttentionHeads = try c.decode(Int.self, forKey: .numAttentionHeads)
        numKeyValueHeads = try c.decodeIfPresent(Int.self, forKey: .numKeyValueHeads) ?? numAttentionHeads
        headDim = try c.decodeIfPresent(Int.self, forKey: .headDim)
        rmsNormEps = try c.decodeIfPresent(Double.self, forKey: .rmsNormEps) ?? 1e-6
        tieWordEmbeddings = try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? false
        attentionBias = try c.decodeIfPresent(Bool.self, forKey: .attentionBias)
        maxPositionEmbeddings = try c.decodeIfPresent(Int.self, forKey: .maxPositionEmbeddings) ?? 2048
        bosTokenId = try? c.decodeIfPresent(Int.self, forKey: .bosTokenId)
        eosTokenId = try? c.decodeIfPresent(Int.self, forKey: .eosTokenId)
        // transformers 5 moved rope_theta into rope_parameters; accept both.
        let params = try? c.decodeIfPresent(RopeParameters.self, forKey: .ropeParameters)
        ropeTheta = try c.decodeIfPresent(Double.self, forKey: .ropeTheta) ?? params?.ropeTheta ?? 10_000
        let scaling = (try? c.decodeIfPresent(RopeParameters.self, forKey: .ropeScaling)) ?? params
        if let kind = scaling?.ropeType, kind != "default" {
            throw ModelError("rope scaling type '\(kind)' is not supported")
        }
        try validate()
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(modelType, forKey: .modelType)
        try c.encode(vocabSize, forKey: .vocabSize)
        try c.encode(hiddenSize, forKey: .hiddenSize)
        try c.encode(intermediateSize, forKey: .intermediateSize)
        try c.encode(numHiddenLayers, forKey: .numHiddenLayers)
        try c.encode(numAttentionHeads, forKey: .numAttentionHeads)
        try c.encode(numKeyValueHeads, forKey: .numKeyValueHeads)
        try c.encodeIfPresent(headDim, forKey: .headDim)
        try c.encode(rmsNormEps, forKey: .rmsNormEps)
        try c.encode(ropeTheta, forKey: .ropeTheta)
        try c.encode(tieWordEmbeddings, forKey: .tieWordEmbeddings)
        try c.encodeIfPresent(attentionBias, forKey: .attentionBias)
        try c.encode(maxPositionEmbeddings, forKey: .maxPositionEmbeddings)
    }

    struct RopeParameters: Codable {
        var ropeType: String?
        var ropeTheta: Double?
        enum CodingKeys: String, CodingKey { case ropeType = "rope_type", ropeTheta = "rope_theta" }
    }

    public var resolvedHeadDim: Int { headDim ?? hiddenSize / numAttentionHeads }
    /// Qwen2 puts biases on q/k/v; Llama only when `attention_bias` says so.
    public var qkvBias: Bool { attentionBias ?? (modelType == "qwen2") }

    /// Reads the `llama.*` / `qwen2.*` keys of a GGUF file.
    public init(gguf: GGUFFile) throws {
        let arch = gguf.metadata["general.architecture"]?.string ?? "llama"
        func int(_ key: String) throws -> Int {
            guard let v = gguf.metadata["\(arch).\(key)"]?.int else {
                throw ModelError("\(gguf.url.path): GGUF metadata has no \(arch).\(key)")
            }
            return v
        }
        let heads = try int("attention.head_count")
        let vocab = gguf.metadata["\(arch).vocab_size"]?.int ?? gguf.metadata["tokenizer.ggml.tokens"]?.array?.count ?? 0
        self.init(vocabSize: vocab, hiddenSize: try int("embedding_length"), intermediateSize: try int("feed_forward_length"),
                  numHiddenLayers: try int("block_count"), numAttentionHeads: heads,
                  numKeyValueHeads: gguf.metadata["\(arch).attention.head_count_kv"]?.int ?? heads,
                  modelType: arch)
        rmsNormEps = gguf.metadata["\(arch).attention.layer_norm_rms_epsilon"]?.double ?? 1e-6
        ropeTheta = gguf.metadata["\(arch).rope.freq_base"]?.double ?? 10_000
        maxPositionEmbeddings = gguf.metadata["\(arch).context_length"]?.int ?? 2048
        headDim = gguf.metadata["\(arch).attention.key_length"]?.int
        tieWordEmbeddings = gguf.tensor(named: "output.weight") == nil
        bosTokenId = gguf.metadata["tokenizer.ggml.bos_token_id"]?.int
        eosTokenId = gguf.metadata["tokenizer.ggml.eos_token_id"]?.int
    }
}

public struct ModelError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Rotary position embedding, HF "rotate_half" layout (first half / second half pairs).
public struct Rotary {
    public let invFreq: Tensor // [headDim/2], float32

    public init(headDim: Int, theta: Double) throws {
        let exps: [Float] = stride(from: 0, to: headDim, by: 2).map { (i: Int) -> Float in
            let e: Double = Double(i) / Double(headDim)
            return Float(Foundation.pow(theta, -e))
        }
        invFreq = try Tensor(exps)
    }

    /// The RoPE tables for positions [B, T], each [B, 1, T, headDim].
    public func angles(_ positions: Tensor) throws -> RotaryAngles {
        let freqs = try positions.to(.float32).unsqueeze(-1) * invFreq
        return try RotaryAngles(half: freqs.unsqueeze(1))
    }

    /// x·cos + rotate_half(x)·sin, with rotate_half(x) = [−x₂, x₁] written as the halves swapped times a
    /// sign folded into sin: the same products bit for bit, and a backward without the zero-filled
    /// gradients that slicing x into halves costs.
    public static func apply(_ x: Tensor, _ rope: RotaryAngles) throws -> Tensor {
        let half = x.size(-1) / 2
        let halves = Array(x.shape.dropLast()) + [2, half]
        let swapped = try x.view(halves).flip([-2]).view(x.shape)
        return try x * rope.cos + swapped * rope.signedSin
    }
}

/// cos and sin of RoPE angles, each [..., headDim]: built from the angles of one half [..., headDim/2], which
/// both halves of a head repeat, with sin's first half negated once per forward pass rather than in every
/// attention layer (for `Rotary.apply`).
public struct RotaryAngles {
    public let cos: Tensor, signedSin: Tensor

    public init(half: Tensor) throws {
        let c = try half.cos(), s = try half.sin()
        cos = try Tensor.cat([c, c], dim: -1)
        signedSin = try Tensor.cat([s.neg(), s], dim: -1)
    }
}

/// Attention mask [B, 1, T, L] (true = attend) for T new queries after `past` cached positions,
/// or nil when plain causal attention (or none, for one new token) is exact.
func attentionMask(newTokens t: Int, past: Int, validKeys: Tensor?) throws -> Tensor? {
    if validKeys == nil && (past == 0 || t == 1) { return nil }
    let total = past + t
    let q = try Tensor.arange(Double(past), Double(total)).unsqueeze(1) // [T,1]
    let k = try Tensor.arange(0, Double(total)).unsqueeze(0)           // [1,L]
    var mask = try k.le(q).unsqueeze(0).unsqueeze(0)                    // [1,1,T,L]
    if let validKeys {
        mask = try mask.logicalAnd(validKeys.unsqueeze(1).unsqueeze(1))
        // A padding query would see no key at all (NaN); let every query see itself.
        mask = try mask.logicalOr(k.eq(q).unsqueeze(0).unsqueeze(0))
    }
    return mask
}

public final class LlamaAttention: Module {
    public let q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear
    let heads: Int, kvHeads: Int, headDim: Int
    private lazy var qkv = FusedLinears([q_proj, k_proj, v_proj])

    init(_ c: LlamaConfig) throws {
        heads = c.numAttentionHeads
        kvHeads = c.numKeyValueHeads
        headDim = c.resolvedHeadDim
        q_proj = try Linear(c.hiddenSize, heads * headDim, bias: c.qkvBias, initialize: false)
        k_proj = try Linear(c.hiddenSize, kvHeads * headDim, bias: c.qkvBias, initialize: false)
        v_proj = try Linear(c.hiddenSize, kvHeads * headDim, bias: c.qkvBias, initialize: false)
        // transformers' LlamaAttention biases o_proj too when attention_bias is set; Qwen2 never does.
        o_proj = try Linear(heads * headDim, c.hiddenSize, bias: c.attentionBias == true && c.modelType != "qwen2",
                            initialize: false)
        super.init()
        register("q_proj", q_proj)
        register("k_proj", k_proj)
        register("v_proj", v_proj)
        register("o_proj", o_proj)
    }

    func callAsFunction(_ x: Tensor, rope: RotaryAngles, mask: Tensor?, cache: KVCache?, layer: Int) throws -> Tensor {
        let (b, t) = (x.size(0), x.size(1))
        // RoPE, the cache and attention stay fp32: libtorch's CPU attention in bf16 takes 10× longer for
        // one-token queries (decoding) and no less for longer ones.
        let projected = try qkv(x).map { try $0.to(.float32) }
        var q = try projected[0].view([b, t, heads, headDim]).transpose(1, 2)
        var k = try projected[1].view([b, t, kvHeads, headDim]).transpose(1, 2)
        var v = try projected[2].view([b, t, kvHeads, headDim]).transpose(1, 2)
        q = try Rotary.apply(q, rope)
        k = try Rotary.apply(k, rope)
        let causal = mask == nil && (cache == nil || cache!.length == 0) && t > 1
        if let cache { (k, v) = try cache.append(layer: layer, k: k, v: v) }
        let out = if let prefix = cache?.sharedPrefix(layer: layer) {
            try sharedPrefixAttention(q, prefix: prefix, k, v, mask: mask)
        } else {
            try F.scaledDotProductAttention(q, k, v, mask: mask, causal: causal, enableGQA: kvHeads != heads)
        }
        return try o_proj(Precision.activations(out.transpose(1, 2).reshape([b, t, heads * headDim])))
    }
}

extension LlamaAttention {
    /// Attention over a prefix every row shares and each row's own positions after it, as explicit products:
    /// the prefix's keys and values are read once for all rows' queries (one product per key/value head)
    /// instead of from a copy per row, then both parts' scores share one softmax. q [B, H, T, D]; prefix
    /// [1, KV, P, D]; k/v [B, KV, S, D]; mask [B or 1, 1, T, P + S] or nil (all positions visible).
    func sharedPrefixAttention(_ q: Tensor, prefix: (keys: Tensor, values: Tensor), _ k: Tensor, _ v: Tensor,
                               mask: Tensor?) throws -> Tensor {
        let (b, t, p, s) = (q.size(0), q.size(2), prefix.keys.size(2), k.size(2))
        let group = heads / kvHeads
        let rows = try q.reshape([b, kvHeads, group * t, headDim])        // query heads by key/value head
        let allRows = try rows.transpose(0, 1).reshape([1, kvHeads, b * group * t, headDim])
        let onPrefix = try allRows.matmul(prefix.keys.transpose(-1, -2))
            .reshape([kvHeads, b, group * t, p]).transpose(0, 1)
        var scores = try Tensor.cat([onPrefix, rows.matmul(k.transpose(-1, -2))], dim: -1)
            * (1 / Double(headDim).squareRoot())
        if let mask {
            scores = try scores.view([b, kvHeads, group, t, p + s])
                .maskedFill(mask.unsqueeze(1).logicalNot(), -Double.infinity).view([b, kvHeads, group * t, p + s])
        }
        let probs = try scores.softmax(dim: -1)
        let fromPrefix = try probs.narrow(dim: -1, start: 0, length: p).transpose(0, 1)
            .reshape([1, kvHeads, b * group * t, p]).matmul(prefix.values)
            .reshape([kvHeads, b, group * t, headDim]).transpose(0, 1)
        let own = try probs.narrow(dim: -1, start: p, length: s).matmul(v)
        return try (fromPrefix + own).reshape([b, heads, t, headDim])
    }
}

public final class LlamaMLP: Module {
    public let gate_proj: Linear, up_proj: Linear, down_proj: Linear
    private lazy var gateUp = FusedLinears([gate_proj, up_proj])
    init(_ c: LlamaConfig) throws {
        gate_proj = try Linear(c.hiddenSize, c.intermediateSize, bias: false, initialize: false)
        up_proj = try Linear(c.hiddenSize, c.intermediateSize, bias: false, initialize: false)
        down_proj = try Linear(c.intermediateSize, c.hiddenSize, bias: false, initialize: false)
        super.init()
        register("gate_proj", gate_proj)
        register("up_proj", up_proj)
        register("down_proj", down_proj)
    }
    func callAsFunction(_ x: Tensor) throws -> Tensor {
        let gu = try gateUp(x)
        return try down_proj(gu[0].silu() * gu[1])
    }
}

public final class LlamaDecoderLayer: Module {
    public let self_attn: LlamaAttention, mlp: LlamaMLP
    public let input_layernorm: RMSNorm, post_attention_layernorm: RMSNorm

    init(_ c: LlamaConfig) throws {
        self_attn = try LlamaAttention(c)
        mlp = try LlamaMLP(c)
        input_layernorm = try RMSNorm(c.hiddenSize, eps: c.rmsNormEps)
        post_attention_layernorm = try RMSNorm(c.hiddenSize, eps: c.rmsNormEps)
        super.init()
        register("self_attn", self_attn)
        register("mlp", mlp)
        register("input_layernorm", input_layernorm)
        register("post_attention_layernorm", post_attention_layernorm)
    }

    /// The residual stream stays fp32; under bf16 each block's input is cast once and its products run in
    /// bf16, and the output projection's bf16 result is promoted by the fp32 residual add (autocast's dataflow).
    public func callAsFunction(_ x: Tensor, rope: RotaryAngles, mask: Tensor?, cache: KVCache?,
                               layer: Int) throws -> Tensor {
        let a = try Precision.activations(input_layernorm(x))
        let h = try x + self_attn(a, rope: rope, mask: mask, cache: cache, layer: layer)
        return try h + mlp(Precision.activations(post_attention_layernorm(h)))
    }
}

/// The `model.` part of a Llama/Qwen2 checkpoint: embeddings, decoder layers, final norm.
public final class LlamaModel: Module {
    public let embed_tokens: Embedding, layers: [LlamaDecoderLayer], norm: RMSNorm
    init(_ c: LlamaConfig) throws {
        embed_tokens = try Embedding(c.vocabSize, c.hiddenSize, initialize: false)
        layers = try (0..<c.numHiddenLayers).map { _ in try LlamaDecoderLayer(c) }
        norm = try RMSNorm(c.hiddenSize, eps: c.rmsNormEps)
        super.init()
        register("embed_tokens", embed_tokens)
        let list = Module()
        for (i, l) in layers.enumerated() { list.register("\(i)", l) }
        register("layers", list)
        register("norm", norm)
    }
}

extension LlamaModel {
    /// The decoder layers and final norm, given RoPE tables for the new positions (1-D RoPE
    /// for Llama/Qwen2, multimodal RoPE for Qwen2.5-VL). Builds the attention mask from the
    /// cache length and the padding of cached and new tokens.
    public func decode(_ embeddings: Tensor, rope: RotaryAngles, cache: KVCache?, valid: Tensor?) throws -> Tensor {
        let (b, t) = (embeddings.size(0), embeddings.size(1))
        let past = cache?.length ?? 0
        var validKeys: Tensor? = valid
        if let cache, valid != nil || cache.valid != nil {
            let old = try cache.validPrefix ?? Tensor.ones([b, past], dtype: .bool)
            validKeys = try Tensor.cat([old, valid ?? Tensor.ones([b, t], dtype: .bool)], dim: 1)
        }
        let mask = try attentionMask(newTokens: t, past: past, validKeys: validKeys)
        var h = embeddings
        for (i, layer) in layers.enumerated() {
            h = try layer(h, rope: rope, mask: mask, cache: cache, layer: i)
        }
        if let cache { try cache.advance(t, validNew: valid) }
        return try norm(h)
    }
}

/// LlamaForCausalLM / Qwen2ForCausalLM (SmolLM2 is a Llama).
public final class LlamaForCausalLM: Module, CausalLM {
    public let config: LlamaConfig
    public let model: LlamaModel
    public let head: OutputHead
    public var lmHead: Tensor { head.weight }
    let rotary: Rotary

    public init(_ config: LlamaConfig) throws {
        self.config = config
        model = try LlamaModel(config)
        rotary = try Rotary(headDim: config.resolvedHeadDim, theta: config.ropeTheta)
        head = OutputHead(weight: config.tieWordEmbeddings ? model.embed_tokens.weight
                          : try Tensor.empty([config.vocabSize, config.hiddenSize]))
        super.init()
        register("model", model)
        if !config.tieWordEmbeddings {
            let head = Module()
            head.register("weight", lmHead)
            register("lm_head", head)
        }
    }

    public var layerCount: Int { config.numHiddenLayers }
    public var hiddenSize: Int { config.hiddenSize }
    public var vocabSize: Int { config.vocabSize }

    public func embed(_ ids: Tensor) throws -> Tensor { try model.embed_tokens(ids) }

    public func forward(embeddings: Tensor, positions: Tensor, cache: KVCache?, valid: Tensor?) throws -> Tensor {
        return try model.decode(embeddings, rope: rotary.angles(positions), cache: cache, valid: valid)
    }


    /// Convenience: logits for token ids [B, T] (no cache, positions 0..<T).
    public func callAsFunction(_ ids: Tensor) throws -> Tensor {
        let t = ids.size(1)
        let pos = try Tensor.arange(t).unsqueeze(0).expand([ids.size(0), t])
        return try logits(forward(embeddings: embed(ids), positions: pos, cache: nil, valid: nil))
    }
}
